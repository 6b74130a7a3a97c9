# syntax=docker/dockerfile:1
# meshlet's container image: the agent (`meshlet run`, as root with the DaemonSet's capabilities)
# and the CLI (`meshlet maps dump`, `explain`, `uninstall`). Debian 12 because bcc comes from
# Debian (python3-bpfcc, built for Debian's python3), as on the development machines.
#   docker build -t ghcr.io/meshlet/meshlet:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
# Not built in CI (no container engine there): tests/unit/deploy/test_deploy_image.py checks it.
FROM debian:bookworm-slim

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="meshlet" \
      org.opencontainers.image.description="Kubernetes Service routing in the kernel, at the cgroup socket hooks (eBPF)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/meshlet/meshlet"

# python3-bpfcc: bcc and its in-process clang, which compile bpf/*.c against the node's headers
# (mounted from the node at run time, not installed here). iproute2 and util-linux (mount, nsenter)
# for node-init and debugging; ca-certificates for the API server's TLS.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc iproute2 util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The venv sees Debian's bcc (--system-site-packages); the PyPI "bcc" is an unrelated package.
# Editable install: the loader finds bpf/ beside the agent package (agent/datapath/loader.py).
WORKDIR /opt/meshlet
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY bpf ./bpf
RUN python3 -m venv --system-site-packages /opt/meshlet/venv \
 && /opt/meshlet/venv/bin/pip install --no-cache-dir --disable-pip-version-check -e . \
 && /opt/meshlet/venv/bin/python -c "import bcc, agent.cli" \
 && /opt/meshlet/venv/bin/meshlet --help >/dev/null

COPY image/entrypoint.sh /usr/local/bin/meshlet-entrypoint
ENV PATH=/opt/meshlet/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1

# The CLI runs as an ordinary user; the DaemonSet runs the agent and node-init as root
# (runAsUser: 0) with the capabilities it lists, since loading and attaching programs needs them.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meshlet
USER 10001

ENTRYPOINT ["/usr/local/bin/meshlet-entrypoint"]
CMD ["--help"]
