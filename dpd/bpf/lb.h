/* Endpoint selection for a new flow: weighted round-robin (one atomically advanced
 * cursor per service over its slot table, shared by all CPUs) or a weighted 5-tuple hash. dpd fills the slot table
 * from the weights (dpd/slots.py). */
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

/* Returns the chosen endpoint, or NULL when no endpoint takes new flows. */
static __always_inline struct xlb_ep *xlb_select(struct xlb_nat_val *svc, struct xlb_pkt *p,
                                                int force_hash)
{
    __u32 n = svc->n_slots;
    if (n == 0 || n > XLB_SLOTS)
        return NULL;
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
