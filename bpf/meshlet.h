/* meshlet.h: the maps shared by the socket programs (bpf/sock.c) and the agent.
 *
 * One home per map layout: every struct here has exactly one ctypes mirror in
 * agent/datapath/layout.py (with this definition quoted), and a kernel test compares the sizes
 * and field offsets bcc compiled against that mirror. Change a struct => bump LAYOUT_VERSION in
 * layout.py (the pins live under <bpffs>/v<LAYOUT_VERSION>/maps, so old pins are never
 * misread).
 *
 * Rules every struct follows: explicit padding only (no hole the compiler fills), so a key
 * built in Python and one built on the BPF stack (zeroed with __builtin_memset) hash alike.
 * Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so one key serves an
 * AF_INET socket and an AF_INET6 socket aimed at the mapped address (SEMANTICS A13).
 * Ports are in network byte order (as the socket hook context holds them); ids, counts and
 * thresholds are in host order.
 *
 * Configuration comes only from -D flags set by agent/datapath/loader.py:
 *   PIN_DIR            "<bpffs>/v<N>/maps" (a C string)      where every map is pinned
 *   CGROUP_ROOT_LEVEL  depth of --cgroup-root below the cgroup2 mount
 *   <MAP>_MAX          max_entries of each sized map (MapSizes)
 */
#ifndef MESHLET_H
#define MESHLET_H

#define MAX_SLOTS 16      /* backend groups in one frontend's weighted split */
#define SOCK_XLATS 8      /* remembered translations per socket (see struct sock_state) */
#define NAME_LEN 96       /* bytes of a human name in the names map */
#define MAX_POD_DEPTH 8   /* cgroup levels below the root searched for a pod cgroup */
#define TRACE_RING_BYTES 262144 /* ring buffer of trace events: ~2700 decisions in flight */
#define EJECT_SLOTS 8     /* endpoints of one set that passive health may skip at once */
#define FE_FILTER_BITS_LOG2 20 /* the frontend filter (fe_filter): 2^20 bits, 128 KiB */
#define FE_FILTER_WORDS (1 << (FE_FILTER_BITS_LOG2 - 6)) /* its 64-bit words */
#define EJECT_FILTER_SLOTS_LOG2 13 /* the ejected-sets filter (eject_filter): 8192 flags, 64 KiB */

_Static_assert((SOCK_XLATS & (SOCK_XLATS - 1)) == 0, "SOCK_XLATS is a power of two (slot mask)");
_Static_assert(MAX_SLOTS <= 255, "fe_value.nslots is a __u8");

/* Verdicts: the values of agent.model.Verdict (layout.py asserts they agree). */
#define VERDICT_FORWARD 0
#define VERDICT_REJECT 1
#define VERDICT_UNREACHABLE 2
#define VERDICT_NO_GROUP 255 /* fe_slot only: the share's group had no plan (connect counts OUT_MISS) */

/* fe_value.flags */
#define FE_HAS_SCOPES 1   /* default entry: consumer-scope entries exist for this frontend */

/* client_value.flags */
#define CLIENT_SKIP 1     /* namespace or pod opted out (SEMANTICS C2): never translated */

/* group_value.flags */
#define GROUP_PASSIVE_HEALTH 1 /* watch its TCP handshakes; skip its ejected endpoints (A17) */

/* Passive health (SEMANTICS A17; bpf/sock.c, the sockops program): HEALTH_FAILURES consecutive
 * failed handshakes eject an endpoint for HEALTH_BACKOFF_NS, doubled at each further ejection
 * without a success in between, capped at HEALTH_BACKOFF_MAX_NS. */
#define HEALTH_FAILURES 3
#define HEALTH_BACKOFF_NS 1000000000     /* used as __u64 */
#define HEALTH_BACKOFF_MAX_NS 30000000000 /* used as __u64 */
#define HEALTH_MAX_DOUBLINGS 5 /* 1 s << 5 = 32 s > the cap: more doublings change nothing */

/* Index of the per-CPU passive health counters (health_stats). */
#define HSTAT_EJECTIONS 0  /* an endpoint was ejected (or its ejection renewed after its back-off) */
#define HSTAT_CAPPED 1     /* a failure passed through: half its set (or EJECT_SLOTS) already ejected */
#define HSTAT_FAILURES 2   /* translated handshakes that failed (reset, timeout, given up late) */
#define HSTAT_SUCCESSES 3  /* translated handshakes that completed */
#define HSTAT_COUNT 4

/* config_value.flags */
#define CONFIG_CLIENT_SKIPS 1 /* some client entry has CLIENT_SKIP: every translation looks */

/* Outcomes of a translation (bpf/sock.c): what the helpers return, the index of the per-CPU
 * outcome counters, and the verdict of a trace event. Every translation of a frontend ends in
 * exactly one. */
#define OUT_TRANSLATED 0  /* rewritten to an endpoint (from a helper: "an endpoint was chosen") */
#define OUT_REJECTED 1    /* fails with ECONNREFUSED */
#define OUT_UNREACHABLE 2 /* fails with EHOSTUNREACH */
#define OUT_SKIPPED 3     /* client opted out: left untouched */
#define OUT_MISS 4        /* frontend hit but a group/endpoint entry was missing: a bug if >0 */
#define COUNT_REPICKED 5  /* a counter, not an outcome (counted besides one): an unconnected UDP
                           socket's remembered endpoint was no longer usable, it picked again (A16) */
#define OUT_COUNT 8       /* array size: room for outcomes added later without a new layout */

/* decision.kind: which call a translation decided for. */
#define DECISION_CONNECT 1    /* connect() (TCP, connected UDP) */
#define DECISION_DATAGRAM 2   /* an unconnected UDP socket's first datagram to a frontend */
#define DECISION_REMEMBERED 3 /* a later datagram reusing the socket's choice: counted, not traced */

/* One decision of translate() in bpf/sock.c: filled in while it decides, then counted (and,
 * when tracing, sent to user space) in one place. Addresses as in fe_key; ports network order. */
struct decision {
    __u64 time_ns;        /* bpf_ktime_get_ns() */
    __u64 cgroup_id;      /* the client task's cgroup */
    __u64 netns_cookie;   /* the client's network namespace */
    __u64 route_id;       /* the frontend entry's route rule (names map), 0 = none */
    __u64 group_id;       /* the backend group chosen, 0 = none (yet) */
    __u8 frontend[16];
    __u8 endpoint[16];    /* set when an endpoint was chosen */
    __u16 frontend_port;
    __u16 endpoint_port;
    __u32 scope;          /* the view used: 0 = default, else the consumer namespace's scope */
    __u8 proto;
    __u8 kind;            /* DECISION_* */
    __u8 outcome;         /* OUT_* */
    __u8 pad;
    __u32 err;            /* errno the call fails with, 0 = none */
};

/* trace_control: one entry (index 0), written by `meshlet trace` (agent/datapath/trace.py).
 * Tracing is on while bpf_ktime_get_ns() < expires_ns: the trace renews it every second, so one
 * that was killed stops within its lease (TRACE_LEASE_S in trace.py). Filters run in the kernel, so a
 * busy node sends user space only the decisions asked for; events that find the ring buffer
 * full are counted in `dropped` (and shown), never waited for. */
#define TRACE_MATCH_FRONTEND 1 /* trace_control.flags: only decisions for `frontend` */
#define TRACE_MATCH_CLIENT 2   /* only clients inside cgroup `client_cgroup` (at `client_level`) */

struct trace_control {
    __u64 expires_ns;     /* bpf_ktime_get_ns() clock; 0 = off */
    __u64 dropped;        /* events lost to a full ring buffer (atomic add) */
    __u64 client_cgroup;  /* TRACE_MATCH_CLIENT: the pod's cgroup id */
    __u8 frontend[16];    /* TRACE_MATCH_FRONTEND: the address */
    __u16 frontend_port;  /* network order; 0 = any port */
    __u8 proto;           /* 0 = any protocol */
    __u8 pad;
    __u32 outcomes;       /* bit (1 << OUT_*) set = traced */
    __u32 flags;          /* TRACE_MATCH_* */
    __u32 client_level;   /* TRACE_MATCH_CLIENT: level of client_cgroup below the cgroup2 root */
};

/* frontends: (address, port, protocol, client scope) -> the whole weighted split.
 * scope 0 = the default (producer) view; else the 32-bit id of the consumer namespace. */
struct fe_key {
    __u8 addr[16];
    __u16 port;
    __u8 proto;           /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
    __u8 pad;
    __u32 scope;
};

/* One share of the split: connections with r < threshold (and >= the previous slot's
 * threshold) go to group_id; r is uniform in [0, 2^31). group_id 0 = rejected share.
 * The rest is a copy of the group's value (struct group_value) as the agent last wrote it:
 * a connect picks its endpoint from the slot alone, without a lookup in `groups` (one random
 * memory access less per connect; at 10k Services each one costs hundreds of ns). The agent
 * rewrites every frontend naming a group when the group's value changes, after the group and
 * before the old set's deletion (agent/datapath/reconcile.py), so the copy never names a set
 * that is gone. `groups` stays the home of the current set for still_usable() (A16), sockops
 * and `meshlet maps dump`. */
struct fe_slot {
    __u32 threshold;
    __u32 count;          /* group_value.count */
    __u64 group_id;
    __u64 set_id;         /* group_value.set_id */
    __u32 affinity_timeout_s; /* group_value.affinity_timeout_s */
    __u8 verdict;         /* group_value.verdict, or VERDICT_NO_GROUP */
    __u8 flags;           /* group_value.flags */
    __u8 pad[2];
};

/* fe_filter: array of FE_FILTER_WORDS __u64, the frontends map's keys in a one-hash Bloom
 * filter: bit fe_filter_bit(address, port, protocol) (bpf/sock.c; its Python mirror is
 * agent/datapath/entries.py fe_filter_bit) is set while an entry of the frontends map, of any
 * scope, has that address, port and protocol. A connect to anything else (every non-Service
 * connection on the node) then pays one bit test in these 128 KiB instead of a lookup in the
 * frontends hash map (at 10k Services a random access into its MiB-sized bucket array:
 * hundreds of ns). 2^20 bits: at 50k Services (~55k distinct frontends) ~5 % of other
 * addresses share a bit with a frontend and pay the lookup as before; 1 % at 10k. Written only by the agent (agent/datapath/reconcile.py): a
 * bit is set before its frontend entry is written and cleared after the last entry with it is
 * deleted, so a frontend in the map never finds its bit clear; a bit set for an address that
 * is no frontend only costs the lookup it saves. */

/* Inline split: swapping a frontend's split is one atomic map update. */
struct fe_value {
    __u8 verdict;         /* VERDICT_FORWARD, or VERDICT_REJECT for an empty split */
    __u8 nslots;
    __u16 flags;          /* FE_HAS_SCOPES */
    __u32 pad;
    __u64 route_id;       /* id of the Route rule in effect (names map), 0 = none */
    struct fe_slot slots[MAX_SLOTS];
};

/* groups: group_id -> the current endpoint set revision of one Service port/family. */
struct group_value {
    __u64 set_id;         /* content-addressed revision of the endpoint set; 0 = empty */
    __u32 count;          /* endpoints in the set: indexes 0..count-1 */
    __u32 affinity_timeout_s; /* ClientIP affinity (SEMANTICS A11); 0 = none */
    __u8 verdict;
    __u8 flags;           /* GROUP_PASSIVE_HEALTH */
    __u8 pad[6];
};

/* endpoints: (set_id, index) -> endpoint. A set's entries never change once written. */
struct ep_key {
    __u64 set_id;
    __u32 index;
    __u32 pad;
};

struct ep_value {
    __u8 addr[16];
    __u16 port;
    __u8 family;          /* 4 or 6 */
    __u8 pad;
};

/* members: (set_id, endpoint) -> index; written only for groups with affinity, so the
 * affinity check can ask "is the remembered endpoint still in the current set". */
struct member_key {
    __u64 set_id;
    __u8 addr[16];
    __u16 port;
    __u8 pad[6];
};

/* affinity (LRU): (client netns cookie, group) -> last endpoint and when it was last used. */
struct affinity_key {
    __u64 netns_cookie;
    __u64 group_id;
};

struct affinity_value {
    __u8 addr[16];
    __u16 port;
    __u8 pad[6];
    __u64 last_used_ns;   /* bpf_ktime_get_ns() clock */
};

/* clients: pod-level cgroup id -> the pod's client scope. */
struct client_value {
    __u32 scope;          /* id of the pod's namespace (never 0) */
    __u32 flags;          /* CLIENT_SKIP */
};

/* config: one entry (index 0), node-wide facts the programs need. CONFIG_CLIENT_SKIPS lets a
 * connect skip the search for the client's pod (a walk down the task's cgroups with a helper
 * call and a hash lookup per level: 2-3 levels on a kubelet node) when its answer could change
 * nothing: the frontend has no consumer scopes and no pod on this node opted out. */
struct config_value {
    __u32 flags;          /* CONFIG_CLIENT_SKIPS */
    __u32 pad;
};

/* names: group / route / scope id -> human name; read only by `meshlet maps dump`. */
struct name_value {
    char name[NAME_LEN];
};

/* Socket-local storage: what this socket's translations were, so getpeername() and UDP
 * recvmsg() can show the frontend, and an unconnected UDP socket keeps its first choice per
 * frontend (SEMANTICS A10, A12) while that choice is still usable (A16): the group and its set
 * revision at the pick make the check one lookup when nothing changed. The agent reads these
 * values through sock_diag to find the sockets to terminate when their endpoint goes away
 * (agent/datapath/stale.py). Lives and dies with the socket: nothing to evict or sweep. */
struct sock_xlat {
    __u8 frontend[16];
    __u8 endpoint[16];
    __u16 frontend_port;
    __u16 endpoint_port;
    __u8 used;
    __u8 pad[3];
    __u32 scope;          /* the frontend view the pick used: 0 default, else the consumer scope */
    __u32 pad2;
    __u64 group_id;       /* the group the endpoint was picked from */
    __u64 set_id;         /* that group's endpoint set revision at the pick */
};

/* Passive health: which endpoint a TCP connect picked, for the sockops program to credit the
 * handshake's outcome to (set by connect for groups with GROUP_PASSIVE_HEALTH, cleared once the
 * outcome is known). */
struct sock_watch {
    __u64 set_id;         /* the endpoint set picked from; 0 = outcome not watched */
    __u32 index;          /* the endpoint's index in it */
    __u32 count;          /* the set's size (the "half" of the ejection cap) */
};

/* When all SOCK_XLATS entries are used (an unconnected UDP socket talking to more than 8
 * frontends), the oldest entry is overwritten (round robin on `next`): that frontend then
 * gets a fresh pick on its next datagram, and replies from the forgotten endpoint are no
 * longer shown as the frontend. 8 covers every real client we know of (DNS resolvers use
 * at most a handful of servers). */
struct sock_state {
    struct sock_xlat xlat[SOCK_XLATS];
    __u32 next;
    __u32 pad;
    struct sock_watch watch;
};

/* health (LRU): endpoint -> its recent handshake outcomes, node-wide (one client's failures
 * protect every client). Written only by the sockops program; a success deletes the entry, so
 * only endpoints failing lately hold one. LRU, not a plain hash: the kernel creates these
 * entries and nobody sweeps them; when full, the least recently touched record is forgotten
 * (that endpoint then needs HEALTH_FAILURES fresh failures), never a new failure refused. */
struct health_key {
    __u8 addr[16];
    __u16 port;
    __u8 pad[6];
};

struct health_value {
    __u32 failures;       /* consecutive failed handshakes since the last ejection or success */
    __u32 ejections;      /* ejections since the last success: the next back-off is 1 s << this */
    __u64 until_ns;       /* ejected until (bpf_ktime_get_ns clock); in the past = not now */
};

/* ejections (LRU): endpoint set -> the endpoints of that set skipped now. The cap, enforced
 * by the only writer (sockops): at most min(count / 2, EJECT_SLOTS) slots active, count being
 * the set's size, so at least half of a set is always picked from and a whole outage passes
 * through as the endpoints' own errors. A slot is active while until_ns is in the future:
 * expiry needs no writer. Keyed by set revision: indexes mean something only within one set.
 * The sockops program replaces the whole value (never writes in place), each value it writes
 * within the cap: two CPUs ejecting in one set at once can lose one of the ejections (the last
 * write wins; that endpoint's next failure ejects it), never pass the cap. Connect guards
 * against a torn read of a reused LRU element (an index found out of range is ignored). */
struct eject_slot {
    __u32 index;          /* the endpoint's index in the set */
    __u32 pad;
    __u64 until_ns;       /* skipped until (bpf_ktime_get_ns clock) */
};

struct set_ejections {
    struct eject_slot slot[EJECT_SLOTS];
};

/* eject_filter: array of 2^EJECT_FILTER_SLOTS_LOG2 __u64 flags, entry eject_filter_slot(set_id)
 * (bpf/sock.c) set to 1 by sockops before it writes an ejection of that set, never cleared. A
 * connect into a group with passive health looks up its set's ejections only when the flag is
 * set: while no endpoint of the set was ever ejected (the usual case) it pays one read of this
 * small array instead of a random access into the ejections LRU hash. Flags of sets that
 * recovered, that an endpoint change replaced (a new set id) or that share a slot only cost
 * that lookup again. One flag per entry, not bits in a word: a plain store of 1 cannot lose a
 * concurrent one (an atomic OR would need Linux 5.12; sockops runs from 5.10). Never written
 * by the agent. */

#endif /* MESHLET_H */
