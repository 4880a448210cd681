/* tc_packet_func_slow6: the IPv6 slow path (svc6.h), a program of its own (a tail call
 * from tc_packet_func, pgm_tbl slot XLB_PGM_SLOW6) so that it has the whole stack:
 * ICMPv6 errors about tracked flows translated (icmp6.h), conntrack steps of IPv6 flows
 * not (or no longer) established, the firewall for what has no entry, new flows to IPv6
 * services. */

#include "icmp6.h"
#include "svc6.h"

int tc_packet_func_slow6(struct __sk_buff *skb)
{
    xlb_count(XLB_STAT_SLOW_PATH);
    int act = xlb_icmp6(skb);
    if (act >= 0)
        return act;
    return xlb_v6_slow(skb);
}
