/* Per-CPU counters: global, per service, per endpoint. */
#ifndef XLB_STATS_H
#define XLB_STATS_H

#include "maps.h"

static __always_inline void xlb_count(u32 idx)
{
    struct xlb_counter *c = stats_map.lookup(&idx);
    if (c)
        c->packets++;
}

static __always_inline void xlb_count_flow(struct __sk_buff *skb, u32 svc_id, u32 stat_id)
{
    struct xlb_counter *c = svc_stats_map.lookup(&svc_id);
    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
    c = ep_stats_map.lookup(&stat_id);
    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
}

#endif
