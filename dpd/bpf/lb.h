/* Endpoint selection for a new flow: weighted round-robin (one atomically advanced
 * cursor per service over its slot table, shared by all CPUs), a weighted 5-tuple hash,
 * a weighted hash of the client address, least connections (a sample of the slot table
 * against ep_conn_map) or Maglev (the 5-tuple hash indexes the service's Maglev table in
 * maglev_v4_map); session persistence (persist_v4_map) before any of them.
 *
 * A service's endpoints are ep_map[ep_base .. ep_base + n_eps) and its slot table
 * slot_map[slot_base ..] (XLB_SLOT_CHUNK slots an entry); dpd fills the slot table from
 * the weights (dpd/slots.py), the Maglev table from the endpoints and weights
 * (dpd/maglev.py). Selection works on endpoint indexes and reads only what any address
 * family has (weight, counter slot, flags): xlb_select_idx takes the flow's hashes and
 * returns an index; reading the endpoint's address is the caller's (xlb_ep_at). */
#ifndef XLB_LB_H
#define XLB_LB_H

#include "maps.h"
#include "parse.h"

static __always_inline __u32 xlb_mix(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline __u32 xlb_flow_hash(struct xlb_pkt *p)
{
    __u32 h = xlb_mix(p->saddr ^ 0x9e3779b9);
    h = xlb_mix(h ^ p->daddr);
    h = xlb_mix(h ^ (((__u32)p->sport << 16) | p->dport));
    return xlb_mix(h ^ p->proto);
}

/* Endpoint idx of the service; NULL when it has none at idx. */
static __always_inline struct xlb_ep *xlb_ep_at(struct xlb_nat_val *svc, __u32 idx)
{
    if (idx >= svc->n_eps)
        return NULL;
    __u32 k = svc->ep_base + idx;
    return ep_map.lookup(&k);
}

/* Maglev: the flow hash indexes the service's lookup table. -1 when the table is
 * missing or names no endpoint of the service (never a guess). */
static __always_inline int xlb_maglev_select(struct xlb_nat_val *svc, __u32 hash)
{
    __u32 key = svc->svc_id * 2 + (svc->flags & XLB_SVC_MAGLEV_B);
    struct xlb_maglev *t = maglev_v4_map.lookup(&key);
    if (!t)
        return -1;
    __u32 m = t->size;
    if (m == 0 || m > XLB_MAGLEV_SIZE)
        return -1;
    __u32 pos = hash % m;
    /* the verifier cannot bound a modulo by a variable: hide pos from the compiler so
     * that it keeps the check (it knows pos < m <= XLB_MAGLEV_SIZE) */
    asm volatile("" : "=r"(pos) : "0"(pos));
    if (pos >= XLB_MAGLEV_SIZE)
        return -1;
    __u16 idx = t->ep[pos];
    if (idx >= svc->n_eps)
        return -1;
    return idx;
}

/* the endpoint index of slot pos (< n_slots); -1 when it names no endpoint */
static __always_inline int xlb_slot_ep(struct xlb_nat_val *svc, __u32 pos)
{
    __u32 k = svc->slot_base + pos / XLB_SLOT_CHUNK;
    struct xlb_slots *s = slot_map.lookup(&k);
    if (!s)
        return -1;
    __u16 idx = s->ep[pos & (XLB_SLOT_CHUNK - 1)];
    if (idx >= svc->n_eps)
        return -1;
    return idx;
}

/* Least connections: the endpoints of XLB_LC_CHOICES consecutive slots from a random
 * start (a sample weighted as the slot table is), the one with the fewest active flows
 * per unit of weight (ep_conn_map; ties: the first sampled). */
static __always_inline int xlb_lc_select(struct xlb_nat_val *svc, __u32 n)
{
    __u32 start = bpf_get_prandom_u32() % n;
    int best = -1;
    __u64 best_c = 0, best_w = 1;
#pragma unroll
    for (int i = 0; i < XLB_LC_CHOICES; i++) {
        __u32 pos = start + i;
        if (pos >= n)
            pos -= n;
        int idx = xlb_slot_ep(svc, pos);
        if (idx < 0)
            continue;
        struct xlb_ep *ep = xlb_ep_at(svc, idx);
        if (!ep)
            continue;
        __u32 sid = ep->stat_id;
        __u32 *c = ep_conn_map.lookup(&sid);
        __u64 cnt = c ? *c : 0;
        __u64 w = ep->weight ? ep->weight : 1;
        if (best < 0 || cnt * best_w < best_c * w) {
            best = idx;
            best_c = cnt;
            best_w = w;
        }
    }
    return best;
}

/* Session persistence: the endpoint this client's last new flow went to, while it is
 * within the service's persist_s, still the service's endpoint at that index (same
 * counter slot) and still selectable (XLB_EP_LIVE: it holds slots; health and priority
 * groups take endpoints out). -1 otherwise. */
static __always_inline int xlb_persist_get(struct xlb_nat_val *svc,
                                          struct xlb_persist_key *pk, __u64 now)
{
    struct xlb_persist_val *pv = persist_v4_map.lookup(pk);
    if (!pv)
        return -1;
    if (now - pv->last_ns > (__u64)svc->persist_s * 1000000000ULL)
        return -1;
    __u32 idx = pv->idx;
    struct xlb_ep *ep = xlb_ep_at(svc, idx);
    if (!ep || ep->stat_id != pv->stat_id || !(ep->flags & XLB_EP_LIVE))
        return -1;
    return idx;
}

static __always_inline int xlb_select_algo(struct xlb_nat_val *svc, __u32 flow_hash,
                                          __u32 src_hash, int force_hash, __u32 n)
{
    if (svc->algo == XLB_ALGO_MAGLEV)
        return xlb_maglev_select(svc, flow_hash);
    __u32 pos;
    if (svc->algo == XLB_ALGO_SOURCE_HASH) {
        pos = src_hash % n;
    } else if (svc->algo == XLB_ALGO_HASH || force_hash) {
        pos = flow_hash % n;
    } else if (svc->algo == XLB_ALGO_LEAST_CONN) {
        return xlb_lc_select(svc, n);
    } else {
        __u32 id = svc->svc_id;
        __u32 *cur = rr_map.lookup(&id);
        if (!cur)
            return -1;
        /* bcc's LLVM cannot use a fetch-add's result (no -mcpu=v3), so read, then
         * add atomically: two CPUs picking in the same instant may share a slot. */
        pos = *cur % n;
        __sync_fetch_and_add(cur, 1);
    }
    return xlb_slot_ep(svc, pos);
}

/* A least-connections service opened a flow to the endpoint stat_id. */
static __always_inline void xlb_lc_opened(__u8 algo, __u32 stat_id)
{
    if (algo != XLB_ALGO_LEAST_CONN)
        return;
    __u32 *c = ep_conn_map.lookup(&stat_id);
    if (c)
        __sync_fetch_and_add(c, 1);
}

/* The endpoint index for a new flow of any address family, or -1 when no endpoint
 * takes new flows. flow_hash: of the flow's 5-tuple (used by hash, Maglev and
 * force_hash); src_hash: of the client address (source hash): a caller may leave the
 * one its service's algorithm does not use 0 (xlb_select does);
 * client: the persistence key's client (an IPv4 address, or a fold of a longer one).
 * A flow picked up mid-stream (force_hash) goes by its hash whatever the algorithm, and
 * neither follows nor moves the client's persistence. */
static __always_inline int xlb_select_idx(struct xlb_nat_val *svc, __u32 flow_hash,
                                         __u32 src_hash, __be32 client, int force_hash)
{
    __u32 n = svc->n_slots;
    if (n == 0 || n > XLB_SLOTS)
        return -1;
    if (!svc->persist_s || force_hash)
        return xlb_select_algo(svc, flow_hash, src_hash, force_hash, n);
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xlb_persist_key pk = {};
    pk.svc_id = svc->svc_id;
    pk.client = client;
    int idx = xlb_persist_get(svc, &pk, now);
    if (idx < 0)
        idx = xlb_select_algo(svc, flow_hash, src_hash, force_hash, n);
    if (idx < 0)
        return -1;
    struct xlb_ep *ep = xlb_ep_at(svc, idx);
    if (!ep)
        return -1;
    struct xlb_persist_val pv = {};
    pv.stat_id = ep->stat_id;
    pv.idx = idx;
    pv.last_ns = now;
    persist_v4_map.update(&pk, &pv);
    return idx;
}

/* IPv4: the chosen endpoint, or NULL when no endpoint takes new flows. */
static __always_inline struct xlb_ep *xlb_select(struct xlb_nat_val *svc, struct xlb_pkt *p,
                                                int force_hash)
{
    __u8 algo = svc->algo;
    __u32 fh = 0, sh = 0;
    if (force_hash || algo == XLB_ALGO_HASH || algo == XLB_ALGO_MAGLEV)
        fh = xlb_flow_hash(p);
    else if (algo == XLB_ALGO_SOURCE_HASH)
        sh = xlb_mix(p->saddr ^ 0x9e3779b9);
    int idx = xlb_select_idx(svc, fh, sh, p->saddr, force_hash);
    if (idx < 0)
        return NULL;
    return xlb_ep_at(svc, idx);
}

#endif
