#!/usr/bin/env bash
# Run meshlet's kernel tests inside a VM booted with another kernel (by default Debian 12's 6.1,
# the oldest kernel meshlet claims), so the minimum-kernel claim is proved, not stated.
#
#   scripts/vm/run-kernel-tests.sh [--kernel /boot/vmlinuz-VERSION] [--timeout SECONDS]
#                                  [--accel auto|kvm|tcg] [-- PYTEST-ARGS...]
#
# The VM (qemu) sees the host's whole filesystem read-only over virtio-9p, so it runs this very
# checkout with the host's .venv, bcc and Python; tmpfs holds what the tests write. It has no
# network device. Default test selection: -m kernel tests/vm/kernel tests/kernel/datapath.
#
# Needs root and: qemu-system-x86, a kernel image in /boot with its modules (linux-image-amd64),
# the matching headers (linux-headers-amd64; linked below as /lib/modules/VERSION/build for the
# VM's kernel, which setup.sh does not do: it links the running kernel only) and busybox-static.
# `WITH_VM=1 scripts/setup.sh` installs all of them.
#
# Acceleration: KVM when /dev/kvm exists and a probe boot succeeds; TCG (emulation, about 10x
# slower) when KVM is present but cannot boot the kernel (seen with nested virtualization).
# Without /dev/kvm it exits 77 (skip) unless --accel tcg is given.
#
# Exit codes: 0 the tests passed; 1 they failed; 2 a missing prerequisite or bad usage;
# 3 the VM gave no result (crash or timeout; its console is above); 77 cannot run here (skip).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
say() { printf 'run-kernel-tests: %s\n' "$*" >&2; }
die() { printf 'run-kernel-tests: error: %s\n' "$*" >&2; exit 2; }
skip() { printf 'run-kernel-tests: skip: %s\n' "$*" >&2; exit 77; }

kernel=""
timeout_s=${MESHLET_VM_TIMEOUT:-1800}  # 30 min: emulated (no nested KVM), the 6.1 run takes ~14 min idle
accel=${MESHLET_VM_ACCEL:-auto}
memory=${MESHLET_VM_MEMORY:-2048}
while [ $# -gt 0 ]; do
  case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [ $# -gt 0 ]; then pytest_args=("$@"); else pytest_args=(-m kernel tests/vm/kernel tests/kernel/datapath); fi
case $accel in auto|kvm|tcg) ;; *) die "--accel must be auto, kvm or tcg, not $accel" ;; esac

# --- prerequisites -------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (the tests inside the VM load eBPF programs; qemu shares / with passthrough ownership)"
qemu=$(command -v qemu-system-x86_64) || skip "qemu-system-x86_64 is not installed (WITH_VM=1 scripts/setup.sh installs it)"
if [ "$accel" != tcg ] && [ ! -c /dev/kvm ]; then
  skip "no /dev/kvm on this machine: the kernel-matrix VM needs KVM (--accel tcg runs it emulated, slowly)"
fi
busybox=/bin/busybox
{ [ -x "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1; } || skip "$busybox is missing or not static (install busybox-static)"
if [ -z "$kernel" ]; then
  kernel=$(find /boot -maxdepth 1 -name "vmlinuz-6.1.*" | sort -V | tail -n1)
  [ -n "$kernel" ] || skip "no /boot/vmlinuz-6.1.* (Debian 12's kernel: apt-get install linux-image-amd64, or WITH_VM=1 scripts/setup.sh)"
fi
[ -r "$kernel" ] || die "cannot read the kernel image $kernel"
kver=${kernel##*/vmlinuz-}
modules=/lib/modules/$kver
[ -f "$modules/modules.dep" ] || die "no modules for $kver in $modules (install linux-image-$kver, not only its vmlinuz)"
python=$repo/.venv/bin/python
[ -x "$python" ] || die "no $python (run scripts/setup.sh first)"

# Headers for the VM's kernel: bcc compiles against /lib/modules/$kver/build inside the VM, which is
# this host's tree. Debian splits them into linux-headers-$kver (arch) and -common (source).
if [ ! -e "$modules/build/include/generated/autoconf.h" ]; then
  arch_dir=/usr/src/linux-headers-$kver
  if [ ! -d "$arch_dir" ]; then
    command -v apt-get >/dev/null || die "no $arch_dir: install the headers of $kver by hand"
    say "installing linux-headers-$kver for the VM's kernel"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "linux-headers-$kver" >/dev/null \
      || die "apt-get install linux-headers-$kver failed (an image without its headers? install linux-headers-amd64 with linux-image-amd64)"
  fi
  common_dir=${arch_dir%-amd64}-common
  [ -d "$common_dir" ] || die "missing $common_dir (the -common half of the headers)"
  ln -sfn "$arch_dir" "$modules/build"
  ln -sfn "$common_dir" "$modules/source"
  say "linked $modules/build -> $arch_dir (headers for the VM's kernel)"
fi

# --- the initramfs: busybox, the 9p modules, stage 1 ----------------------------------------------
work=$(mktemp -d /tmp/meshlet-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/initramfs/bin" "$work/initramfs/modules" "$work/results"
cp "$busybox" "$work/initramfs/bin/busybox"
cp "$repo/scripts/vm/initramfs-init" "$work/initramfs/init"
echo "$repo/scripts/vm/guest-run.sh" > "$work/initramfs/guest-run"
# modprobe prints the insmod lines in load order (dependencies first); modules built into the
# kernel print "builtin" and need nothing. One module per call: later words would be parameters.
for m in virtio_pci 9pnet_virtio 9p; do modprobe -S "$kver" --show-depends "$m"; done | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++' \
  | while read -r ko; do
      name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
      case $ko in
        *.xz) xz -dc "$ko" > "$work/initramfs/modules/$name" ;;
        *.zst) zstd -qdc "$ko" > "$work/initramfs/modules/$name" ;;
        *) cp "$ko" "$work/initramfs/modules/$name" ;;
      esac
      echo "$name" >> "$work/initramfs/modules/modules.order"
    done
touch "$work/initramfs/modules/modules.order"
(cd "$work/initramfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.cpio.gz"

# --- boot ----------------------------------------------------------------------------------------
# No network device (-nic none): nothing a test sends can leave the VM. The host's / is shared
# read-only; only $work/results is writable, and it is deleted on exit.
vm() {  # vm ACCEL SECONDS EXTRA-KERNEL-ARGS
  local cpu=max
  [ "$1" = kvm ] && cpu=host
  timeout --kill-after=10 "$2" "$qemu" -accel "$1" -cpu "$cpu" -smp "$(nproc)" -m "$memory" \
    -display none -serial stdio -monitor none -no-reboot -nic none \
    -kernel "$kernel" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 $3" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap" \
    -virtfs "local,path=$work/results,mount_tag=results,security_model=passthrough" </dev/null
}

if [ "$accel" = auto ]; then
  # A kernel that does not reach userspace in 30 s under KVM never will at a useful speed.
  # The console goes to a file, then grep reads it: in a pipe, `grep -q` leaving at the first match
  # gets qemu a SIGPIPE, and pipefail would turn a boot that worked into "KVM did not boot".
  vm kvm 30 meshlet.probe > "$work/probe.log" 2>&1 || true
  if grep -q "meshlet-vm: probe booted" "$work/probe.log"; then
    accel=kvm
  else
    say "KVM did not boot $kver within 30 s (nested virtualization without working acceleration?): using TCG emulation"
    accel=tcg
  fi
fi

{
  printf 'REPO=%q\n' "$repo"
  printf 'JOB=(env MESHLET_REQUIRE_KERNEL=%q %q -m pytest -p no:cacheprovider --color=no' "${MESHLET_REQUIRE_KERNEL:-1}" "$python"
  printf ' %q' "${pytest_args[@]}"
  printf ')\n'
} > "$work/results/job"

say "booting $kernel ($accel, $(nproc) CPUs, ${memory} MiB, timeout ${timeout_s} s): pytest ${pytest_args[*]}"
start=$SECONDS
vm "$accel" "$timeout_s" "" || true
if [ ! -f "$work/results/rc" ]; then
  printf 'run-kernel-tests: error: the VM gave no result after %s s (timeout %s s, or it crashed: see its console above)\n' \
    "$((SECONDS - start))" "$timeout_s" >&2
  exit 3
fi
rc=$(cat "$work/results/rc")
say "kernel $kver: pytest exit code $rc after $((SECONDS - start)) s"
[ "$rc" = 0 ] && exit 0
[ "$rc" = 5 ] && { say "no test was collected inside the VM"; exit 1; }
exit 1
