#!/bin/bash
# Stage 2 of the kernel-matrix VM: PID 1 after switch_root, on the host's filesystem (read-only,
# over 9p). Mounts what a node has (proc, sys, devtmpfs, a pure cgroup2 hierarchy at
# /sys/fs/cgroup, bpffs at /sys/fs/bpf) and tmpfs where the tests write (/tmp, /run, /var/tmp),
# with the checkout kept visible wherever it lies (also under /tmp), then runs the job the host
# wrote to the results share and leaves its exit code there.
# Invariants: nothing here writes the host's filesystem except the results directory the host made
# for this run; the VM has no network device, so test traffic cannot leave it; the VM always
# powers off, whatever happens.
set -u
results=/run/meshlet-vm
say() { printf 'meshlet-vm: %s\n' "$*"; }
# reboot(2) straight away (busybox -f): there is no init system to ask, and PID 1 must not exit.
power_off() { sync; /bin/busybox poweroff -f; }
trap power_off EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# The checkout may lie under a directory the tmpfs mounts below cover (a clone in /tmp, say): keep
# a handle on it first (a bind mount on devtmpfs, the only writable place yet), and bind it back
# at its own path on top of the tmpfs, so the paths the host wrote (REPO, the venv, the editable
# install) resolve inside the VM as on the host.
checkout=$(cd "$(dirname "$0")/../.." && pwd)
handle=/dev/meshlet-checkout
mkdir -p "$handle" && mount --bind "$checkout" "$handle" || { say "cannot bind $checkout"; exit 1; }
for dir in /tmp /run /var/tmp /root; do mount -t tmpfs -o mode=1777 tmpfs "$dir"; done
if [ ! -e "$checkout/scripts/vm/guest-run.sh" ]; then
  mkdir -p "$checkout" && mount --bind "$handle" "$checkout" || { say "cannot bind $checkout back"; exit 1; }
fi
umount "$handle" && rmdir "$handle"
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p "$results"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "$results" || { say "cannot mount the results share"; exit 1; }
ip link set lo up
say "kernel $(uname -r), cgroup2 at /sys/fs/cgroup, bpffs at /sys/fs/bpf"

# The job: REPO, and JOB (an array: the command to run from REPO), written by run-kernel-tests.sh.
# shellcheck source=/dev/null
source "$results/job"
headers=/lib/modules/$(uname -r)/build
[ -e "$headers/include/generated/autoconf.h" ] || say "warning: no kernel headers at $headers (bcc cannot compile)"
cd "$REPO" || exit 1
# The host tree is read-only: no bytecode files, no pytest cache; HOME is the VM's tmpfs.
export MESHLET_IN_VM=1 HOME=/root PYTHONDONTWRITEBYTECODE=1 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say "running: ${JOB[*]}"
"${JOB[@]}"
rc=$?
echo "$rc" > "$results/rc"
say "exit code $rc"
