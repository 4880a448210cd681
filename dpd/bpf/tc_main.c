/* tc_packet_func: TC ingress entry. Established flows are rewritten and forwarded
 * here from a single conntrack lookup; everything else (new flows, TCP handshakes
 * and teardowns, fragments, ICMP, packets that are not ours) tail-calls
 * tc_packet_func_slow; IPv6 packets but those of established IPv6 flows (svc6.h)
 * tail-call tc_packet_func_slow6. Malformed packets and IPv4 options pass untouched, counted. */

#include <uapi/linux/pkt_cls.h>

#include "acl.h"
#include "ct.h"
#include "fwd.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"
#include "svc6.h"

int tc_packet_func(struct __sk_buff *skb)
{
    struct xlb_pkt p;
    int rc = xlb_parse(skb, &p);
    if (rc != XLB_P_OK) {
        if (rc == XLB_P_V6) { /* IPv6: established flows here, the rest in tc_slow6.c */
            int act = xlb_v6_fast(skb);
            if (act >= 0)
                return act;
            pgm_tbl.call(skb, XLB_PGM_SLOW6);
            xlb_count(XLB_STAT_TAILCALL_FAIL);
            return TC_ACT_OK;
        }
        if (rc >= XLB_P_FRAG) /* fragments, ICMP */
            goto slow;
        return xlb_pass_unparsed(rc);
    }
    struct xlb_ct_key k;
    xlb_ct_key_of(&k, &p);
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    /* established, and TCP with ACK and none of SYN/FIN/RST (UDP has no flags) */
    __u8 want = p.proto == IPPROTO_TCP ? XLB_TCP_ACK : 0;
    if (v && v->state == XLB_CT_EST &&
        (p.tcp_flags & (XLB_TCP_SYN | XLB_TCP_FIN | XLB_TCP_RST | XLB_TCP_ACK)) == want) {
        if (want)
            xlb_ct_track_seq(v, &p);
        xlb_ct_touch(v);
        if (v->flags & (XLB_CTF_PASS | XLB_CTF_FW)) { /* one test for both */
            /* a flow a POLICE or MIRROR rule opened: charged or copied as it arrived */
            if ((v->flags & XLB_CTF_FW) && xlb_fw_flow(skb, v) >= 0)
                return TC_ACT_SHOT;
            if (v->flags & XLB_CTF_PASS) /* a flow the firewall allowed: no service, no NAT */
                return TC_ACT_OK;
        }
        xlb_count_flow(skb, v->svc_id, v->stat_id);
        if (v->flags & (XLB_CTF_FNAT | XLB_CTF_DSR)) /* full-NAT, DSR */
            return xlb_flow_out(skb, &p, v);
        if (xlb_nat(skb, &p, v->dir, v->nat_addr, v->nat_port) < 0)
            return TC_ACT_OK;
        return xlb_forward(skb, &p);
    }
slow:
    pgm_tbl.call(skb, XLB_PGM_SLOW);
    /* Only reached when the slot is empty (no dpd ever loaded it): stay harmless. */
    xlb_count(XLB_STAT_TAILCALL_FAIL);
    return TC_ACT_OK;
}
