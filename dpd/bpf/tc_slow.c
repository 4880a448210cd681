/* tc_packet_func_slow: conntrack state tracking for flows not yet (or no longer)
 * established, and for new flows: service lookup, endpoint selection, creation of
 * both conntrack entries, DNAT. Packets for no service pass untouched. */

#include <uapi/linux/pkt_cls.h>

#include "ct.h"
#include "fwd.h"
#include "lb.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"

static __always_inline int xlb_new_flow(struct __sk_buff *skb, struct xlb_pkt *p)
{
    struct xlb_nat_key nk = {};
    nk.vip = p->daddr;
    nk.port = p->dport;
    nk.proto = p->proto;
    struct xlb_nat_val *svc = nat_v4_map.lookup(&nk);
    if (!svc) {
        xlb_count(XLB_STAT_PASS);
        return TC_ACT_OK;
    }
    /* A TCP packet that is not a SYN has lost its conntrack (flush, eviction, node
     * rebuilt): pick by hash, so that every such packet of the flow lands on the
     * same endpoint whatever the algorithm, and track it as established. */
    int midstream = p->proto == IPPROTO_TCP && !(p->tcp_flags & XLB_TCP_SYN);
    struct xlb_ep *ep = xlb_select(svc, p, midstream);
    if (!ep) {
        xlb_count(XLB_STAT_DROP_NO_ENDPOINT);
        return TC_ACT_SHOT;
    }
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xlb_ct_key k;
    struct xlb_ct_val v = {};
    xlb_ct_key_of(&k, p);
    v.nat_addr = ep->addr;
    v.nat_port = ep->port;
    v.dir = XLB_DIR_ORIG;
    v.state = midstream ? XLB_CT_EST : XLB_CT_NEW;
    v.svc_id = svc->svc_id;
    v.stat_id = ep->stat_id;
    v.last_ns = now;
    v.svc = nk;

    struct xlb_ct_key rk = {};
    rk.saddr = ep->addr;
    rk.sport = ep->port;
    rk.daddr = p->saddr;
    rk.dport = p->sport;
    rk.proto = p->proto;
    struct xlb_ct_val rv = v;
    rv.nat_addr = nk.vip;
    rv.nat_port = nk.port;
    rv.dir = XLB_DIR_REPLY;

    if (ct_v4_map.update(&rk, &rv) || ct_v4_map.update(&k, &v)) {
        ct_v4_map.delete(&rk);
        xlb_count(XLB_STAT_DROP_CT_INSERT);
        return TC_ACT_SHOT;
    }
    xlb_count(XLB_STAT_NEW_FLOW);
    xlb_count_flow(skb, v.svc_id, v.stat_id);
    if (xlb_nat(skb, p, XLB_DIR_ORIG, v.nat_addr, v.nat_port) < 0)
        return TC_ACT_OK;
    return xlb_forward(skb, p);
}

int tc_packet_func_slow(struct __sk_buff *skb)
{
    struct xlb_pkt p;
    xlb_count(XLB_STAT_SLOW_PATH);
    if (xlb_parse(skb, &p) < 0) {
        xlb_count(XLB_STAT_PASS);
        return TC_ACT_OK;
    }
    struct xlb_ct_key k;
    xlb_ct_key_of(&k, &p);
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    if (v) {
        /* A new SYN on a closed tuple starts a new flow, with a new endpoint. */
        int reopen = v->dir == XLB_DIR_ORIG && (p.tcp_flags & XLB_TCP_SYN) &&
                     !(p.tcp_flags & XLB_TCP_ACK) &&
                     (v->state == XLB_CT_CLOSING || v->state == XLB_CT_CLOSED);
        if (!reopen) {
            xlb_ct_touch(v);
            xlb_ct_update(&p, v);
            xlb_count_flow(skb, v->svc_id, v->stat_id);
            if (xlb_nat(skb, &p, v->dir, v->nat_addr, v->nat_port) < 0)
                return TC_ACT_OK;
            return xlb_forward(skb, &p);
        }
    }
    return xlb_new_flow(skb, &p);
}
