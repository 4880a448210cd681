/* Policers: a token bucket per policer, kept as GCRA in one 64-bit word (xlb_abi.h,
 * docs/policers.md) and shared by every CPU. */
#ifndef XLB_POLICE_H
#define XLB_POLICE_H

#include "events.h"
#include "maps.h"

/* Charge `len` bytes to policer `id`: 0 when the packet conforms (and is counted as
 * passed), 1 when it is over the rate (counted as dropped; the caller drops it). A
 * policer id with no bucket (dpd removed it) lets everything pass. */
static __always_inline int xlb_police(__u32 id, __u32 len, __u32 ifindex)
{
    struct xlb_polx *pol = polx_map.lookup(&id);
    if (!pol || !pol->byte_ns_q16)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 cost = ((__u64)len * pol->byte_ns_q16) >> 16;
    __u64 limit = now + pol->burst_ns;
    int over = 1;
#pragma unroll
    for (int i = 0; i < XLB_POLX_TRIES; i++) {
        __u64 tat = *(volatile __u64 *)&pol->tat;
        __u64 next = (tat > now ? tat : now) + cost;
        if (next > limit)
            break; /* over the rate: the bucket holds less than the packet */
        if (__sync_val_compare_and_swap(&pol->tat, tat, next) == tat) {
            over = 0;
            break;
        }
        /* another CPU charged the bucket in between: read it again */
    }
    __u32 idx = id * 2 + (over ? XLB_POLX_DROP : XLB_POLX_PASS);
    struct xlb_counter *c = polx_stats_map.lookup(&idx);
    if (c) {
        c->packets++;
        c->bytes += len;
    }
    /* a drop event, at most one per XLB_POLX_EVENT_NS per policer (the CPU whose swap
     * moves event_ns sends it) */
    if (over) {
        __u64 due = pol->event_ns;
        if (now >= due &&
            __sync_val_compare_and_swap(&pol->event_ns, due, now + XLB_POLX_EVENT_NS) == due)
            xlb_event(XLB_EV_POLICER_DROP, id, ifindex, len);
    }
    return over;
}

#endif
