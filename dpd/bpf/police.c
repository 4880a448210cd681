/* tc_police_func: TC ingress filter of the policed interfaces only (polx_intf_map),
 * ahead of tc_packet_func (after tc_mirror_func: a mirror sees what arrived). A packet
 * over the interface's policer rate is dropped and counted (drop_policer, globally and
 * for the interface; the policer's own counters); the others go on to the next filter
 * (TC_ACT_UNSPEC). Interfaces without a policer carry no such filter and pay nothing. */

#include <uapi/linux/pkt_cls.h>

#include "acl.h"
#include "maps.h"
#include "police.h"

int tc_police_func(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ingress_ifindex;
    __u32 *id = polx_intf_map.lookup(&ifindex);
    if (!id)
        return TC_ACT_UNSPEC;
    if (xlb_police(*id, skb->len, ifindex)) {
        xlb_count_drop(ifindex, XLB_STAT_DROP_POLICER);
        return TC_ACT_SHOT;
    }
    return TC_ACT_UNSPEC;
}
