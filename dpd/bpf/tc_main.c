/* tc_packet_func: TC ingress entry. Established flows are rewritten and forwarded
 * here from a single conntrack lookup; everything else (new flows, TCP handshakes
 * and teardowns, packets that are not ours) tail-calls tc_packet_func_slow. */

#include <uapi/linux/pkt_cls.h>

#include "ct.h"
#include "fwd.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"

int tc_packet_func(struct __sk_buff *skb)
{
    struct xlb_pkt p;
    if (xlb_parse(skb, &p) < 0) {
        xlb_count(XLB_STAT_PASS);
        return TC_ACT_OK;
    }
    struct xlb_ct_key k;
    xlb_ct_key_of(&k, &p);
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    if (v && v->state == XLB_CT_EST &&
        !(p.tcp_flags & (XLB_TCP_SYN | XLB_TCP_FIN | XLB_TCP_RST))) {
        xlb_ct_touch(v);
        xlb_count_flow(skb, v->svc_id, v->stat_id);
        if (xlb_nat(skb, &p, v->dir, v->nat_addr, v->nat_port) < 0)
            return TC_ACT_OK;
        return xlb_forward(skb, &p);
    }
    pgm_tbl.call(skb, XLB_PGM_SLOW);
    /* Only reached when the slot is empty (no dpd ever loaded it): stay harmless. */
    xlb_count(XLB_STAT_TAILCALL_FAIL);
    return TC_ACT_OK;
}
