/* sock.c: meshlet's cgroup socket-address programs (compiled by bcc at agent start).
 *
 * connect4/6 and sendmsg4/6 (unconnected UDP) rewrite a destination that is a Service frontend
 * to an endpoint chosen here: a weighted pick among the frontend's backend groups, then an
 * endpoint inside the group (uniform, or ClientIP affinity keyed by the client's netns cookie).
 * recvmsg4/6 and getpeername4/6 show the frontend instead of the endpoint (SEMANTICS A12).
 * sockops (the cgroup sock_ops hook) learns how the handshake of each TCP connection translated
 * here ended and ejects endpoints that keep failing (passive health, SEMANTICS A17; at the end).
 *
 * Cost model: traffic to an address that is not a frontend pays one bit test in a small array
 * (fe_filter in meshlet.h) and nothing else, or one hash lookup when its bit is shared with a
 * frontend. Only after the frontends lookup hits do we look for the client's pod (cgroup walk, and only when
 * a consumer scope or an opt-out could change the answer), and the socket's storage is created
 * only once an endpoint is chosen (its allocation is the largest single cost of a translated
 * connect: bench/RESULTS.md, issue 16). The pick itself needs the frontend value (whose slots carry a copy of each group's value: no groups
 * lookup) and one endpoints lookup: at 10k Services every lookup in a big map is a random
 * memory access costing hundreds of ns, so lookups are what we count. A pick in
 * a group with passive health adds one read of a small array (eject_filter: was an endpoint of
 * its set ever ejected?), the lookup of the set's ejections only when it was, and, for TCP, 16 bytes written
 * to the socket's storage for sockops. A later datagram of an unconnected UDP socket checks that its remembered endpoint is still usable (SEMANTICS
 * A16): one lookup of its group while the set revision is unchanged, a members lookup when it
 * moved (see still_usable). A connected UDP socket's connect() also writes its translation to
 * udp_flows (by socket cookie), where the agent finds the ones to end when their endpoint goes.
 *
 * Consistency: the agent never modifies a value in place. A frontend's whole split (with the
 * copies of its groups' values) is one map value, a group's current endpoint set is one value
 * (set_id, count), and the maps holding them are BPF_F_NO_PREALLOC hashes, whose replaced
 * elements are freed after an RCU grace period: a program holding a value pointer sees the old
 * value or the new one, never a mix. The agent writes a new endpoint set before the group value
 * and the frontend values that name it, and deletes the old set only after
 * (agent/datapath/reconcile.py), so a connect never meets a half set.
 *
 * Outcomes (OUT_* in meshlet.h): translated; rejected (ECONNREFUSED: empty split, rejected
 * share, group without endpoints); unreachable (EHOSTUNREACH: endpoints exist but none usable
 * on this node); skipped (client opted out); miss (an entry the agent should have written is
 * absent: the connection is left untouched and counted, never failed with an unexplained EPERM).
 * The helpers return these codes (OUT_TRANSLATED from a helper means "chosen, go on"), and
 * every translation of a frontend ends in conclude(), the one place outcomes are counted.
 * recvmsg and getpeername programs must return 1 and never fail.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/asm-generic/errno.h>
#include <linux/socket.h>
#include "meshlet.h"

#ifndef PIN_DIR
#error "PIN_DIR (the directory for the map pins) must be given with -D by the loader"
#endif
#ifndef CGROUP_ROOT_LEVEL
#error "CGROUP_ROOT_LEVEL must be given with -D by the loader"
#endif

BPF_TABLE_PINNED("hash", struct fe_key, struct fe_value, frontends, FRONTENDS_MAX,
                 PIN_DIR "/frontends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, __u64, fe_filter, FE_FILTER_WORDS, PIN_DIR "/fe_filter");
BPF_TABLE_PINNED("hash", __u64, struct group_value, groups, GROUPS_MAX,
                 PIN_DIR "/groups", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ep_key, struct ep_value, endpoints, ENDPOINTS_MAX,
                 PIN_DIR "/endpoints", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct member_key, __u32, members, MEMBERS_MAX,
                 PIN_DIR "/members", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, affinity, AFFINITY_MAX,
                 PIN_DIR "/affinity");
BPF_TABLE_PINNED("hash", __u64, struct client_value, clients, CLIENTS_MAX,
                 PIN_DIR "/clients", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, counters, OUT_COUNT, PIN_DIR "/counters");
BPF_TABLE_PINNED("array", __u32, struct config_value, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("hash", __u64, struct name_value, names, NAMES_MAX,
                 PIN_DIR "/names", BPF_F_NO_PREALLOC);
#if defined(HAVE_RINGBUF) || defined(TRACE_PERF_BUFFER)
#define HAVE_TRACE 1
/* `meshlet trace`: its switch and filters, and the channel of decisions (struct decision): the
 * ring buffer where the kernel has one, else a perf event array (the loader says which:
 * features.Support.trace_channel). The control map is mmapable: the trace renews its lease by
 * writing expires_ns in place, and the kernel's atomic `dropped` is never overwritten by a
 * whole-value update. Both channels are declared the way bcc's BPF_RINGBUF_OUTPUT and
 * BPF_PERF_OUTPUT do, pinned like the others. */
BPF_TABLE_PINNED("array", __u32, struct trace_control, trace_control, 1, PIN_DIR "/trace_control",
                 BPF_F_MMAPABLE);
#endif
#ifdef HAVE_RINGBUF
struct trace_events_table_t {
    int key;
    __u32 leaf;
    int (*ringbuf_output)(void *, __u64, __u64);
    __u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/trace_events")))
struct trace_events_table_t trace_events = {.max_entries = TRACE_RING_BYTES};
#elif defined(TRACE_PERF_BUFFER)
/* One perf buffer per CPU, opened by `meshlet trace` (its fds are the array's values); bcc sizes
 * the array to the possible CPUs. */
struct trace_perf_table_t {
    int key;
    __u32 leaf;
    int (*perf_submit)(void *, void *, __u32);
    int (*perf_submit_skb)(void *, __u32, void *, __u32);
    __u32 max_entries;
};
__attribute__((section("maps/perf_output:" PIN_DIR "/trace_perf")))
struct trace_perf_table_t trace_perf = {.max_entries = 0};
#endif

/* Socket-local storage, pinned too: a restarted or upgraded agent's programs keep reading
 * the translations of sockets opened before. */
BPF_TABLE_PINNED("sk_storage", int, struct sock_state, sockets, 0,
                 PIN_DIR "/sockets", BPF_F_NO_PREALLOC);
/* Passive health (SEMANTICS A17): see struct health_value and struct set_ejections. */
BPF_TABLE_PINNED("lru_hash", struct health_key, struct health_value, health, HEALTH_MAX,
                 PIN_DIR "/health");
BPF_TABLE_PINNED("lru_hash", __u64, struct set_ejections, ejections, EJECTIONS_MAX,
                 PIN_DIR "/ejections");
BPF_TABLE_PINNED("array", __u32, __u64, eject_filter, 1 << EJECT_FILTER_SLOTS_LOG2,
                 PIN_DIR "/eject_filter");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, health_stats, HSTAT_COUNT, PIN_DIR "/health_stats");
/* Connected UDP sockets we translated, by socket cookie: the agent finds the ones whose endpoint
 * went away and destroys them (SEMANTICS A16). Not the socket storage: a sock_diag dump returns
 * socket storage for TCP sockets only, and a UDP socket's cookie is what a dump does give.
 * LRU: closed sockets' entries age out; an evicted live one only escapes termination. */
BPF_TABLE_PINNED("lru_hash", __u64, struct sock_xlat, udp_flows, UDP_FLOWS_MAX,
                 PIN_DIR "/udp_flows");

/* bcc declares it returning u32; the kernel returns 64 bits (cookies are 64-bit counters). */
static __u64 (*bpf_get_socket_cookie64)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define MAPPED_V4_WORD 0xffff0000U /* bytes 00 00 ff ff: word 2 of ::ffff:a.b.c.d */
#else
#define MAPPED_V4_WORD 0x0000ffffU
#endif

/* An address as four 32-bit words in network byte order, the way the hook context holds it. */
struct addr16 {
    __u32 w[4];
};

static __always_inline void count(__u32 outcome)
{
    __u64 *c = counters.lookup(&outcome);
    if (c)
        *c += 1;
}

/* The user-given address (destination for connect/sendmsg, source for recvmsg, peer for
 * getpeername) as 16 bytes, IPv4 mapped. */
static __always_inline void read_user_addr(struct bpf_sock_addr *ctx, int v6, struct addr16 *a)
{
    if (v6) {
        a->w[0] = ctx->user_ip6[0];
        a->w[1] = ctx->user_ip6[1];
        a->w[2] = ctx->user_ip6[2];
        a->w[3] = ctx->user_ip6[3];
    } else {
        a->w[0] = 0;
        a->w[1] = 0;
        a->w[2] = MAPPED_V4_WORD;
        a->w[3] = ctx->user_ip4;
    }
}

static __always_inline int is_mapped_v4(const struct addr16 *a)
{
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == MAPPED_V4_WORD;
}

/* Write an address and port back into the context. An AF_INET socket can only take an IPv4
 * address (returns OUT_MISS otherwise); an AF_INET6 socket takes IPv4 as mapped, which is how
 * it asked (SEMANTICS A13). Returns OUT_TRANSLATED when written. */
static __always_inline __u32 write_user_addr(struct bpf_sock_addr *ctx, int v6,
                                           const struct addr16 *a, __u16 port)
{
    if (v6) {
        ctx->user_ip6[0] = a->w[0];
        ctx->user_ip6[1] = a->w[1];
        ctx->user_ip6[2] = a->w[2];
        ctx->user_ip6[3] = a->w[3];
    } else {
        if (!is_mapped_v4(a))
            return OUT_MISS;
        ctx->user_ip4 = a->w[3];
    }
    ctx->user_port = port;
    return OUT_TRANSLATED;
}

static __always_inline void copy_addr(struct addr16 *dst, const __u8 *src)
{
    __builtin_memcpy(dst, src, 16);
}

static __always_inline int same_addr(const __u8 *stored, const struct addr16 *a)
{
    const __u32 *w = (const __u32 *)stored;
    return w[0] == a->w[0] && w[1] == a->w[1] && w[2] == a->w[2] && w[3] == a->w[3];
}

/* The frontend filter's bit of (address, port, protocol), ports and address words as the hook
 * context holds them (see fe_filter in meshlet.h). Mirrored by entries.fe_filter_bit: change
 * both together (a kernel test translates through it). */
static __always_inline __u32 fe_filter_bit(const struct addr16 *a, __u16 port, __u8 proto)
{
    __u32 x = a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3];
    return ((x ^ ((__u32)port << 16) ^ proto) * 0x9E3779B1U) >> (32 - FE_FILTER_BITS_LOG2);
}

/* May (address, port, protocol) be a frontend? False means certainly not. */
static __always_inline int maybe_frontend(const struct addr16 *a, __u16 port, __u8 proto)
{
    __u32 bit = fe_filter_bit(a, port, proto);
    __u32 word = bit >> 6;
    __u64 *bits = fe_filter.lookup(&word);
    return bits && ((*bits >> (bit & 63)) & 1);
}

/* Does some pod on this node opt out of translation (config, written by the agent)? */
static __always_inline int clients_may_skip(void)
{
    __u32 zero = 0;
    struct config_value *c = config.lookup(&zero);
    return c && (c->flags & CONFIG_CLIENT_SKIPS);
}

/* The client's pod: the first cgroup below the root, going down from the root towards the
 * task's own cgroup, that the agent registered as a pod (kubelet pod cgroups sit at any depth:
 * kubepods/pod<uid> or kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice).
 * Unrolled: bcc allows no loops the verifier cannot bound, and no BPF-to-BPF calls. */
static __always_inline struct client_value *find_client(void)
{
#pragma unroll
    for (int depth = 1; depth <= MAX_POD_DEPTH; depth++) {
        __u64 id = bpf_get_current_ancestor_cgroup_id(CGROUP_ROOT_LEVEL + depth);
        if (id == 0)
            return NULL; /* the task's cgroup is shallower: no pod */
        struct client_value *client = clients.lookup(&id);
        if (client)
            return client;
    }
    return NULL;
}

/* The translation this socket already has for a frontend, or NULL. */
static __always_inline struct sock_xlat *xlat_for_frontend(struct sock_state *st,
                                                         const struct addr16 *fe, __u16 port)
{
#pragma unroll
    for (int i = 0; i < SOCK_XLATS; i++) {
        struct sock_xlat *x = &st->xlat[i];
        if (x->used && x->frontend_port == port && same_addr(x->frontend, fe))
            return x;
    }
    return NULL;
}

/* Remember frontend -> endpoint for this socket: the frontend's entry if there is one (a
 * reconnect), else the next slot round robin (policy when full: see struct sock_state). The
 * view, group and set revision of the pick make the later usability check cheap (A16). */
static __always_inline struct sock_xlat *remember(struct sock_state *st, const struct addr16 *fe,
                                                  __u16 fe_port, const struct addr16 *ep, __u16 ep_port,
                                                  const struct decision *d, __u64 set_id)
{
    struct sock_xlat *x = xlat_for_frontend(st, fe, fe_port);
    if (!x) {
        __u32 slot = st->next & (SOCK_XLATS - 1);
        st->next = slot + 1;
        x = &st->xlat[slot];
    }
    __builtin_memcpy(x->frontend, fe, 16);
    __builtin_memcpy(x->endpoint, ep, 16);
    x->frontend_port = fe_port;
    x->endpoint_port = ep_port;
    x->used = 1;
    x->scope = d->scope;
    x->group_id = d->group_id;
    x->set_id = set_id;
    return x;
}

/* Is this socket's remembered choice still usable for the frontend view `fe` (SEMANTICS A16)?
 * Cheap when nothing changed: the view is the same, its split still names the group, and the
 * group's set revision is the one of the pick (one lookup). When the set moved, the endpoint is
 * looked up in the new set's members (written for UDP groups) and the revision refreshed. */
static __always_inline int still_usable(struct sock_xlat *x, const struct fe_value *fe, __u32 scope)
{
    if (x->scope != scope || fe->verdict != VERDICT_FORWARD)
        return 0;
    int in_split = 0;
    __u32 n = fe->nslots;
#pragma unroll
    for (int i = 0; i < MAX_SLOTS; i++) {
        if (i < n && fe->slots[i].group_id == x->group_id)
            in_split = 1;
    }
    if (!in_split)
        return 0;
    __u64 gid = x->group_id;
    struct group_value *g = groups.lookup(&gid);
    if (!g || g->verdict != VERDICT_FORWARD)
        return 0;
    if (g->set_id == x->set_id)
        return 1;
    struct member_key mk;
    __builtin_memset(&mk, 0, sizeof(mk));
    mk.set_id = g->set_id;
    __builtin_memcpy(mk.addr, x->endpoint, 16);
    mk.port = x->endpoint_port;
    if (!members.lookup(&mk))
        return 0;
    x->set_id = mk.set_id;
    return 1;
}

/* Weighted pick among the split's slots: r uniform in [0, 2^31), the first slot whose
 * cumulative threshold is above r. Returns OUT_TRANSLATED with *slot a copy of the chosen slot
 * (its group id and the copy of its group's value), OUT_REJECTED for the rejected share
 * (group 0), or OUT_MISS when no slot matched (thresholds not ending at 2^31: a plan bug). */
static __always_inline __u32 pick_group(const struct fe_value *fe, struct fe_slot *slot)
{
    __u32 r = bpf_get_prandom_u32() & 0x7fffffff;
    __u32 n = fe->nslots;
#pragma unroll
    for (int i = 0; i < MAX_SLOTS; i++) {
        if (i < n && r < fe->slots[i].threshold) {
            *slot = fe->slots[i];
            return slot->group_id ? OUT_TRANSLATED : OUT_REJECTED;
        }
    }
    return OUT_MISS;
}

/* Branch-free comparisons for the passive health loops below. The BPF backend turns a
 * comparison used as a value into a branch, and branches inside unrolled loops multiply the
 * paths the verifier walks (8 slots x 2 ways each is past its limit); shifts do not branch.
 * Clock values and indexes are far below 2^63, so a difference's sign bit is the answer. */
static __always_inline __u64 before(__u64 a, __u64 b) /* a < b, as 0 or 1 */
{
    return (a - b) >> 63;
}

static __always_inline __u64 equal32(__u32 a, __u32 b) /* a == b, as 0 or 1 */
{
    return 1 - ((((__u64)(a ^ b)) + 0xffffffffULL) >> 32);
}

/* The ejected-sets filter's entry of a set (see eject_filter in meshlet.h). Mirrored by
 * entries.eject_filter_slot (for the bench that fakes an ejection). */
static __always_inline __u32 eject_filter_slot(__u64 set_id)
{
    return ((__u32)(set_id ^ (set_id >> 32)) * 0x9E3779B1U) >> (32 - EJECT_FILTER_SLOTS_LOG2);
}

/* May set `set_id` have an ejection entry? False means certainly not. */
static __always_inline int maybe_ejected(__u64 set_id)
{
    __u32 slot = eject_filter_slot(set_id);
    __u64 *flag = eject_filter.lookup(&slot);
    return flag && *flag;
}

/* Is index `i` of a set skipped now (passive health)? `ejected` may be NULL (nothing is). */
static __always_inline int is_ejected(const struct set_ejections *ejected, __u32 i, __u64 now)
{
    if (!ejected)
        return 0;
    __u64 hit = 0;
#pragma unroll
    for (int s = 0; s < EJECT_SLOTS; s++)
        hit |= equal32(ejected->slot[s].index, i) & before(now, ejected->slot[s].until_ns);
    return hit != 0;
}

/* A uniform index in [0, count) among the endpoints not ejected now: draw r uniform over the
 * count - skipped healthy ones, then step r over every skipped index at or below it (the
 * iteration x = r + #{skipped e <= x} reaches the r-th healthy index after at most `skipped`
 * steps; EJECT_SLOTS passes, unrolled, are always enough). The writer keeps skipped <= count/2;
 * anything inconsistent (a torn read of a reused LRU element) falls back to a plain pick. */
static __always_inline __u32 pick_healthy(const struct set_ejections *ejected, __u32 count, __u64 now)
{
    __u64 idx[EJECT_SLOTS]; /* skipped indexes; 2^32 for a slot not skipped (above any index) */
    __u64 skipped = 0;
#pragma unroll
    for (int s = 0; s < EJECT_SLOTS; s++) {
        __u64 index = ejected->slot[s].index;
        __u64 active = before(now, ejected->slot[s].until_ns) & before(index, count);
        idx[s] = index | ((1 - active) << 32);
        skipped += active;
    }
    if (skipped * 2 > count)
        skipped = 0;
    __u32 r = (__u32)(((__u64)bpf_get_prandom_u32() * (count - skipped)) >> 32);
    if (!skipped)
        return r;
    __u64 i = r;
#pragma unroll
    for (int pass = 0; pass < EJECT_SLOTS; pass++) {
        __u64 below = 0;
#pragma unroll
        for (int s = 0; s < EJECT_SLOTS; s++)
            below += 1 - before(i, idx[s]); /* idx[s] <= i */
        i = r + below;
    }
    return i < count ? (__u32)i : r;
}

/* Choose an endpoint of the group `g` (a frontend slot: the group's id and a copy of its value,
 * see struct fe_slot) for this client. Returns OUT_TRANSLATED with the endpoint set,
 * OUT_REJECTED or OUT_UNREACHABLE for the group's verdict, or OUT_MISS for a missing entry.
 * With passive health on for the group, ejected endpoints are skipped (a remembered affinity
 * choice too) and `watch` names the set and index picked. */
static __always_inline __u32 pick_endpoint(struct bpf_sock_addr *ctx, const struct fe_slot *gs,
                                         struct addr16 *ep, __u16 *ep_port, __u8 *family,
                                         struct sock_watch *watch, __u64 *set_id)
{
    struct fe_slot g = *gs;
    __u64 group_id = g.group_id;
    *set_id = g.set_id;
    if (g.verdict == VERDICT_NO_GROUP)
        return OUT_MISS;
    if (g.verdict == VERDICT_UNREACHABLE)
        return OUT_UNREACHABLE;
    if (g.verdict != VERDICT_FORWARD || g.count == 0)
        return OUT_REJECTED;

    /* Passive health: the set's ejected endpoints, if any (one lookup, a miss when none). */
    struct set_ejections *ejected = NULL;
    __u64 t = 0;
    if (g.flags & GROUP_PASSIVE_HEALTH) {
        watch->set_id = g.set_id;
        watch->count = g.count;
        if (maybe_ejected(g.set_id))
            ejected = ejections.lookup(&g.set_id);
        if (ejected)
            t = bpf_ktime_get_ns();
    }

    struct affinity_key ak;
    __u64 now = 0;
    if (g.affinity_timeout_s) {
        __builtin_memset(&ak, 0, sizeof(ak));
        ak.netns_cookie = bpf_get_netns_cookie(ctx);
        ak.group_id = group_id;
        now = bpf_ktime_get_ns();
        struct affinity_value *av = affinity.lookup(&ak);
        if (av && now - av->last_used_ns < (__u64)g.affinity_timeout_s * 1000000000ULL) {
            struct member_key mk;
            __builtin_memset(&mk, 0, sizeof(mk));
            mk.set_id = g.set_id;
            __builtin_memcpy(mk.addr, av->addr, 16);
            mk.port = av->port;
            __u32 *member = members.lookup(&mk);
            if (member && !is_ejected(ejected, *member, t)) {
                /* Still usable and fresh: keep it, and slide the timeout (A11). */
                watch->index = *member;
                copy_addr(ep, av->addr);
                *ep_port = av->port;
                *family = is_mapped_v4(ep) ? 4 : 6;
                av->last_used_ns = now;
                return OUT_TRANSLATED;
            }
        }
    }

    /* Uniform index in [0, count) by multiply-shift: no division, bias below count / 2^32. */
    struct ep_key key;
    __builtin_memset(&key, 0, sizeof(key));
    key.set_id = g.set_id;
    key.index = ejected ? pick_healthy(ejected, g.count, t)
                        : (__u32)(((__u64)bpf_get_prandom_u32() * g.count) >> 32);
    watch->index = key.index;
    struct ep_value *e = endpoints.lookup(&key);
    if (!e)
        return OUT_MISS;
    copy_addr(ep, e->addr);
    *ep_port = e->port;
    *family = e->family;

    if (g.affinity_timeout_s) {
        struct affinity_value av;
        __builtin_memset(&av, 0, sizeof(av));
        __builtin_memcpy(av.addr, ep, 16);
        av.port = *ep_port;
        av.last_used_ns = now;
        affinity.update(&ak, &av);
    }
    return OUT_TRANSLATED;
}

/* Send a decision to `meshlet trace` if one is running and its filters take it. Off, this costs
 * one array lookup (and nothing for a datagram reusing its socket's choice: not a decision). */
static __always_inline void trace(struct bpf_sock_addr *ctx, struct decision *d)
{
#ifdef HAVE_TRACE
    if (d->kind == DECISION_REMEMBERED)
        return;
    __u32 zero = 0;
    struct trace_control *tc = trace_control.lookup(&zero);
    if (!tc || !tc->expires_ns)
        return;
    __u64 now = bpf_ktime_get_ns();
    if (now >= tc->expires_ns || !(tc->outcomes & (1U << d->outcome)))
        return;
    if (tc->proto && tc->proto != d->proto)
        return;
    if (tc->frontend_port && tc->frontend_port != d->frontend_port)
        return;
    if (tc->flags & TRACE_MATCH_FRONTEND) {
        const __u32 *want = (const __u32 *)tc->frontend;
        const __u32 *got = (const __u32 *)d->frontend;
        if (want[0] != got[0] || want[1] != got[1] || want[2] != got[2] || want[3] != got[3])
            return;
    }
    if ((tc->flags & TRACE_MATCH_CLIENT) &&
        bpf_get_current_ancestor_cgroup_id(tc->client_level) != tc->client_cgroup)
        return;
    d->time_ns = now;
    d->cgroup_id = bpf_get_current_cgroup_id();
    d->netns_cookie = bpf_get_netns_cookie(ctx);
#ifdef HAVE_RINGBUF
    /* No wakeup: waking the reader costs the connect() that sends the event several us (the
     * reader then preempts it); `meshlet trace` looks at the ring every TRACE_POLL_S instead. */
    if (trace_events.ringbuf_output(d, sizeof(*d), BPF_RB_NO_WAKEUP) < 0)
#else
    /* Into this CPU's perf buffer (its wakeups are the reader's choice: a watermark, trace.py).
     * Fails when the buffer is full (the perf core also reports those as PERF_RECORD_LOST) or
     * when no reader owns this CPU's slot. */
    if (trace_perf.perf_submit(ctx, d, sizeof(*d)) < 0)
#endif
        __sync_fetch_and_add(&tc->dropped, 1);
#endif
}

/* The end of every translation of a frontend: count the outcome, trace it, and return what the
 * call gets (0: go on, possibly rewritten; -errno: fail it). */
static __always_inline int conclude(struct bpf_sock_addr *ctx, struct decision *d, __u32 outcome)
{
    count(outcome);
    d->outcome = (__u8)outcome;
    if (outcome == OUT_REJECTED)
        d->err = ECONNREFUSED;
    else if (outcome == OUT_UNREACHABLE)
        d->err = EHOSTUNREACH;
    trace(ctx, d);
    return -(int)d->err;
}

/* connect() and unconnected UDP sendmsg(). Returns 0 (go on, possibly rewritten) or -errno
 * (fail the call with it). */
static __always_inline int translate(struct bpf_sock_addr *ctx, int v6, int is_sendmsg)
{
    __u32 proto = ctx->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
        return 0;

    struct addr16 dst;
    read_user_addr(ctx, v6, &dst);
    if (!maybe_frontend(&dst, (__u16)ctx->user_port, (__u8)proto))
        return 0; /* not a frontend: the only cost non-service traffic pays */
    struct fe_key key;
    __builtin_memset(&key, 0, sizeof(key));
    __builtin_memcpy(key.addr, &dst, 16);
    key.port = (__u16)ctx->user_port;
    key.proto = (__u8)proto;

    struct fe_value *fe = frontends.lookup(&key);
    if (!fe)
        return 0; /* a filter bit shared with another frontend */

    struct decision d;
    __builtin_memset(&d, 0, sizeof(d));
    __builtin_memcpy(d.frontend, &dst, 16);
    d.frontend_port = key.port;
    d.proto = key.proto;
    d.kind = is_sendmsg ? DECISION_DATAGRAM : DECISION_CONNECT;
    d.route_id = fe->route_id;

    /* The pod matters only for a consumer view or an opt-out (see struct config_value). */
    struct client_value *client = NULL;
    if ((fe->flags & FE_HAS_SCOPES) || clients_may_skip())
        client = find_client();
    __u32 scope = 0;
    if (client) {
        if (client->flags & CLIENT_SKIP)
            return conclude(ctx, &d, OUT_SKIPPED);
        scope = client->scope;
    }

    /* Creating a socket's storage is the dearest step of a translation (an allocation charged
     * to the socket, ~0.7 us here): made only once an endpoint is chosen, below. A datagram only
     * looks for the choices its socket already has. */
    struct sock_state *st = is_sendmsg ? sockets.sk_storage_get(ctx->sk, 0, 0) : NULL;
    struct addr16 ep;
    __u16 ep_port = 0;
    __u8 family = 0;

    if ((fe->flags & FE_HAS_SCOPES) && scope) {
        key.scope = scope;
        struct fe_value *scoped = frontends.lookup(&key);
        if (scoped) {
            fe = scoped; /* the consumer view of the client's namespace wins (B5) */
            d.scope = scope;
            d.route_id = fe->route_id;
        }
    }

    if (is_sendmsg && st) {
        /* An unconnected UDP socket keeps its choice for a frontend (A10) while it is usable
         * (A16); otherwise this datagram picks again below, and remember() replaces it. */
        struct sock_xlat *x = xlat_for_frontend(st, &dst, key.port);
        if (x) {
            if (still_usable(x, fe, d.scope)) {
                d.kind = DECISION_REMEMBERED;
                d.group_id = x->group_id;
                copy_addr(&ep, x->endpoint);
                __builtin_memcpy(d.endpoint, &ep, 16);
                d.endpoint_port = x->endpoint_port;
                return conclude(ctx, &d, write_user_addr(ctx, v6, &ep, x->endpoint_port));
            }
            count(COUNT_REPICKED);
        }
    }

    if (fe->verdict != VERDICT_FORWARD)
        return conclude(ctx, &d, OUT_REJECTED);
    struct fe_slot slot;
    __u32 outcome = pick_group(fe, &slot);
    d.group_id = slot.group_id;
    if (outcome != OUT_TRANSLATED)
        return conclude(ctx, &d, outcome);

    struct sock_watch watch;
    __builtin_memset(&watch, 0, sizeof(watch));
    __u64 set_id = 0;
    outcome = pick_endpoint(ctx, &slot, &ep, &ep_port, &family, &watch, &set_id);
    if (outcome != OUT_TRANSLATED)
        return conclude(ctx, &d, outcome);
    __builtin_memcpy(d.endpoint, &ep, 16);
    d.endpoint_port = ep_port;
    outcome = write_user_addr(ctx, v6, &ep, ep_port);
    if (outcome == OUT_TRANSLATED && !st)
        st = sockets.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (outcome == OUT_TRANSLATED && st) {
        struct sock_xlat *x = remember(st, &dst, key.port, &ep, ep_port, &d, set_id);
        if (proto == IPPROTO_TCP)
            st->watch = watch; /* the handshake's outcome goes to this endpoint (sockops) */
        if (!is_sendmsg && proto == IPPROTO_UDP) {
            __u64 cookie = bpf_get_socket_cookie64(ctx);
            udp_flows.update(&cookie, x);
        }
    }
    return conclude(ctx, &d, outcome);
}

/* recvmsg (source of a datagram) and getpeername (the peer): an endpoint this socket was
 * translated to is shown as its frontend. */
static __always_inline void reverse(struct bpf_sock_addr *ctx, int v6)
{
    struct sock_state *st = sockets.sk_storage_get(ctx->sk, 0, 0);
    if (!st)
        return;
    struct addr16 src;
    read_user_addr(ctx, v6, &src);
    __u16 port = (__u16)ctx->user_port;
#pragma unroll
    for (int i = 0; i < SOCK_XLATS; i++) {
        struct sock_xlat *x = &st->xlat[i];
        if (x->used && x->endpoint_port == port && same_addr(x->endpoint, &src)) {
            struct addr16 fe;
            copy_addr(&fe, x->frontend);
            write_user_addr(ctx, v6, &fe, x->frontend_port);
            return;
        }
    }
}

static __always_inline int verdict(int err)
{
    if (err) {
#ifdef HAVE_SET_RETVAL
        bpf_set_retval(err);
#endif
        /* Without bpf_set_retval (Linux < 5.18: the loader then leaves HAVE_SET_RETVAL out,
         * agent/datapath/features.py), returning 0 still fails the call at once, with EPERM. */
        return 0;
    }
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) { return verdict(translate(ctx, 0, 0)); }
int connect6(struct bpf_sock_addr *ctx) { return verdict(translate(ctx, 1, 0)); }
int sendmsg4(struct bpf_sock_addr *ctx) { return verdict(translate(ctx, 0, 1)); }
int sendmsg6(struct bpf_sock_addr *ctx) { return verdict(translate(ctx, 1, 1)); }
int recvmsg4(struct bpf_sock_addr *ctx) { reverse(ctx, 0); return 1; }
int recvmsg6(struct bpf_sock_addr *ctx) { reverse(ctx, 1); return 1; }
int getpeername4(struct bpf_sock_addr *ctx) { reverse(ctx, 0); return 1; }
int getpeername6(struct bpf_sock_addr *ctx) { reverse(ctx, 1); return 1; }

/* --- passive health (SEMANTICS A17) ---------------------------------------------------------
 *
 * The sockops program sees every TCP socket of the cgroup subtree; it acts only on those whose
 * connect() meshlet translated into a group with GROUP_PASSIVE_HEALTH (struct sock_watch set).
 * At the SYN (TCP_CONNECT_CB) it asks for state callbacks on that socket alone; the first state
 * change out of SYN_SENT is the handshake's outcome, then it stops watching:
 *   SYN_SENT -> ESTABLISHED                        success: the endpoint's record is cleared
 *   SYN_SENT -> CLOSE, nothing left in flight      failure: a reset, or the kernel's SYN
 *                                                  retries ran out (both purge the send queue
 *                                                  before closing; since Linux 6.10 an ICMP
 *                                                  error too)
 *   SYN_SENT -> CLOSE, SYN still in flight         the client gave up (close, connect timeout):
 *                                                  a failure only if the SYN had already been
 *                                                  retransmitted (unanswered for a whole RTO),
 *                                                  else nothing is learned
 */

static __always_inline void hstat(__u32 index)
{
    __u64 *c = health_stats.lookup(&index);
    if (c)
        *c += 1;
}

/* Skip endpoint `w->index` of set `w->set_id` until `until`, unless the cap (struct
 * set_ejections) is reached. The whole value is rebuilt and replaced, never written in place;
 * the loops are branch-free (see before()). */
static __always_inline void eject_in_set(const struct sock_watch *w, __u64 until, __u64 now)
{
    __u64 set_id = w->set_id;
    __u32 index = w->index;
    struct set_ejections next;
    __builtin_memset(&next, 0, sizeof(next));
    struct set_ejections *cur = ejections.lookup(&set_id);
    if (cur)
        next = *cur;
    __u64 active = 0, found = 0;
#pragma unroll
    for (int s = 0; s < EJECT_SLOTS; s++) {
        __u64 alive = before(now, next.slot[s].until_ns);
        __u64 hit = alive & equal32(next.slot[s].index, index);
        next.slot[s].until_ns += (until - next.slot[s].until_ns) * hit; /* renew its slot */
        found |= hit;
        active += alive;
    }
    if (!found) {
        __u32 cap = w->count / 2;
        if (active >= cap || active >= EJECT_SLOTS) {
            hstat(HSTAT_CAPPED); /* this failure passes through: half the set is skipped already */
            return;
        }
#pragma unroll
        for (int s = 0; s < EJECT_SLOTS; s++) {
            __u64 take = (1 - before(now, next.slot[s].until_ns)) & (1 - found); /* first free slot */
            next.slot[s].index += (index - next.slot[s].index) * (__u32)take;
            next.slot[s].until_ns += (until - next.slot[s].until_ns) * take;
            found |= take;
        }
    }
    /* Connect looks for this entry only once the set's filter flag is set. */
    __u32 slot = eject_filter_slot(set_id);
    __u64 *flag = eject_filter.lookup(&slot);
    if (flag && !*flag)
        *flag = 1;
    ejections.update(&set_id, &next);
}

/* Remove endpoint `w->index` from its set's skipped ones (it just completed a handshake). */
static __always_inline void unskip_in_set(const struct sock_watch *w, __u64 now)
{
    __u64 set_id = w->set_id;
    struct set_ejections *cur = ejections.lookup(&set_id);
    if (!cur)
        return;
    struct set_ejections next = *cur;
    __u64 found = 0;
#pragma unroll
    for (int s = 0; s < EJECT_SLOTS; s++) {
        __u64 hit = before(now, next.slot[s].until_ns) & equal32(next.slot[s].index, w->index);
        next.slot[s].until_ns *= 1 - hit;
        found |= hit;
    }
    if (found)
        ejections.update(&set_id, &next);
}

/* Credit a handshake's outcome to the endpoint `w` names. */
static __always_inline void health_outcome(const struct sock_watch *w, int failed)
{
    struct ep_key ek;
    __builtin_memset(&ek, 0, sizeof(ek));
    ek.set_id = w->set_id;
    ek.index = w->index;
    struct ep_value *e = endpoints.lookup(&ek);
    if (!e)
        return; /* the set was replaced during the handshake: its indexes mean nothing now */
    struct health_key hk;
    __builtin_memset(&hk, 0, sizeof(hk));
    __builtin_memcpy(hk.addr, e->addr, 16);
    hk.port = e->port;
    __u64 now = bpf_ktime_get_ns();
    struct health_value *h = health.lookup(&hk);

    if (!failed) {
        hstat(HSTAT_SUCCESSES);
        if (h) {
            health.delete(&hk); /* the first success clears the record (and the back-off) */
            unskip_in_set(w, now);
        }
        return;
    }
    hstat(HSTAT_FAILURES);
    struct health_value next;
    __builtin_memset(&next, 0, sizeof(next));
    if (h)
        next = *h;
    if (next.until_ns <= now) {
        next.failures++;
        /* Ejected again at once when it fails right after a back-off (no success since). */
        if (next.failures < HEALTH_FAILURES && next.ejections == 0) {
            health.update(&hk, &next);
            return;
        }
        __u64 backoff = next.ejections >= HEALTH_MAX_DOUBLINGS ? (__u64)HEALTH_BACKOFF_MAX_NS
                                                               : (__u64)HEALTH_BACKOFF_NS << next.ejections;
        if (backoff > HEALTH_BACKOFF_MAX_NS)
            backoff = HEALTH_BACKOFF_MAX_NS;
        next.until_ns = now + backoff;
        next.ejections++;
        next.failures = 0;
        health.update(&hk, &next);
        hstat(HSTAT_EJECTIONS);
    }
    /* Ejected now (just, or already through another set or an earlier connect): skip it in
     * the set this connection picked from. */
    eject_in_set(w, next.until_ns, now);
}

int sockops(struct bpf_sock_ops *ctx)
{
    __u32 op = ctx->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct sock_state *st = sockets.sk_storage_get(sk, 0, 0);
    if (!st || !st->watch.set_id)
        return 1; /* not translated by meshlet, or not watched */
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (ctx->args[0] != BPF_TCP_SYN_SENT)
        return 1;
    struct sock_watch w = st->watch;
    st->watch.set_id = 0; /* one outcome per handshake */
    bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
    __u32 state = ctx->args[1];
    if (state == BPF_TCP_ESTABLISHED)
        health_outcome(&w, 0);
    else if (state == BPF_TCP_CLOSE && (ctx->packets_out == 0 || ctx->total_retrans > 0))
        health_outcome(&w, 1);
    return 1;
}
