#!/usr/bin/env bash
# One-time (idempotent) machine set-up for meshlet on Debian/Ubuntu, as root:
#   - system packages: bcc's Python module (python3-bpfcc), iproute2, nftables/iptables (benchmarks),
#     kernel headers for bcc;
#   - /lib/modules/$(uname -r)/{build,source} pointing at a header tree bcc can compile against;
#   - bpffs mounted at /sys/fs/bpf;
#   - .venv made from /usr/bin/python3 with --system-site-packages (bcc is Debian's, not PyPI's).
# Every step checks first and does nothing when already done. Where a step cannot be done it stops
# with one line saying what is missing and what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (bcc compiles and loads eBPF programs): sudo $0"
command -v apt-get >/dev/null || die "this script knows Debian/Ubuntu (apt-get); install python3-bpfcc, kernel headers and iproute2 by hand"

# Packages: with WITH_VM=1 also what the kernel-matrix VM test needs, with WITH_IMAGE=1 podman.
pkgs=(python3-bpfcc python3-venv python3-pip iproute2 iptables nftables bpftool procps)
[ "${WITH_VM:-0}" = 1 ] && pkgs+=(qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static)
# With WITH_IMAGE=1 what `make image` and the image test need (scripts/image.sh).
[ "${WITH_IMAGE:-0}" = 1 ] && pkgs+=(podman runc mmdebstrap)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?)"; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}
if [ ${#missing[@]} -gt 0 ]; then say "installing ${missing[*]}"; apt_install "${missing[@]}"; fi

# Kernel headers: bcc compiles against /lib/modules/$(uname -r)/build. Prefer the exact package;
# else Debian's generic linux-headers-amd64, whose structs are close enough for the socket hooks
# (the programs use only stable UAPI types and CO-RE-free context fields).
krel=$(uname -r)
mod=/lib/modules/$krel
if [ ! -e "$mod/build/include/linux/kconfig.h" ] && [ ! -e "$mod/build/include/generated/autoconf.h" ]; then
  if apt-cache show "linux-headers-$krel" >/dev/null 2>&1; then
    say "installing linux-headers-$krel"; apt_install "linux-headers-$krel"
  fi
fi
if [ ! -e "$mod/build/include/generated/autoconf.h" ]; then
  dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "ok installed" || { say "installing linux-headers-amd64"; apt_install linux-headers-amd64; }
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  [ -n "$arch_dir" ] || die "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"
  common_dir=${arch_dir%-amd64}-common
  [ -d "$common_dir" ] || die "missing $common_dir (the -common half of the headers)"
  mkdir -p "$mod"
  ln -sfn "$arch_dir" "$mod/build"
  ln -sfn "$common_dir" "$mod/source"
  say "linked $mod/build -> $arch_dir and $mod/source -> $common_dir"
fi

# bpffs: the agent pins its maps and program links there.
if ! awk '$2=="/sys/fs/bpf" && $3=="bpf"{f=1} END{exit !f}' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf (kernel without CONFIG_BPF_SYSCALL?)"
  say "mounted bpffs at /sys/fs/bpf"
fi

# cgroup2 must be mounted somewhere (pure v2 or hybrid).
awk '$3=="cgroup2"{f=1} END{exit !f}' /proc/mounts || die "no cgroup2 mount in /proc/mounts; the socket hooks need cgroup v2"

# The venv: Debian's interpreter (bcc's module is built for it) with the system site packages.
[ -x /usr/bin/python3 ] || die "/usr/bin/python3 missing (Debian's python3 package)"
/usr/bin/python3 -c 'import bcc' 2>/dev/null || die "/usr/bin/python3 cannot import bcc (is python3-bpfcc installed for this python?)"
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
  say "made .venv from /usr/bin/python3"
fi
stamp=.venv/.meshlet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing meshlet and its Python dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' || die "pip install failed (no access to PyPI?)"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, kubernetes, prometheus_client, click' \
  || die ".venv cannot import a dependency; remove .venv and run again"
say "ready"
