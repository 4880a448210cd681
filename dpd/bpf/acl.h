/* The firewall's classifier: a tuple space search over acl_map (the layout and why:
 * xlb_abi.h, dpd/firewall.py, docs/firewall.md).
 *
 * A packet with no conntrack entry is judged once: its key (family, protocol, ingress
 * interface, ports, addresses) is masked by each tuple of the live generation in turn
 * and looked up; the lowest rank found wins, and the search stops at the first tuple
 * whose min_rank cannot beat it (tuples are sorted by min_rank). No match: the ingress
 * interface's default policy (intf_map). With no tuple and no interface whose policy is
 * drop, the firewall is off and costs one array lookup. */
#ifndef XLB_ACL_H
#define XLB_ACL_H

#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "events.h"
#include "maps.h"
#include "parse.h"
#include "stats.h"

/* xlb_fw_judge verdicts */
#define XLB_FW_ALLOW 1    /* judged and allowed */
#define XLB_FW_DROP 2     /* dropped (counted): return TC_ACT_SHOT */
#define XLB_FW_REDIRECT 3 /* send out of *redirect (bpf_redirect) */

#define XLB_ACL_KEY_WORDS (sizeof(struct xlb_acl_key) / 4)
#define XLB_RANK_NONE 0xffffffff

/* A drop counted globally and for the interface the packet came in on (its slot in
 * intf_stats_map; interfaces without an intf_map entry share slot 0). */
static __always_inline void xlb_count_drop(__u32 ifindex, __u32 stat)
{
    xlb_count(stat);
    __u32 slot = 0;
    struct xlb_intf *in = intf_map.lookup(&ifindex);
    if (in)
        slot = in->slot;
    __u32 idx = slot * XLB_STAT_MAX + stat;
    struct xlb_counter *c = intf_stats_map.lookup(&idx);
    if (c)
        c->packets++;
    /* a new flow refused for want of conntrack room: an event (constant folded away
     * for every other reason) */
    if (stat == XLB_STAT_DROP_CT_CLASH || stat == XLB_STAT_DROP_CT_INSERT ||
        stat == XLB_STAT_DROP_SNAT_PORTS)
        xlb_event(XLB_EV_FLOW_REFUSED, stat, ifindex, 0);
}

/* acl_cfg when the firewall is on (a rule set with tuples, or an interface whose policy
 * is drop), else NULL: while it is off, this one array lookup is all it costs. */
static __always_inline struct xlb_acl_cfg *xlb_fw_on(void)
{
    __u32 zero = 0;
    struct xlb_acl_cfg *cfg = acl_cfg_map.lookup(&zero);
    if (!cfg || (!cfg->n_tuples[cfg->gen & 1] && !(cfg->flags & XLB_ACL_F_POLICY_DROP)))
        return NULL;
    return cfg;
}

/* Judge the packet whose key (all but tuple and ifindex) is in *pk, with the firewall on
 * (`cfg` from xlb_fw_on). */
static __always_inline int xlb_fw_judge(struct __sk_buff *skb, struct xlb_acl_cfg *cfg,
                                        struct xlb_acl_key *pk, __u32 *redirect)
{
    /* dpd changes one field per write (the count of the idle generation, then gen), so
     * gen and its count read apart are always a consistent pair */
    __u32 gen = cfg->gen & 1;
    __u64 n = cfg->n_tuples[gen]; /* 64-bit: the verifier follows the loop bound */
    __u32 flags = cfg->flags;

    __u32 ifindex = skb->ingress_ifindex;
    pk->ifindex = ifindex;
    pk->tuple = 0;
    xlb_count(XLB_STAT_FW_EVAL);

    __u32 best = XLB_RANK_NONE, rule_id = 0, redir = 0;
    __u8 action = 0;
    __u32 base = gen * XLB_ACL_TUPLES;
    if (n > XLB_ACL_TUPLES) /* a bound the verifier sees */
        n = XLB_ACL_TUPLES;
#pragma clang loop unroll(disable)
    for (__u64 i = 0; i < n; i++) {
        __u32 ti = base + i;
        struct xlb_acl_tuple *t = acl_tuple_map.lookup(&ti);
        if (!t || t->min_rank >= best)
            break;
        struct xlb_acl_key k;
        __u32 *kw = (__u32 *)&k;
        __u32 *pw = (__u32 *)pk;
        __u32 *mw = (__u32 *)&t->mask;
#pragma unroll
        for (int j = 0; j < XLB_ACL_KEY_WORDS; j++)
            kw[j] = pw[j] & mw[j];
        k.tuple = ti;
        struct xlb_acl_val *v = acl_map.lookup(&k);
        if (v && v->rank < best) {
            best = v->rank;
            rule_id = v->rule_id;
            action = v->action;
            redir = v->redirect_ifindex;
        }
    }

    if (best != XLB_RANK_NONE) {
        struct xlb_counter *c = acl_stats_map.lookup(&rule_id);
        if (c) {
            c->packets++;
            c->bytes += skb->len;
        }
        if (action == XLB_ACT_DROP) {
            xlb_count_drop(ifindex, XLB_STAT_DROP_FIREWALL);
            return XLB_FW_DROP;
        }
        if (action == XLB_ACT_REDIRECT) {
            xlb_count(XLB_STAT_FW_REDIRECT);
            *redirect = redir;
            return XLB_FW_REDIRECT;
        }
        if (action == XLB_ACT_TRAP) /* to dpd, then allowed */
            xlb_trap(skb, rule_id);
        return XLB_FW_ALLOW;
    }
    if (flags & XLB_ACL_F_POLICY_DROP) {
        struct xlb_intf *in = intf_map.lookup(&ifindex);
        if (in && in->policy == XLB_POLICY_DROP) {
            xlb_count_drop(ifindex, XLB_STAT_DROP_DEFAULT_POLICY);
            return XLB_FW_DROP;
        }
    }
    return XLB_FW_ALLOW;
}

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* An IPv6 packet's firewall key: the fixed header, and the ports of TCP and UDP or the
 * type of ICMPv6 right after it. A packet with extension headers is judged with the
 * extension header as its protocol and ports 0 (rules match it by addresses only).
 * XLB_P_OK, XLB_P_ND (neighbour discovery: passed unjudged) or XLB_P_BAD. */
static __always_inline int xlb_parse_v6(struct __sk_buff *skb, struct xlb_acl_key *k)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ipv6hdr *ip6 = data + XLB_L3_OFF;
    if ((void *)(ip6 + 1) > data_end || (*(__u8 *)ip6 >> 4) != 6)
        return XLB_P_BAD;
    __builtin_memset(k, 0, sizeof(*k));
    k->family = XLB_FAMILY_V6;
    k->proto = ip6->nexthdr;
    __builtin_memcpy(k->src, &ip6->saddr, 16);
    __builtin_memcpy(k->dst, &ip6->daddr, 16);
    void *l4 = (void *)(ip6 + 1);
    if (k->proto == IPPROTO_TCP || k->proto == IPPROTO_UDP) {
        __be16 *ports = l4;
        if ((void *)(ports + 2) > data_end)
            return XLB_P_BAD;
        k->sport = ports[0];
        k->dport = ports[1];
    } else if (k->proto == IPPROTO_ICMPV6) {
        __u8 *type = l4;
        if ((void *)(type + 1) > data_end)
            return XLB_P_BAD;
        if (*type >= 133 && *type <= 137) /* RS, RA, NS, NA, redirect */
            return XLB_P_ND;
    }
    return XLB_P_OK;
}

/* The key of an IPv4 packet as parsed (ports 0 unless TCP/UDP with its L4 header). */
static __always_inline void xlb_acl_key_v4(struct xlb_acl_key *k, struct xlb_pkt *p,
                                           int ports)
{
    __builtin_memset(k, 0, sizeof(*k));
    k->family = XLB_FAMILY_V4;
    k->proto = p->proto;
    if (ports) {
        k->sport = p->sport;
        k->dport = p->dport;
    }
    k->src[0] = p->saddr;
    k->dst[0] = p->daddr;
}

/* Judge an IPv4 packet; returns the TC action when the verdict ends its way here (drop,
 * redirect), else -1 with *judged telling whether the firewall judged it. */
static __always_inline int xlb_fw_v4(struct __sk_buff *skb, struct xlb_pkt *p, int ports,
                                     int *judged)
{
    struct xlb_acl_cfg *cfg = xlb_fw_on();
    *judged = cfg != NULL;
    if (!cfg)
        return -1;
    struct xlb_acl_key k;
    __u32 redirect = 0;
    xlb_acl_key_v4(&k, p, ports);
    int fw = xlb_fw_judge(skb, cfg, &k, &redirect);
    if (fw == XLB_FW_DROP)
        return TC_ACT_SHOT;
    if (fw == XLB_FW_REDIRECT)
        return bpf_redirect(redirect, 0);
    return -1;
}

#endif
