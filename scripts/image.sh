#!/usr/bin/env bash
# `make image`: build meshlet's container image from the Dockerfile with podman, on a machine with
# no container registry if need be. Idempotent: every step checks first; a rebuild with nothing
# changed takes seconds (podman's layer cache).
#
#   scripts/image.sh [--print-ref]     build (or reuse) the image; --print-ref only prints its name
#
# The image's name is the one daemonset/daemonset.yaml runs (ghcr.io/meshlet/meshlet:<tag>), so the
# manifests and tests/kernel/runtime/test_runtime_image.py use what was built. Steps:
#   1. podman, runc and mmdebstrap (installed with apt-get when missing; `WITH_IMAGE=1
#      scripts/setup.sh` does it too);
#   2. the base, debian:bookworm-slim: used when present, pulled when a registry answers, else made
#      from Debian's packages (`mmdebstrap --variant=minbase bookworm`, the same trimmed dpkg
#      paths as the official slim image) and imported. The root filesystem tarball is cached in
#      $MESHLET_CACHE (default /var/cache/meshlet), so a machine makes it once;
#   3. `podman build`: chroot isolation and the host network (no container network set-up needed),
#      the host's CA bundle bind-mounted read-only for pip in the build stage only (a TLS-inspecting
#      proxy would otherwise refuse pip; the bundle is never copied into a layer).
# Every podman call uses image/containers.conf (CONTAINERS_CONF): runc with cgroupfs (crun refuses
# hybrid cgroup hierarchies) and no default ulimits (raising rlimits may be refused in a sandbox).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

# The image reference, from the manifest the DaemonSet runs (one home for the name and the tag).
ref=$(awk '$1 == "image:" {print $2; exit}' daemonset/daemonset.yaml)
[ -n "$ref" ] || die "no 'image:' line in daemonset/daemonset.yaml"
if [ "${1:-}" = --print-ref ]; then echo "$ref"; exit 0; fi
[ $# -eq 0 ] || die "unknown argument $1 (usage: scripts/image.sh [--print-ref])"

[ "$(id -u)" = 0 ] || die "run as root (podman builds in root's image store): sudo $0"
export CONTAINERS_CONF=$repo/image/containers.conf
cache=${MESHLET_CACHE:-/var/cache/meshlet}
base=debian:bookworm-slim

# --- 1. tools -------------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${need[*]}: install them (this script knows apt-get only)"
  say "installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
    || die "apt-get install ${need[*]} failed (no network to the Debian mirror?)"
fi

# --- 2. the base image ----------------------------------------------------------------------------
if podman image exists "$base"; then
  :
elif timeout 60 podman pull --quiet "docker.io/library/$base" >/dev/null 2>&1; then
  say "pulled $base"
else
  tarball=$cache/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    say "no registry reachable: making $base from Debian's packages (mmdebstrap, about 30 s)"
    mkdir -p "$cache"
    # The dpkg exclusions of the official slim image: no manuals, docs (copyrights kept), locales.
    # merged-usr hook: /usr merged as in the official image, without the usrmerge package (and the
    # full perl it pulls in).
    mmdebstrap --quiet --variant=minbase --format=tar --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/groff/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
      --dpkgopt='path-exclude=/usr/share/linda/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      bookworm "$tarball.partial" \
      || { rm -f "$tarball.partial"; die "mmdebstrap failed (no network to the Debian mirror?)"; }
    mv "$tarball.partial" "$tarball"
  fi
  podman import --quiet --change 'CMD ["bash"]' "$tarball" "$base" >/dev/null \
    || die "podman import $tarball failed (remove it to make it again)"
  say "imported $base from $tarball"
fi

# --- 3. the build ---------------------------------------------------------------------------------
ca_args=()
for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  if [ -r "$bundle" ]; then
    ca_args=(--volume "$bundle:/run/host-ca-bundle.crt:ro" --build-arg HOST_CA_BUNDLE=/run/host-ca-bundle.crt)
    break
  fi
done
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
version=${ref##*:}
say "building $ref"
podman build --quiet --pull=never --isolation=chroot --network=host "${ca_args[@]}" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --tag "$ref" . >/dev/null \
  || die "podman build failed (its output is above)"
size=$(podman image inspect --format '{{.Size}}' "$ref")
say "built $ref ($((size / 1000000)) MB)"
echo "$ref"
