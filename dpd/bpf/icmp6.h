/* ICMPv6 errors about IPv6 service flows (docs/ipv6.md), translated as icmp.h translates
 * IPv4's, so that path MTU discovery (packet too big) and connection errors work through
 * an IPv6 VIP and no endpoint address leaks:
 *
 * - quoting the client's packet after DNAT66 (client -> endpoint), sent to the client by
 *   the endpoint or a router: the quoted destination becomes VIP:port, and the outer
 *   source too when the endpoint itself reports (a router's stays);
 * - quoting a reply after reverse NAT (VIP -> client), sent to the VIP by the client or
 *   a router: the quoted source and the outer destination become the endpoint's.
 *
 * Full-NAT66 flows: both quoted ends are translated (the source address:port and the
 * client's), and the error goes to the client (first case) or comes from the full-NAT
 * source when the client itself reports (second case). DSR flows: an error sent to the
 * VIP quoting a reply is sent on, unchanged, to the flow's endpoint (by its MAC or
 * inside ip6ip6), which needs it as it is.
 *
 * Translated: destination unreachable (1), packet too big (2), time exceeded (3) and
 * parameter problem (4) whose quote is a fixed IPv6 header followed by TCP or UDP with
 * at least its ports, from the quoted packet's destination side to its source (the outer
 * destination is the quoted source), and whose reversed quoted tuple is the key of a
 * tracked flow's entry (the entry for the other direction, whose rewrite is the
 * translation). Anything else (echo requests, neighbour discovery, errors quoting no
 * flow or a quote with an extension header) goes on to the IPv6 slow path untouched: the
 * firewall judges it, then an echo request to a VIP is answered (svc6.h xlb_echo6) and
 * the stack gets the rest.
 *
 * Checksums: IPv6 has no header checksum; the quoted TCP or UDP checksum (when the quote
 * holds it; a UDP 0 stays) follows the quoted addresses and ports, and the ICMPv6
 * checksum every changed word of the message and of its pseudo header (the outer
 * addresses: bpf_l4_csum_replace with BPF_F_PSEUDO_HDR, which keeps a CHECKSUM_COMPLETE
 * skb's sum right). */
#ifndef XLB_ICMP6_H
#define XLB_ICMP6_H

#include <uapi/linux/icmpv6.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "icmp.h"
#include "svc6.h"

#define XLB_ICMP6_IN_OFF (XLB_L4_OFF6 + 8)    /* the quoted IPv6 header */
#define XLB_ICMP6_IN_L4 (XLB_ICMP6_IN_OFF + 40) /* the quoted TCP or UDP header */

static __always_inline int xlb_icmp6_is_error(__u8 type)
{
    return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
           type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

/* The conntrack key of the flow an ICMPv6 error quotes (its quoted tuple, reversed) into
 * `k`: 0, or -1 when the packet is no such error or its quote is not one we translate. */
static __always_inline int xlb_icmp6_quote(struct __sk_buff *skb, struct xlb_pkt6 *p,
                                           struct xlb_ct6_key *k)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct icmp6hdr *ic = data + XLB_L4_OFF6;
    struct ipv6hdr *in = data + XLB_ICMP6_IN_OFF;
    __u16 *ports = data + XLB_ICMP6_IN_L4; /* [0] quoted source, [1] quoted destination */
    if ((void *)(ports + 2) > data_end || !xlb_icmp6_is_error(ic->icmp6_type))
        return -1;
    /* the ports inside the outer payload length, not only inside the frame */
    if (p->b.l4_len < XLB_ICMP6_IN_L4 + 4 - XLB_L4_OFF6)
        return -1;
    if ((*(__u8 *)in >> 4) != 6 || (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
        return -1;
    __be32 *q_s = (__be32 *)&in->saddr;
    __be32 *q_d = (__be32 *)&in->daddr;
    if (!xlb_a6_eq(q_s, p->daddr)) /* an error goes to the source of what it quotes */
        return -1;
    xlb_a6_cp(k->saddr, q_d);
    xlb_a6_cp(k->daddr, q_s);
    k->sport = ports[1];
    k->dport = ports[0];
    k->proto = in->nexthdr;
    k->pad[0] = k->pad[1] = k->pad[2] = 0;
    return 0;
}

/* Rewrite the error by entry `v` (the quoted flow's entry for the other direction). */
static __always_inline int xlb_icmp6_rewrite(struct __sk_buff *skb, struct xlb_pkt6 *p,
                                             struct xlb_ct6_val *v)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ipv6hdr *ip6 = data + XLB_L3_OFF;
    struct icmp6hdr *ic = data + XLB_L4_OFF6;
    struct ipv6hdr *in = data + XLB_ICMP6_IN_OFF;
    __u16 *ports = data + XLB_ICMP6_IN_L4;
    if ((void *)(ports + 2) > data_end)
        return -1;
    __be32 *o_s = (__be32 *)&ip6->saddr;
    __be32 *o_d = (__be32 *)&ip6->daddr;
    __be32 *q_s = (__be32 *)&in->saddr;
    __be32 *q_d = (__be32 *)&in->daddr;
    __u8 proto = in->nexthdr;
    /* what the quoted ends and the outer ends become (NULL: unchanged); all point into
     * the entry, none into the packet */
    const __be32 *n_s = NULL, *n_d = NULL, *no_s = NULL, *no_d = NULL;
    __be16 n_sp = ports[0], n_dp = ports[1];
    int fnat = v->c.flags & XLB_CTF_FNAT;
    int self = xlb_a6_eq(o_s, q_d); /* the quoted packet's destination reports */
    if (v->c.dir == XLB_DIR_REPLY) {
        /* quoted: client (full-NAT: its source) -> endpoint; becomes client -> VIP */
        n_d = v->nat_addr;
        n_dp = v->c.nat_port;
        if (fnat) { /* sent to the full-NAT source: goes to the client */
            n_s = v->nat2_addr;
            n_sp = v->c.nat2_port;
            no_d = n_s;
        }
        if (self) /* the endpoint itself reports: from the VIP */
            no_s = n_d;
    } else {
        /* quoted: VIP -> client; becomes endpoint -> client (full-NAT: -> its source),
         * sent to the endpoint */
        n_s = v->nat_addr;
        n_sp = v->c.nat_port;
        no_d = n_s;
        if (fnat) {
            n_d = v->nat2_addr;
            n_dp = v->c.nat2_port;
            if (self) /* the client itself reports: from the full-NAT source */
                no_s = n_d;
        }
    }
    __u32 in_delta = (~ports[0] & 0xffff) + n_sp + (~ports[1] & 0xffff) + n_dp;
    if (n_s) {
        in_delta += xlb_delta16(q_s, n_s);
        xlb_a6_cp(q_s, n_s);
    }
    if (n_d) {
        in_delta += xlb_delta16(q_d, n_d);
        xlb_a6_cp(q_d, n_d);
    }
    ports[0] = n_sp;
    ports[1] = n_dp;
    __u32 icmp_delta = in_delta;
    /* the quoted L4 checksum (its pseudo header holds the quoted addresses) */
    if (proto == IPPROTO_TCP) {
        __u16 *cs = (void *)ports + offsetof(struct tcphdr, check);
        if ((void *)(cs + 1) <= data_end)
            icmp_delta += xlb_csum_fix(cs, in_delta);
    } else {
        __u16 *cs = (void *)ports + offsetof(struct udphdr, check);
        if ((void *)(cs + 1) <= data_end && *cs) {
            __u16 old = *cs;
            __u16 new = ~xlb_fold((__u16)~old + in_delta);
            if (!new)
                new = 0xffff;
            *cs = new;
            icmp_delta += (~old & 0xffff) + new;
        }
    }
    xlb_csum_fix(&ic->icmp6_cksum, icmp_delta);
    /* the outer addresses: in the ICMPv6 checksum's pseudo header only */
    __u32 out_delta = 0;
    if (no_s) {
        out_delta += xlb_delta16(o_s, no_s);
        xlb_a6_cp(o_s, no_s);
        xlb_a6_cp(p->saddr, no_s);
    }
    if (no_d) {
        out_delta += xlb_delta16(o_d, no_d);
        xlb_a6_cp(o_d, no_d);
        xlb_a6_cp(p->daddr, no_d);
    }
    if (out_delta)
        bpf_l4_csum_replace(skb, XLB_L4_OFF6 + offsetof(struct icmp6hdr, icmp6_cksum), 0,
                            out_delta, BPF_F_PSEUDO_HDR);
    return 0;
}

/* tc_packet_func_slow6's first step: an ICMPv6 error about a tracked flow translated
 * and sent (as conntrack's RELATED: not judged by the firewall again); -1 for anything
 * else, which goes on untouched. */
static __always_inline int xlb_icmp6(struct __sk_buff *skb)
{
    struct xlb_pkt6 p;
    if (xlb_parse6(skb, &p) != XLB_P_ICMP)
        return -1;
    struct xlb_ct6_key k;
    if (xlb_icmp6_quote(skb, &p, &k))
        return -1;
    struct xlb_ct6_val *v = ct_v6_map.lookup(&k);
    if (!v || (v->c.flags & XLB_CTF_PASS)) /* a pass flow's errors need no translation */
        return -1;
    if (v->c.flags & XLB_CTF_DSR) {
        /* quoting a reply the endpoint sent the client directly (VIP -> client), sent
         * to the VIP: the endpoint needs it as it is (path MTU discovery) */
        xlb_count(XLB_STAT_ICMP_NAT);
        return xlb_dsr6_out(skb, &p, v->nat_addr, v->nat2_addr, v->c.flags & XLB_CTF_IPIP);
    }
    if (xlb_icmp6_rewrite(skb, &p, v))
        return -1;
    xlb_count(XLB_STAT_ICMP_NAT);
    p.b.sport = 0;
    p.b.dport = 0;
    return xlb_forward6(skb, &p);
}

#endif
