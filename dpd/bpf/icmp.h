/* ICMP: errors quoting a NATed flow are translated (not yet: passed). */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include "ct.h"
#include "fwd.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"

static __always_inline int xlb_icmp(struct __sk_buff *skb, struct xlb_pkt *p)
{
    xlb_count(XLB_STAT_PASS);
    return TC_ACT_OK;
}

#endif
