/* tc_mirror_func: TC ingress filter of the mirrored interfaces only (mirr_map), ahead of
 * tc_packet_func. It copies the packet as it arrived (nothing has rewritten it yet) out
 * of the interface's mirror interface with bpf_clone_redirect, counts, and lets the
 * packet go on to the next filter (TC_ACT_UNSPEC): tc_packet_func. XDP cannot do this:
 * it can redirect a frame but not copy it and also pass it on. */

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "stats.h"

int tc_mirror_func(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ingress_ifindex;
    struct xlb_mirr *m = mirr_map.lookup(&ifindex);
    if (!m)
        return TC_ACT_UNSPEC;
    __u32 len = skb->len;
    if (bpf_clone_redirect(skb, m->ifindex, 0) != 0) {
        xlb_count(XLB_STAT_MIRROR_FAIL);
        return TC_ACT_UNSPEC;
    }
    xlb_count(XLB_STAT_MIRRORED);
    struct xlb_counter *c = mirr_stats_map.lookup(&ifindex);
    if (c) {
        c->packets++;
        c->bytes += len;
    }
    return TC_ACT_UNSPEC;
}
