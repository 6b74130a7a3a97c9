#!/bin/sh
# The container image's entrypoint: `meshlet ARGS...` after a preflight, or the DaemonSet's
# node-init step.
#
#   entrypoint.sh run ...          checks the kernel headers bcc needs, then execs `meshlet run ...`
#   entrypoint.sh COMMAND ...      execs `meshlet COMMAND ...` (maps, explain, uninstall, --help)
#   entrypoint.sh node-init --bpffs-mount=DIR --cgroup-root=DIR
#                                  mounts bpffs on DIR if it is not one, and checks that the cgroup
#                                  root is a cgroup2 mount (the host's, mounted by hostPath)
#
# It explains what is missing on the node in one paragraph and exits 1, instead of letting a
# compiler error or a traceback say it. It changes nothing on the node except the bpffs mount.
# MESHLET_KERNEL_RELEASE overrides `uname -r` (tests use it).
set -eu
meshlet=${MESHLET_BIN:-/opt/meshlet/venv/bin/meshlet}
release=${MESHLET_KERNEL_RELEASE:-$(uname -r)}
modules_dir=${MESHLET_MODULES_DIR:-/lib/modules}

fail() { printf 'meshlet: %s\n' "$*" >&2; exit 1; }

preflight_headers() {
    build=$modules_dir/$release/build
    if [ -e "$build/include/linux/kconfig.h" ] || [ -e "$build/include/generated/autoconf.h" ]; then
        return 0
    fi
    if [ -L "$build" ]; then
        fail "the kernel headers link $build points at $(readlink "$build"), which is not in the container.
  Mount that directory from the node read-only at the same path (the DaemonSet mounts /usr/src)."
    fi
    fail "no kernel headers for Linux $release on this node ($build is missing).
  meshlet compiles its eBPF programs with bcc against the running kernel's headers.
  Install them on the node, then restart this pod:
    Debian/Ubuntu: apt-get install linux-headers-$release
    Fedora/RHEL:   dnf install kernel-devel-$release
  The DaemonSet mounts the node's /lib/modules and /usr/src read-only for this."
}

fs_type() { stat -f -c %T "$1" 2>/dev/null || echo missing; }

node_init() {
    bpffs=/sys/fs/bpf cgroup_root=/run/meshlet/cgroup
    for arg in "$@"; do
        case $arg in
            --bpffs-mount=*) bpffs=${arg#*=} ;;
            --cgroup-root=*) cgroup_root=${arg#*=} ;;
            *) fail "node-init: unknown argument $arg" ;;
        esac
    done
    if [ "$(fs_type "$bpffs")" != bpf_fs ]; then
        mkdir -p "$bpffs"
        mount -t bpf bpf "$bpffs" || fail "cannot mount bpffs on $bpffs (kernel without CONFIG_BPF_SYSCALL, or the container is not privileged)"
        echo "meshlet: node-init: mounted bpffs on $bpffs"
    fi
    case $(fs_type "$cgroup_root") in
        cgroup2fs) ;;
        *)
            if [ "$(fs_type "$cgroup_root/unified")" = cgroup2fs ]; then
                fail "node-init: this node mounts cgroup2 at /sys/fs/cgroup/unified (hybrid cgroups).
  Pass --cgroup-root=$cgroup_root/unified to the agent (kustomize patch on daemonset.yaml),
  or boot the node with cgroup v2 only (systemd.unified_cgroup_hierarchy=1)."
            fi
            fail "node-init: $cgroup_root is not a cgroup2 mount: meshlet's socket hooks need cgroup v2.
  Mount the host's cgroup2 hierarchy there (the DaemonSet's hostPath /sys/fs/cgroup does on cgroup v2 nodes)."
            ;;
    esac
    echo "meshlet: node-init: bpffs on $bpffs, cgroup2 root at $cgroup_root"
}

case ${1:-} in
    node-init) shift; node_init "$@"; exit 0 ;;
    run) preflight_headers ;;
esac
exec "$meshlet" "$@"
