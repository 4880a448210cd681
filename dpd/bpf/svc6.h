/* IPv6 services (docs/ipv6.md): the IPv6 twin of the IPv4 pipeline, with its own
 * service map (nat_v6_map) and conntrack (ct_v6_map), reusing IPv4's endpoint selection
 * (lb.h xlb_select_idx, on the embedded struct xlb_nat_val; endpoint addresses in
 * ep6_map beside ep_map) and its conntrack state machine (ct.h
 * xlb_ct_step_pv, on the embedded struct xlb_ct_val).
 *
 * Only the fixed header is parsed: TCP or UDP right after it. A packet with an extension
 * header passes untouched (pass_v6_ext), never rewritten; so do malformed ones (a payload
 * length beyond the frame, a TCP data offset beyond the payload, a UDP length beyond the
 * payload or a zero UDP checksum, which IPv6 forbids). NAT66 rewrites addresses and ports
 * with the L4 checksum adjusted over the pseudo header (IPv6 has no header checksum).
 * Modes as IPv4's: DNAT, full-NAT (source rewritten to the service's or the node's IPv6
 * address and a port that makes the reply's key unique), DSR on L2 (MACs and hop limit
 * only) and DSR through IPv6-in-IPv6 (an outer IPv6 header, next header 41). */
#ifndef XLB_SVC6_H
#define XLB_SVC6_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "acl.h"
#include "ct.h"
#include "fwd.h"
#include "lb.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IPPROTO_IPV6
#define IPPROTO_IPV6 41
#endif

#define XLB_L4_OFF6 54   /* Ethernet + the fixed IPv6 header */
#define XLB_P6_EXT 16    /* xlb_parse6: an extension header follows the fixed header */

struct xlb_pkt6 {
    struct xlb_pkt b;  /* b.saddr, b.daddr: 32-bit folds of the addresses (selection's
                        * hashes, persistence); b.ttl the hop limit; the rest as IPv4 */
    __be32 saddr[4];
    __be32 daddr[4];
    __be32 flowinfo;   /* traffic class and flow label (the FIB lookup's) */
};

/* struct bpf_redir_neigh with an IPv6 next hop */
struct xlb_redir_neigh6 {
    __u32 nh_family;
    __be32 ipv6_nh[4];
};

static __always_inline __be32 xlb_fold6(const __be32 *a)
{
    return a[0] ^ a[1] ^ a[2] ^ a[3];
}

static __always_inline int xlb_a6_eq(const __be32 *a, const __be32 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void xlb_a6_cp(__be32 *d, const __be32 *s)
{
    d[0] = s[0];
    d[1] = s[1];
    d[2] = s[2];
    d[3] = s[3];
}

static __always_inline int xlb_a6_zero(const __be32 *a)
{
    return !(a[0] | a[1] | a[2] | a[3]);
}

/* Extension headers (RFC 8200 and the IANA list): hop-by-hop, routing, fragment, ESP,
 * AH, destination options, mobility, HIP, shim6, experimental. */
static __always_inline int xlb_v6_ext(__u8 nh)
{
    return nh == 0 || nh == 43 || nh == 44 || nh == 50 || nh == 51 || nh == 60 ||
           nh == 135 || nh == 139 || nh == 140 || nh == 253 || nh == 254;
}

/* Sources that never open a flow: ::, ::1, multicast ff00::/8. */
static __always_inline int xlb_martian6(const __be32 *a)
{
    if (((__u8 *)a)[0] == 0xff)
        return 1;
    return !(a[0] | a[1] | a[2]) && (a[3] == 0 || a[3] == bpf_htonl(1));
}

/* XLB_P_OK (TCP or UDP after the fixed header, valid), XLB_P_ICMP (ICMPv6), XLB_P6_EXT,
 * XLB_P_NOT_OURS or XLB_P_BAD. */
static __always_inline int xlb_parse6(struct __sk_buff *skb, struct xlb_pkt6 *p)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ipv6hdr *ip6 = data + XLB_L3_OFF;
    if ((void *)(ip6 + 1) > data_end || (*(__u8 *)ip6 >> 4) != 6)
        return XLB_P_BAD;
    if (skb->pkt_type == XLB_PACKET_OTHERHOST)
        return XLB_P_NOT_OURS;
    __builtin_memset(p, 0, sizeof(*p));
    __u32 frame = skb->len - XLB_L3_OFF;
    __u32 plen = bpf_ntohs(ip6->payload_len);
    if (plen + sizeof(*ip6) > frame)
        return XLB_P_BAD;
    __builtin_memcpy(p->saddr, &ip6->saddr, 16);
    __builtin_memcpy(p->daddr, &ip6->daddr, 16);
    p->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
    p->b.saddr = xlb_fold6(p->saddr);
    p->b.daddr = xlb_fold6(p->daddr);
    p->b.proto = ip6->nexthdr;
    p->b.ttl = ip6->hop_limit;
    p->b.tos = (__u8)(bpf_ntohl(p->flowinfo) >> 20);
    p->b.tot_len = plen + sizeof(*ip6);
    p->b.l4_len = plen;
    void *l4 = (void *)(ip6 + 1);
    if (p->b.proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return XLB_P_BAD;
        __u32 doff = ((__u8 *)tcp)[12] >> 4;
        if (doff < 5 || doff * 4 > plen)
            return XLB_P_BAD;
        p->b.sport = tcp->source;
        p->b.dport = tcp->dest;
        p->b.tcp_flags = ((__u8 *)tcp)[13];
        p->b.seq = bpf_ntohl(tcp->seq);
        p->b.ack_seq = bpf_ntohl(tcp->ack_seq);
        p->b.payload = plen - doff * 4;
        return XLB_P_OK;
    }
    if (p->b.proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return XLB_P_BAD;
        __u32 ulen = bpf_ntohs(udp->len);
        if (ulen < sizeof(*udp) || ulen > plen || udp->check == 0)
            return XLB_P_BAD;
        p->b.sport = udp->source;
        p->b.dport = udp->dest;
        return XLB_P_OK;
    }
    if (p->b.proto == IPPROTO_ICMPV6)
        return XLB_P_ICMP;
    return xlb_v6_ext(p->b.proto) ? XLB_P6_EXT : XLB_P_NOT_OURS;
}

/* -- conntrack ------------------------------------------------------------------------ */

static __always_inline void xlb_ct6_key_of(struct xlb_ct6_key *k, struct xlb_pkt6 *p)
{
    xlb_a6_cp(k->saddr, p->saddr);
    xlb_a6_cp(k->daddr, p->daddr);
    k->sport = p->b.sport;
    k->dport = p->b.dport;
    k->proto = p->b.proto;
    k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* As xlb_ct_peer_key. */
static __always_inline void xlb_ct6_peer_key(struct xlb_ct6_key *pk, struct xlb_ct6_key *k,
                                             struct xlb_ct6_val *v)
{
    int fnat = v->c.flags & XLB_CTF_FNAT;
    pk->proto = k->proto;
    pk->pad[0] = pk->pad[1] = pk->pad[2] = 0;
    if (v->c.dir == XLB_DIR_ORIG) {
        xlb_a6_cp(pk->saddr, v->nat_addr);
        pk->sport = v->c.nat_port;
        xlb_a6_cp(pk->daddr, fnat ? v->nat2_addr : k->saddr);
        pk->dport = fnat ? v->c.nat2_port : k->sport;
    } else {
        xlb_a6_cp(pk->saddr, fnat ? v->nat2_addr : k->daddr);
        pk->sport = fnat ? v->c.nat2_port : k->dport;
        xlb_a6_cp(pk->daddr, v->nat_addr);
        pk->dport = v->c.nat_port;
    }
}

/* As xlb_ct_is_peer: `pv` rewrites back to `k`. */
static __always_inline int xlb_ct6_is_peer(struct xlb_ct6_key *k, struct xlb_ct6_val *v,
                                           struct xlb_ct6_val *pv)
{
    int fnat = v->c.flags & XLB_CTF_FNAT;
    if (pv->c.dir == v->c.dir || (pv->c.flags & XLB_CTF_FNAT) != fnat)
        return 0;
    if (v->c.dir == XLB_DIR_ORIG)
        return xlb_a6_eq(pv->nat_addr, k->daddr) && pv->c.nat_port == k->dport &&
               (!fnat || (xlb_a6_eq(pv->nat2_addr, k->saddr) && pv->c.nat2_port == k->sport));
    return xlb_a6_eq(pv->nat_addr, k->saddr) && pv->c.nat_port == k->sport &&
           (!fnat || (xlb_a6_eq(pv->nat2_addr, k->daddr) && pv->c.nat2_port == k->dport));
}

static __always_inline struct xlb_ct6_val *xlb_ct6_peer(struct xlb_ct6_key *k,
                                                        struct xlb_ct6_val *v)
{
    struct xlb_ct6_key pk;
    xlb_ct6_peer_key(&pk, k, v);
    struct xlb_ct6_val *pv = ct_v6_map.lookup(&pk);
    if (pv && !xlb_ct6_is_peer(k, v, pv))
        return NULL;
    return pv;
}

static __always_inline void xlb_ct6_delete_flow(struct xlb_ct6_key *k, struct xlb_ct6_val *v)
{
    struct xlb_ct6_key pk;
    xlb_ct6_peer_key(&pk, k, v);
    struct xlb_ct6_val *pv = ct_v6_map.lookup(&pk);
    if (pv && xlb_ct6_is_peer(k, v, pv))
        ct_v6_map.delete(&pk);
    ct_v6_map.delete(k);
}

/* As xlb_ct_reclaim: 0 when the REPLY key `rk` is free (again). */
static __always_inline int xlb_ct6_reclaim(struct xlb_ct6_key *rk)
{
    struct xlb_ct6_val *old = ct_v6_map.lookup(rk);
    if (!old)
        return 0;
    struct xlb_ct6_val *op = xlb_ct6_peer(rk, old);
    if (op && old->c.state != XLB_CT_CLOSED)
        return -1;
    xlb_ct6_delete_flow(rk, old);
    return 0;
}

/* -- rewrite and forwarding ---------------------------------------------------------- */

static __always_inline __u32 xlb_delta16(const __be32 *from, const __be32 *to)
{
    return xlb_delta4(from[0], to[0]) + xlb_delta4(from[1], to[1]) +
           xlb_delta4(from[2], to[2]) + xlb_delta4(from[3], to[3]);
}

/* NAT66. ORIG rewrites the destination to (addr, port), REPLY the source; full-NAT
 * (`full`) the other end too: ORIG's source, REPLY's destination to (addr2, port2).
 * Two checksum helper calls: the addresses' delta (pseudo header), the ports'. */
static __always_inline int xlb_nat66(struct __sk_buff *skb, struct xlb_pkt6 *p, __u8 dir,
                                     const __be32 *addr, __be16 port, const __be32 *addr2,
                                     __be16 port2, int full)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ipv6hdr *ip6 = data + XLB_L3_OFF;
    __u16 *ports = data + XLB_L4_OFF6; /* [0] source, [1] destination */
    if ((void *)(ip6 + 1) > data_end || (void *)(ports + 2) > data_end)
        return -1;
    __be32 *sa = (__be32 *)&ip6->saddr;
    __be32 *da = (__be32 *)&ip6->daddr;
    __u32 adelta, pdelta;
    if (dir == XLB_DIR_ORIG) {
        adelta = xlb_delta16(da, addr);
        pdelta = (~ports[1] & 0xffff) + port;
        xlb_a6_cp(da, addr);
        xlb_a6_cp(p->daddr, addr);
        ports[1] = port;
        p->b.dport = port;
        if (full) {
            adelta += xlb_delta16(sa, addr2);
            pdelta += (~ports[0] & 0xffff) + port2;
            xlb_a6_cp(sa, addr2);
            xlb_a6_cp(p->saddr, addr2);
            ports[0] = port2;
            p->b.sport = port2;
        }
    } else {
        adelta = xlb_delta16(sa, addr);
        pdelta = (~ports[0] & 0xffff) + port;
        xlb_a6_cp(sa, addr);
        xlb_a6_cp(p->saddr, addr);
        ports[0] = port;
        p->b.sport = port;
        if (full) {
            adelta += xlb_delta16(da, addr2);
            pdelta += (~ports[1] & 0xffff) + port2;
            xlb_a6_cp(da, addr2);
            xlb_a6_cp(p->daddr, addr2);
            ports[1] = port2;
            p->b.dport = port2;
        }
    }
    __u32 csum_off;
    __u64 l4flags = 0;
    if (p->b.proto == IPPROTO_TCP) {
        csum_off = XLB_L4_OFF6 + offsetof(struct tcphdr, check);
    } else {
        csum_off = XLB_L4_OFF6 + offsetof(struct udphdr, check);
        l4flags = BPF_F_MARK_MANGLED_0;
    }
    bpf_l4_csum_replace(skb, csum_off, 0, adelta, l4flags | BPF_F_PSEUDO_HDR);
    bpf_l4_csum_replace(skb, csum_off, 0, pdelta, l4flags);
    return 0;
}

/* The node's IPv6 address toward `dst` (the FIB's preferred source) into `out`; 0, or
 * -1 when there is no route. */
static __always_inline int xlb_src_toward6(struct __sk_buff *skb, const __be32 *dst,
                                           __be32 *out)
{
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET6;
    xlb_a6_cp(fib.ipv6_dst, dst);
    fib.ifindex = skb->ingress_ifindex;
    if (bpf_fib_lookup(skb, &fib, sizeof(fib), XLB_FIB_SRC | XLB_FIB_SKIP_NEIGH) !=
        BPF_FIB_LKUP_RET_SUCCESS)
        return -1;
    xlb_a6_cp(out, fib.ipv6_src);
    return xlb_a6_zero(out) ? -1 : 0;
}

/* As xlb_forward: with XLB_CFG_REDIRECT, a FIB lookup of the rewritten packet, the hop
 * limit decremented and the packet redirected; else (or no answer) the kernel routes. */
static __always_inline int xlb_forward6(struct __sk_buff *skb, struct xlb_pkt6 *p)
{
    u32 zero = 0;
    struct xlb_cfg *cfg = cfg_map.lookup(&zero);
    if (!cfg || !(cfg->flags & XLB_CFG_REDIRECT) || p->b.ttl <= 1)
        goto stack;
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET6;
    fib.flowinfo = p->flowinfo;
    fib.l4_protocol = p->b.proto;
    fib.sport = p->b.sport;
    fib.dport = p->b.dport;
    fib.tot_len = p->b.tot_len;
    xlb_a6_cp(fib.ipv6_src, p->saddr);
    xlb_a6_cp(fib.ipv6_dst, p->daddr);
    fib.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        goto stack;
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ethhdr *eth = data;
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > data_end)
        goto stack;
    ip6->hop_limit = p->b.ttl - 1;
    return xlb_fib_out(skb, &fib, rc, NULL, 0, XLB_STAT_REDIRECT);
stack:
    xlb_count(XLB_STAT_TO_STACK);
    return TC_ACT_OK;
}

/* As xlb_dsr_out: to endpoint `ep` unchanged, by its MAC (L2: the endpoint must be the
 * FIB's next hop) or inside an outer IPv6 header from `outer_src` (`tunnel`). No route:
 * dropped (drop_no_route), never handed to the stack. */
static __always_inline int xlb_dsr6_out(struct __sk_buff *skb, struct xlb_pkt6 *p,
                                        const __be32 *ep, const __be32 *outer_src, int tunnel)
{
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET6;
    fib.flowinfo = p->flowinfo;
    fib.l4_protocol = tunnel ? IPPROTO_IPV6 : p->b.proto;
    xlb_a6_cp(fib.ipv6_src, tunnel ? outer_src : p->saddr);
    xlb_a6_cp(fib.ipv6_dst, ep);
    fib.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
        (!tunnel && (!xlb_a6_eq(fib.ipv6_dst, ep) || p->b.ttl <= 1))) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
        return TC_ACT_SHOT;
    }
    struct xlb_redir_neigh6 nh = {};
    nh.nh_family = AF_INET6;
    xlb_a6_cp(nh.ipv6_nh, fib.ipv6_dst);
    if (tunnel) {
        __u32 inner_len = skb->len - XLB_L3_OFF;
        if (bpf_skb_adjust_room(skb, sizeof(struct ipv6hdr), BPF_ADJ_ROOM_MAC,
                                BPF_F_ADJ_ROOM_ENCAP_L3_IPV6)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
            return TC_ACT_SHOT;
        }
        void *data = xlb_data(skb);
        void *data_end = xlb_data_end(skb);
        struct ipv6hdr *o = data + XLB_L3_OFF;
        if ((void *)(o + 1) > data_end)
            return TC_ACT_SHOT;
        /* version 6, the inner traffic class, flow label 0 */
        *(__be32 *)o = bpf_htonl(0x60000000 | ((__u32)p->b.tos << 20));
        o->payload_len = bpf_htons(inner_len);
        o->nexthdr = IPPROTO_IPV6;
        o->hop_limit = XLB_IPIP_TTL;
        __builtin_memcpy(&o->saddr, outer_src, 16);
        __builtin_memcpy(&o->daddr, ep, 16);
    } else {
        void *data = xlb_data(skb);
        void *data_end = xlb_data_end(skb);
        struct ipv6hdr *ip6 = data + XLB_L3_OFF;
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_SHOT;
        ip6->hop_limit = p->b.ttl - 1;
    }
    return xlb_fib_out(skb, &fib, rc, &nh, sizeof(nh), XLB_STAT_DSR);
}

/* Rewrite and send a packet of the tracked flow of entry `v`, by its mode. */
static __always_inline int xlb_flow_out6(struct __sk_buff *skb, struct xlb_pkt6 *p,
                                         struct xlb_ct6_val *v)
{
    if (v->c.flags & XLB_CTF_DSR)
        return xlb_dsr6_out(skb, p, v->nat_addr, v->nat2_addr, v->c.flags & XLB_CTF_IPIP);
    if (xlb_nat66(skb, p, v->c.dir, v->nat_addr, v->c.nat_port, v->nat2_addr,
                  v->c.nat2_port, v->c.flags & XLB_CTF_FNAT) < 0)
        return TC_ACT_OK;
    return xlb_forward6(skb, p);
}

/* -- entry points ---------------------------------------------------------------------- */

/* tc_packet_func's IPv6 part: a packet of an established flow (TCP: ACK without SYN,
 * FIN, RST) rewritten and sent from one conntrack lookup; -1: the slow path decides. */
static __always_inline int xlb_v6_fast(struct __sk_buff *skb)
{
    struct xlb_pkt6 p;
    if (xlb_parse6(skb, &p) != XLB_P_OK)
        return -1;
    struct xlb_ct6_key k;
    xlb_ct6_key_of(&k, &p);
    struct xlb_ct6_val *v = ct_v6_map.lookup(&k);
    __u8 want = p.b.proto == IPPROTO_TCP ? XLB_TCP_ACK : 0;
    if (!v || v->c.state != XLB_CT_EST ||
        (p.b.tcp_flags & (XLB_TCP_SYN | XLB_TCP_FIN | XLB_TCP_RST | XLB_TCP_ACK)) != want)
        return -1;
    if (want)
        xlb_ct_track_seq(&v->c, &p.b);
    xlb_ct_touch(&v->c);
    xlb_count_flow(skb, v->c.svc_id, v->c.stat_id);
    return xlb_flow_out6(skb, &p, v);
}

/* The source a rewritten packet of an IPv6 service takes (full-NAT, ip6ip6's outer
 * source): the service's own, else the node's toward the endpoint. -1: no route. */
static __always_inline int xlb_svc_source6(struct __sk_buff *skb, struct xlb_nat6_val *svc,
                                           const __be32 *ep, __be32 *out)
{
    if (!xlb_a6_zero(svc->snat_addr)) {
        xlb_a6_cp(out, svc->snat_addr);
        return 0;
    }
    return xlb_src_toward6(skb, ep, out);
}

/* A new flow to an IPv6 service, as xlb_new_flow: endpoint selection (lb.h), both
 * conntrack entries (DSR: ORIG only), never over another flow's. Returns the TC action
 * when the packet's way ends here, else -1 with the ORIG entry in `e` (the caller sends
 * the packet by it: one copy of the rewrite and forwarding code, and of their stack). */
static __always_inline int xlb_new_flow6(struct __sk_buff *skb, struct xlb_pkt6 *p,
                                         struct xlb_scratch6 *s)
{
    struct xlb_ct6_val *e = &s->e;
    struct xlb_nat6_key nk = {};
    xlb_a6_cp(nk.vip, p->daddr);
    nk.port = p->b.dport;
    nk.proto = p->b.proto;
    struct xlb_nat6_val *svc = nat_v6_map.lookup(&nk);
    if (!svc) {
        xlb_count(XLB_STAT_PASS);
        return TC_ACT_OK;
    }
    int midstream = 0;
    if (p->b.proto == IPPROTO_TCP) {
        __u8 c = p->b.tcp_flags & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST | XLB_TCP_ACK);
        if (c == XLB_TCP_ACK) {
            midstream = 1;
        } else if (c != XLB_TCP_SYN) {
            xlb_count(XLB_STAT_PASS_BAD_FLAGS);
            return TC_ACT_OK;
        }
    }
    if (xlb_martian6(p->saddr)) {
        xlb_count(XLB_STAT_PASS_MARTIAN);
        return TC_ACT_OK;
    }
    /* IPv4's selection on the folds of the addresses; the address from ep6_map */
    int idx = xlb_select_idx(&svc->sel, xlb_flow_hash(&p->b),
                             xlb_mix(p->b.saddr ^ 0x9e3779b9), p->b.saddr, midstream);
    struct xlb_ep *ep = idx < 0 ? NULL : xlb_ep_at(&svc->sel, idx);
    __u32 at = svc->sel.ep_base + idx;
    struct xlb_ep6 *ep6 = ep ? ep6_map.lookup(&at) : NULL;
    if (!ep || !ep6) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ENDPOINT);
        return TC_ACT_SHOT;
    }
    __be32 *ep_addr = ep6->addr;
    __be16 ep_port = ep->port;
    __u32 stat_id = ep->stat_id;
    __u8 mode = svc->sel.mode;
    __u8 algo = svc->sel.algo;

    /* One value, first the REPLY entry's (endpoint -> client: the source becomes the
     * VIP), then turned into the ORIG entry's (client -> VIP: the destination becomes
     * the endpoint). */
    __builtin_memset(e, 0, sizeof(*e));
    e->c.svc_id = svc->sel.svc_id;
    e->c.stat_id = stat_id;
    e->c.state = midstream ? XLB_CT_EST : XLB_CT_NEW;
    e->c.last_ns = bpf_ktime_get_coarse_ns();
    e->c.in_ifindex = skb->ingress_ifindex;
    e->svc = nk;
    /* full-NAT's source, ip6ip6's outer source */
    __be32 src[4] = {};
    if ((mode == XLB_MODE_FULLNAT || mode == XLB_MODE_DSR_IPIP) &&
        xlb_svc_source6(skb, svc, ep_addr, src)) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
        return TC_ACT_SHOT;
    }
    struct xlb_ct6_key *k = &s->k;
    xlb_ct6_key_of(k, p);
    struct xlb_ct6_key *rk = &s->rk;
    __builtin_memset(rk, 0, sizeof(*rk));
    int dsr = mode == XLB_MODE_DSR || mode == XLB_MODE_DSR_IPIP;
    if (!dsr) {
        xlb_a6_cp(rk->saddr, ep_addr);
        rk->sport = ep_port;
        xlb_a6_cp(rk->daddr, p->saddr);
        rk->dport = p->b.sport;
        rk->proto = p->b.proto;
        e->c.dir = XLB_DIR_REPLY;
        xlb_a6_cp(e->nat_addr, nk.vip);
        e->c.nat_port = nk.port;
    }
    if (mode == XLB_MODE_FULLNAT) {
        e->c.flags = XLB_CTF_FNAT;
        xlb_a6_cp(e->nat2_addr, p->saddr);
        e->c.nat2_port = p->b.sport;
        xlb_a6_cp(rk->daddr, src);
        __u32 h = xlb_mix(xlb_flow_hash(&p->b) ^ xlb_fold6(ep_addr) ^ ep_port);
        __u32 count = xlb_a6_zero(svc->snat_addr) ? XLB_SNAT_PORT_COUNT : XLB_SNAT_PORT_COUNT_OWN;
        __u32 cport = bpf_ntohs(p->b.sport);
        int keep = cport >= XLB_SNAT_PORT_MIN && cport - XLB_SNAT_PORT_MIN < count;
        int ok = 0;
#pragma unroll
        for (int i = 0; i < XLB_SNAT_TRIES; i++) {
            __u32 port = XLB_SNAT_PORT_MIN + (h + i) % count;
            if (i == 0 && keep)
                port = cport;
            rk->dport = bpf_htons(port);
            if (!ct_v6_map.insert(rk, e) ||
                (!xlb_ct6_reclaim(rk) && !ct_v6_map.insert(rk, e))) {
                ok = 1;
                break;
            }
            xlb_count(XLB_STAT_SNAT_PORT_BUSY);
        }
        if (!ok) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_SNAT_PORTS);
            return TC_ACT_SHOT;
        }
        xlb_a6_cp(e->nat2_addr, src);
        e->c.nat2_port = rk->dport;
    } else if (!dsr && ct_v6_map.insert(rk, e)) {
        /* never over another flow's entry (DNAT keeps the client's port) */
        if (xlb_ct6_reclaim(rk) || ct_v6_map.insert(rk, e)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
            return TC_ACT_SHOT;
        }
    }
    /* the ORIG entry; DSR: the only one (nothing rewritten: the endpoint by its MAC or
     * through ip6ip6 from `src`) */
    e->c.dir = XLB_DIR_ORIG;
    xlb_a6_cp(e->nat_addr, ep_addr);
    e->c.nat_port = ep_port;
    if (dsr) {
        e->c.flags = XLB_CTF_DSR;
        if (mode == XLB_MODE_DSR_IPIP) {
            e->c.flags |= XLB_CTF_IPIP;
            xlb_a6_cp(e->nat2_addr, src);
        }
    }
    if (p->b.proto == IPPROTO_TCP) {
        e->c.seq_end = xlb_seq_end(&p->b);
        e->c.flags |= XLB_CTF_SEQ;
    }
    if (ct_v6_map.insert(k, e)) {
        if (!dsr)
            ct_v6_map.delete(rk);
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
        return TC_ACT_SHOT;
    }
    xlb_count(XLB_STAT_NEW_FLOW);
    xlb_count_flow(skb, e->c.svc_id, stat_id);
    xlb_lc_opened(algo, stat_id);
    return -1;
}

/* An ICMPv6 echo request (type 128, code 0) to a VIP (an address in vip_v6_map, which
 * dpd keeps as services come and go) turned into its reply in place and sent back out of
 * the interface it came in on, as a host answers for its own address (IPv4: icmp.h): MACs
 * and addresses swapped, hop limit XLB_ICMP_REPLY_TTL, type 129. The ICMPv6 checksum
 * covers a pseudo header of both addresses, whose sum the swap keeps: only the type word
 * changes it (RFC 1624), and the message's sum with its checksum stays what it was (a
 * CHECKSUM_COMPLETE skb's csum holds). No state, no endpoint. -1 for anything else (other
 * ICMPv6 messages, echo to other addresses, from a martian source). */
static __always_inline int xlb_echo6(struct __sk_buff *skb, struct xlb_pkt6 *p)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ethhdr *eth = data;
    struct ipv6hdr *ip6 = data + XLB_L3_OFF;
    __u8 *ic = data + XLB_L4_OFF6; /* type, code, checksum (2), identifier, sequence */
    if ((void *)(ic + 8) > data_end || p->b.l4_len < 8 || ic[0] != ICMPV6_ECHO_REQUEST ||
        ic[1] != 0)
        return -1;
    if (!vip_v6_map.lookup((struct xlb_ep6 *)p->daddr) || xlb_martian6(p->saddr))
        return -1;
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    __builtin_memcpy(&ip6->saddr, p->daddr, 16);
    __builtin_memcpy(&ip6->daddr, p->saddr, 16);
    ip6->hop_limit = XLB_ICMP_REPLY_TTL;
    __u16 *sum = (__u16 *)(ic + 2);
    __u32 from = bpf_htons(ICMPV6_ECHO_REQUEST << 8);
    __u32 to = bpf_htons(ICMPV6_ECHO_REPLY << 8);
    ic[0] = ICMPV6_ECHO_REPLY;
    *sum = ~xlb_fold((__u16)~*sum + (~from & 0xffff) + to);
    xlb_count(XLB_STAT_ICMP_ECHO_REPLY);
    return bpf_redirect(skb->ifindex, 0);
}

/* tc_packet_func_slow's IPv6 part: conntrack steps of tracked flows (handshakes,
 * teardowns, new SYNs on closed tuples), the firewall for what has no entry (per packet:
 * flows of no service are not tracked), then the service lookup of a new flow. */
static __always_inline int xlb_v6_slow(struct __sk_buff *skb)
{
    struct xlb_pkt6 p;
    struct xlb_ct6_val *out = NULL;
    int rc = xlb_parse6(skb, &p);
    if (rc == XLB_P_OK) {
        struct xlb_ct6_key k;
        xlb_ct6_key_of(&k, &p);
        struct xlb_ct6_val *v = ct_v6_map.lookup(&k);
        if (v) {
            /* a new SYN on a closing or closed tuple starts a new flow (as IPv4's) */
            int reopen = v->c.dir == XLB_DIR_ORIG && p.b.proto == IPPROTO_TCP &&
                         (p.b.tcp_flags & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST |
                                           XLB_TCP_ACK)) == XLB_TCP_SYN &&
                         (v->c.state == XLB_CT_CLOSING || v->c.state == XLB_CT_CLOSED);
            if (reopen) {
                xlb_ct6_delete_flow(&k, v);
            } else {
                struct xlb_ct6_val *pv = xlb_ct6_peer(&k, v);
                int drop = xlb_ct_step_pv(&p.b, &v->c, pv ? &pv->c : NULL);
                if (drop) {
                    xlb_count_drop(skb->ingress_ifindex, drop);
                    return TC_ACT_SHOT;
                }
                xlb_ct_touch(&v->c);
                xlb_count_flow(skb, v->c.svc_id, v->c.stat_id);
                out = v;
            }
        }
    }
    if (!out) {
        struct xlb_acl_cfg *cfg = xlb_fw_on();
        if (cfg) {
            struct xlb_acl_key ak;
            if (xlb_parse_v6(skb, &ak) == XLB_P_OK) {
                __u32 redirect = 0;
                int fw = xlb_fw_judge(skb, cfg, &ak, &redirect);
                if (fw == XLB_FW_DROP)
                    return TC_ACT_SHOT;
                if (fw == XLB_FW_REDIRECT)
                    return bpf_redirect(redirect, 0);
            }
        }
        if (rc == XLB_P_ICMP) { /* errors about flows were translated before (icmp6.h) */
            int act = xlb_echo6(skb, &p);
            if (act >= 0)
                return act;
        }
        if (rc == XLB_P6_EXT) {
            xlb_count(XLB_STAT_PASS_V6_EXT);
            return TC_ACT_OK;
        }
        if (rc != XLB_P_OK)
            return xlb_pass_unparsed(rc == XLB_P_BAD ? XLB_P_BAD : XLB_P_NOT_OURS);
        __u32 zero = 0;
        struct xlb_scratch6 *s = scratch6_map.lookup(&zero);
        if (!s)
            return TC_ACT_OK;
        int act = xlb_new_flow6(skb, &p, s);
        if (act >= 0)
            return act;
        out = &s->e; /* the new flow's ORIG entry */
    }
    return xlb_flow_out6(skb, &p, out);
}

#endif
