/* Per-CPU counters: global, per service, per endpoint. */
#ifndef XLB_STATS_H
#define XLB_STATS_H

#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

static __always_inline void xlb_count(u32 idx)
{
    struct xlb_counter *c = stats_map.lookup(&idx);
    if (c)
        c->packets++;
}

/* A packet xlb_parse() turned away (not ours, malformed, IP options): counted by
 * reason and handed to the kernel untouched. */
static __always_inline int xlb_pass_unparsed(int rc)
{
    xlb_count(rc == XLB_P_BAD       ? XLB_STAT_PASS_BAD_HEADER
              : rc == XLB_P_OPTIONS ? XLB_STAT_PASS_IP_OPTIONS
                                    : XLB_STAT_PASS);
    return TC_ACT_OK;
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
