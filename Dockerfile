# syntax=docker/dockerfile:1
# meshlet's container image: the agent (`meshlet run`, as root with the DaemonSet's capabilities)
# and the CLI (`meshlet maps dump`, `explain`, `uninstall`). Debian 12 because bcc comes from
# Debian (python3-bpfcc, built for Debian's python3), as on the development machines.
#   make image                        (scripts/image.sh: podman, also without a registry)
#   docker build -t ghcr.io/meshlet/meshlet:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
# Two stages: `build` makes the venv with pip; the image copies it onto a base holding only what
# runs: python3, bcc with its LLVM (python3-bpfcc), iproute2, util-linux, ca-certificates. No pip,
# no compiler toolchain, no apt lists. tests/kernel/runtime/test_runtime_image.py runs it as daemonset/daemonset.yaml says.

FROM debian:bookworm-slim AS build
# HOST_CA_BUNDLE: a CA bundle file mounted into the build (scripts/image.sh mounts the host's,
# read-only) for pip behind a TLS-inspecting proxy (PIP_CERT also reaches pip's build-isolation
# subprocess). Used by pip in this stage only.
ARG HOST_CA_BUNDLE=
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The venv sees Debian's bcc (--system-site-packages); the PyPI "bcc" is an unrelated package.
# Editable install: the loader finds bpf/ beside the agent package (agent/datapath/loader.py), and
# /opt/meshlet keeps the same path in the final stage. pip goes once the venv is made, and so
# does kubernetes/aio (67 MB: the client's asyncio copy; the agent uses the synchronous client).
WORKDIR /opt/meshlet
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY bpf ./bpf
RUN python3 -m venv --system-site-packages /opt/meshlet/venv \
 && if [ -n "$HOST_CA_BUNDLE" ]; then export PIP_CERT="$HOST_CA_BUNDLE"; fi \
 && /opt/meshlet/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile -e . \
 && /opt/meshlet/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && rm -rf /opt/meshlet/venv/lib/python3*/site-packages/kubernetes/aio

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="meshlet" \
      org.opencontainers.image.description="Kubernetes Service routing in the kernel, at the cgroup socket hooks (eBPF)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/meshlet/meshlet"

# python3-bpfcc: bcc and its in-process clang/LLVM, which compile bpf/*.c against the node's
# headers (mounted from the node at run time, not installed here). iproute2 and util-linux (mount,
# nsenter) for node-init and debugging; ca-certificates for the API server's TLS.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-bpfcc iproute2 util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

COPY --from=build /opt/meshlet /opt/meshlet
COPY image/entrypoint.sh /usr/local/bin/meshlet-entrypoint
ENV PATH=/opt/meshlet/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1
RUN python3 -m compileall -q /opt/meshlet/agent /opt/meshlet/venv/lib \
 && /opt/meshlet/venv/bin/python -c "import bcc, agent.cli" \
 && /opt/meshlet/venv/bin/meshlet --help >/dev/null

# The CLI runs as an ordinary user; the DaemonSet runs the agent and node-init as root
# (runAsUser: 0) with the capabilities it lists, since loading and attaching programs needs them.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meshlet
USER 10001

ENTRYPOINT ["/usr/local/bin/meshlet-entrypoint"]
CMD ["--help"]
