/* Endpoint selection for a new flow: weighted round-robin (one atomically advanced
 * cursor per service over its slot table, shared by all CPUs), a weighted 5-tuple hash
 * or Maglev (the 5-tuple hash indexes the service's Maglev table in maglev_v4_map).
 * dpd fills the slot table from the weights (dpd/slots.py), the Maglev table from the
 * endpoints and weights (dpd/maglev.py). */
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

/* Maglev: the flow hash indexes the service's lookup table. NULL when the table is
 * missing or names no endpoint of the service (never a guess). */
static __always_inline struct xlb_ep *xlb_maglev_select(struct xlb_nat_val *svc,
                                                        struct xlb_pkt *p)
{
    __u32 key = svc->svc_id * 2 + (svc->flags & XLB_SVC_MAGLEV_B);
    struct xlb_maglev *t = maglev_v4_map.lookup(&key);
    if (!t)
        return NULL;
    __u32 m = t->size;
    if (m == 0 || m > XLB_MAGLEV_SIZE)
        return NULL;
    __u32 pos = xlb_flow_hash(p) % m;
    /* the verifier cannot bound a modulo by a variable: hide pos from the compiler so
     * that it keeps the check (it knows pos < m <= XLB_MAGLEV_SIZE) */
    asm volatile("" : "=r"(pos) : "0"(pos));
    if (pos >= XLB_MAGLEV_SIZE)
        return NULL;
    __u16 idx = t->ep[pos];
    if (idx >= svc->n_eps)
        return NULL;
    return &svc->eps[idx & (XLB_MAX_EPS - 1)];
}

/* Returns the chosen endpoint, or NULL when no endpoint takes new flows. */
static __always_inline struct xlb_ep *xlb_select(struct xlb_nat_val *svc, struct xlb_pkt *p,
                                                int force_hash)
{
    __u32 n = svc->n_slots;
    if (n == 0 || n > XLB_SLOTS)
        return NULL;
    if (svc->algo == XLB_ALGO_MAGLEV)
        return xlb_maglev_select(svc, p);
    __u32 pos;
    if (svc->algo == XLB_ALGO_HASH || force_hash) {
        pos = xlb_flow_hash(p) % n;
    } else {
        __u32 id = svc->svc_id;
        __u32 *cur = rr_map.lookup(&id);
        if (!cur)
            return NULL;
        /* bcc's LLVM cannot use a fetch-add's result (no -mcpu=v3), so read, then
         * add atomically: two CPUs picking in the same instant may share a slot. */
        pos = *cur % n;
        __sync_fetch_and_add(cur, 1);
    }
    __u8 idx = svc->slots[pos & (XLB_SLOTS - 1)];
    if (idx >= svc->n_eps)
        return NULL;
    return &svc->eps[idx & (XLB_MAX_EPS - 1)];
}

#endif
