"""Kernel UAPI numbers meshlet uses, in one place (include/uapi/linux/bpf.h).

Role: the enums of the bpf(2) interface as plain constants: commands, map types, map flags,
program types, the attach types of our hooks, and the helper ids the feature probe calls. Pure
(no I/O): bpfsys issues the calls, layout names each map's type, loader and features load and
attach programs, all with these numbers. A number the kernel defines lives here and nowhere else.
"""

from __future__ import annotations

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
BTF_LOAD = 18
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

# enum bpf_map_type (the ones meshlet creates or checks)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERF_EVENT_ARRAY = 4
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_SK_STORAGE = 24
MAP_TYPE_RINGBUF = 27

#: For messages: "type array (expected hash)", never a bare number for a type we know.
MAP_TYPE_NAMES = {
    MAP_TYPE_HASH: "hash",
    MAP_TYPE_ARRAY: "array",
    MAP_TYPE_PERF_EVENT_ARRAY: "perf_event_array",
    MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    MAP_TYPE_LRU_HASH: "lru_hash",
    MAP_TYPE_SK_STORAGE: "sk_storage",
    MAP_TYPE_RINGBUF: "ringbuf",
}

# map_flags
BPF_F_NO_PREALLOC = 1
BPF_F_MMAPABLE = 1024
# BPF_MAP_UPDATE_ELEM flags
BPF_ANY = 0

# enum bpf_prog_type
PROG_TYPE_CGROUP_SOCK_ADDR = 18

#: hook (= program function name in sock.c = link pin name = kernel feature name) -> enum
#: bpf_attach_type. A kernel may lack some (features.py): Support.hooks are the ones loaded.
HOOKS: dict[str, int] = {
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "sendmsg6": 15,  # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg4": 19,  # BPF_CGROUP_UDP4_RECVMSG
    "recvmsg6": 20,  # BPF_CGROUP_UDP6_RECVMSG
    "getpeername4": 29,  # BPF_CGROUP_INET4_GETPEERNAME
    "getpeername6": 30,  # BPF_CGROUP_INET6_GETPEERNAME
    "sockops": 3,  # BPF_CGROUP_SOCK_OPS: passive health (SEMANTICS A17)
}

PROG_TYPE_SOCK_OPS = 13

#: hook -> program type, for the hooks that are not sock_addr programs.
HOOK_PROG_TYPES: dict[str, int] = {"sockops": PROG_TYPE_SOCK_OPS}


def prog_type(hook: str) -> int:
    """The program type of a hook's program."""
    return HOOK_PROG_TYPES.get(hook, PROG_TYPE_CGROUP_SOCK_ADDR)

# enum bpf_func_id (the helpers the feature probe calls)
HELPER_PERF_EVENT_OUTPUT = 25
HELPER_SK_STORAGE_GET = 107
HELPER_GET_NETNS_COOKIE = 122
HELPER_GET_CURRENT_ANCESTOR_CGROUP_ID = 123
HELPER_SET_RETVAL = 187
HELPER_SOCK_OPS_CB_FLAGS_SET = 59
# bpf_sk_storage_get flags
SK_STORAGE_GET_F_CREATE = 1
