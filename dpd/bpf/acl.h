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
#include "police.h"
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

/* What a judgement leaves for conntrack to keep: a POLICE or MIRROR rule's flow carries
 * ctf (XLB_CTF_POLICE / XLB_CTF_MIRROR), the rule and its target in its ORIG entry, so
 * that every later packet is charged or copied too (xlb_fw_flow). */
struct xlb_fw_res {
    __u32 target;  /* REDIRECT: where to; POLICE: the policer; MIRROR: the mirror ifindex */
    __u32 rule_id;
    __u32 ctf;     /* 0, XLB_CTF_POLICE or XLB_CTF_MIRROR */
};

static __always_inline void xlb_fw_count_rule(__u32 rule_id, __u32 len)
{
    struct xlb_counter *c = acl_stats_map.lookup(&rule_id);
    if (c) {
        c->packets++;
        c->bytes += len;
    }
}

/* A copy of the packet as it is (nothing rewritten yet) out of `ifindex`. Packet
 * pointers are invalid afterwards (bpf_clone_redirect may move the data). */
static __always_inline void xlb_fw_mirror(struct __sk_buff *skb, __u32 ifindex)
{
    if (bpf_clone_redirect(skb, ifindex, 0) != 0)
        xlb_count(XLB_STAT_MIRROR_FAIL);
    else
        xlb_count(XLB_STAT_MIRRORED);
}

/* A later packet of a flow a POLICE or MIRROR rule opened (`v`: its ORIG entry, with
 * XLB_CTF_FW): TC_ACT_SHOT when its policer finds it over the rate (counted on the
 * policer, the rule and as drop_policer), else -1 after copying it to the mirror. */
static __always_inline int xlb_fw_flow(struct __sk_buff *skb, struct xlb_ct_val *v)
{
    __u32 len = skb->len;
    __u32 rule_id = v->fw_rule;
    if (v->flags & XLB_CTF_POLICE) {
        __u32 ifindex = skb->ingress_ifindex;
        if (xlb_police(v->fw_arg, len, ifindex)) {
            xlb_fw_count_rule(rule_id, len);
            xlb_count_drop(ifindex, XLB_STAT_DROP_POLICER);
            return TC_ACT_SHOT;
        }
        return -1;
    }
    xlb_fw_mirror(skb, v->fw_arg);
    xlb_fw_count_rule(rule_id, len);
    return -1;
}

/* Judge the packet whose key (all but tuple and ifindex) is in *pk, with the firewall on
 * (`cfg` from xlb_fw_on); *res says what conntrack keeps of it. POLICE and MIRROR act on
 * the packet here (dropped over the rate; copied), then go on as allow. */
static __always_inline int xlb_fw_judge_res(struct __sk_buff *skb, struct xlb_acl_cfg *cfg,
                                            struct xlb_acl_key *pk, struct xlb_fw_res *res)
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
            redir = v->target;
        }
    }

    if (best != XLB_RANK_NONE) {
        xlb_fw_count_rule(rule_id, skb->len);
        if (action == XLB_ACT_DROP) {
            xlb_count_drop(ifindex, XLB_STAT_DROP_FIREWALL);
            return XLB_FW_DROP;
        }
        res->target = redir;
        if (action == XLB_ACT_REDIRECT) {
            xlb_count(XLB_STAT_FW_REDIRECT);
            return XLB_FW_REDIRECT;
        }
        if (action == XLB_ACT_TRAP) /* to dpd, then allowed */
            xlb_trap(skb, rule_id);
        if (action == XLB_ACT_POLICE) {
            if (xlb_police(redir, skb->len, ifindex)) {
                xlb_count_drop(ifindex, XLB_STAT_DROP_POLICER);
                return XLB_FW_DROP;
            }
            res->ctf = XLB_CTF_POLICE;
            res->rule_id = rule_id;
        }
        if (action == XLB_ACT_MIRROR) {
            xlb_fw_mirror(skb, redir);
            res->ctf = XLB_CTF_MIRROR;
            res->rule_id = rule_id;
        }
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

/* xlb_fw_judge_res for a packet whose flow is not tracked by the caller: *redirect is
 * where a REDIRECT sends it. */
static __always_inline int xlb_fw_judge(struct __sk_buff *skb, struct xlb_acl_cfg *cfg,
                                        struct xlb_acl_key *pk, __u32 *redirect)
{
    struct xlb_fw_res res = {};
    int fw = xlb_fw_judge_res(skb, cfg, pk, &res);
    *redirect = res.target;
    return fw;
}

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* An IPv6 packet's firewall key: the fixed header, and the ports of TCP, UDP and SCTP or
 * the type of ICMPv6 right after it. A packet with extension headers is judged with the
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
    if (k->proto == IPPROTO_TCP || k->proto == IPPROTO_UDP || k->proto == IPPROTO_SCTP) {
        __be16 *ports = l4; /* SCTP's common header starts with them too */
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

/* The key of an IPv4 packet as parsed (ports 0 unless TCP/UDP/SCTP with its L4 header). */
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
 * redirect), else -1 with *judged telling whether the firewall judged it and *res what
 * the flow's conntrack entry keeps. */
static __always_inline int xlb_fw_v4_res(struct __sk_buff *skb, struct xlb_pkt *p, int ports,
                                         int *judged, struct xlb_fw_res *res)
{
    struct xlb_acl_cfg *cfg = xlb_fw_on();
    *judged = cfg != NULL;
    if (!cfg)
        return -1;
    struct xlb_acl_key k;
    xlb_acl_key_v4(&k, p, ports);
    int fw = xlb_fw_judge_res(skb, cfg, &k, res);
    if (fw == XLB_FW_DROP)
        return TC_ACT_SHOT;
    if (fw == XLB_FW_REDIRECT)
        return bpf_redirect(res->target, 0);
    return -1;
}

/* xlb_fw_v4_res for a packet whose flow is not tracked from here (ICMP, a later
 * fragment): a POLICE or MIRROR rule acts on each such packet as it is judged. */
static __always_inline int xlb_fw_v4(struct __sk_buff *skb, struct xlb_pkt *p, int ports,
                                     int *judged)
{
    struct xlb_fw_res res = {};
    return xlb_fw_v4_res(skb, p, ports, judged, &res);
}

#endif
