/* Forwarding after NAT. With XLB_CFG_REDIRECT set, a FIB lookup on the rewritten
 * packet gives the egress interface and MACs, the TTL is decremented and the packet
 * is redirected (bpf_redirect_neigh where the neighbour is not resolved yet). Where
 * the FIB has no answer (local delivery, TTL expiring, forwarding off) the kernel
 * stack routes the packet: it sees the rewritten addresses, so it still works. */
#ifndef XLB_FWD_H
#define XLB_FWD_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>

#include "acl.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "stats.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* bcc 0.26 declares this helper with three arguments; the kernel's takes four. */
#define xlb_redirect_neigh(ifindex, params, plen, flags)                                     \
    ((long (*)(u32, void *, int, u64))BPF_FUNC_redirect_neigh)(ifindex, params, plen, flags)

/* bpf_fib_lookup flags newer than some headers (kernel 5.10 / 6.7) */
#define XLB_FIB_SKIP_NEIGH (1U << 2)
#define XLB_FIB_SRC (1U << 4)

#define XLB_IPIP_TTL 64 /* the outer header's */

/* struct bpf_redir_neigh (kernel 5.11), IPv4 only */
struct xlb_redir_neigh {
    __u32 nh_family;
    __be32 ipv4_nh;
    __u32 pad[3];
};

/* The node's address toward `dst`: the FIB's preferred source for it (what a
 * connection from the node would use), 0 when there is no route. */
static __always_inline __be32 xlb_src_toward(struct __sk_buff *skb, __be32 dst)
{
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.ipv4_dst = dst;
    fib.ifindex = skb->ingress_ifindex;
    if (bpf_fib_lookup(skb, &fib, sizeof(fib), XLB_FIB_SRC | XLB_FIB_SKIP_NEIGH) !=
        BPF_FIB_LKUP_RET_SUCCESS)
        return 0;
    return fib.ipv4_src;
}

/* The IPv4 header checksum of a 20-byte header whose check field is 0. */
static __always_inline __u16 xlb_ip_csum(struct iphdr *ip)
{
    __u16 *w = (__u16 *)ip;
    __u32 s = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        s += w[i];
    return ~xlb_fold(s);
}

/* The end of a forward once the FIB answered (rc: SUCCESS or NO_NEIGH), for either
 * family: counted as `stat`, then handed to the neighbour subsystem when the FIB knows
 * no neighbour yet (bpf_redirect_neigh: `nh` the next hop, of `nh_len` bytes, or NULL
 * for the FIB's), else sent out with the FIB's MACs. */
static __always_inline int xlb_fib_out(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
                                       int rc, void *nh, int nh_len, __u32 stat)
{
    xlb_count(stat);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return xlb_redirect_neigh(fib->ifindex, nh, nh_len, 0);
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    __builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
    return bpf_redirect(fib->ifindex, 0);
}

/* DSR: the packet goes to endpoint `ep` unchanged. L2 (ipip 0): only the MACs change
 * (and the TTL): the endpoint must be on a link of the node (the FIB's next hop is the
 * endpoint itself) and holds the VIP on a loopback. IP-in-IP: an outer IPv4 header
 * (source `outer_src`, destination the endpoint) is added, and the FIB routes it, so the
 * endpoint may be anywhere; it decapsulates and holds the VIP. The endpoint answers the
 * client directly. No route: dropped (drop_no_route), never handed to the stack (it
 * would deliver the VIP's packet locally). */
static __always_inline int xlb_dsr_out(struct __sk_buff *skb, struct xlb_pkt *p, __be32 ep,
                                       __be32 outer_src, int ipip)
{
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = p->tos;
    fib.l4_protocol = ipip ? IPPROTO_IPIP : p->proto;
    fib.ipv4_src = ipip ? outer_src : p->saddr;
    fib.ipv4_dst = ep;
    fib.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
        (!ipip && (fib.ipv4_dst != ep || p->ttl <= 1))) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
        return TC_ACT_SHOT;
    }
    struct xlb_redir_neigh nh = {};
    nh.nh_family = AF_INET;
    nh.ipv4_nh = fib.ipv4_dst; /* the endpoint, or the gateway toward it */
    if (ipip) {
        __u32 inner_len = skb->len - XLB_L3_OFF;
        if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
                                BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
            return TC_ACT_SHOT;
        }
        void *data = xlb_data(skb);
        void *data_end = xlb_data_end(skb);
        struct iphdr *o = data + XLB_L3_OFF;
        if ((void *)(o + 1) > data_end)
            return TC_ACT_SHOT;
        *(__u8 *)o = 0x45;
        o->tos = p->tos;
        o->tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
        o->id = 0;
        o->frag_off = bpf_htons(0x4000); /* DF: the path MTU is the endpoint's concern */
        o->ttl = XLB_IPIP_TTL;
        o->protocol = IPPROTO_IPIP;
        o->check = 0;
        o->saddr = outer_src;
        o->daddr = ep;
        o->check = xlb_ip_csum(o);
    } else {
        void *data = xlb_data(skb);
        void *data_end = xlb_data_end(skb);
        struct iphdr *ip = data + XLB_L3_OFF;
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_SHOT;
        __u32 from = bpf_htons(((__u16)p->ttl) << 8);
        __u32 to = bpf_htons(((__u16)(p->ttl - 1)) << 8);
        ip->ttl = p->ttl - 1;
        xlb_ip_csum_add(ip, (~from & 0xffff) + to);
    }
    return xlb_fib_out(skb, &fib, rc, &nh, sizeof(nh), XLB_STAT_DSR);
}

static __always_inline int xlb_forward(struct __sk_buff *skb, struct xlb_pkt *p)
{
    u32 zero = 0;
    struct xlb_cfg *cfg = cfg_map.lookup(&zero);
    if (!cfg || !(cfg->flags & XLB_CFG_REDIRECT) || p->ttl <= 1)
        goto stack;

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = p->tos;
    fib.l4_protocol = p->proto;
    fib.sport = p->sport;
    fib.dport = p->dport;
    fib.tot_len = p->tot_len;
    fib.ipv4_src = p->saddr;
    fib.ipv4_dst = p->daddr;
    fib.ifindex = skb->ingress_ifindex;

    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        goto stack;

    /* Decrement the TTL (the high byte of the TTL/protocol word) and set the MACs,
     * writing the packet directly. */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        goto stack;
    __u32 from = bpf_htons(((__u16)p->ttl) << 8);
    __u32 to = bpf_htons(((__u16)(p->ttl - 1)) << 8);
    ip->ttl = p->ttl - 1;
    xlb_ip_csum_add(ip, (~from & 0xffff) + to);

    return xlb_fib_out(skb, &fib, rc, NULL, 0, XLB_STAT_REDIRECT);

stack:
    xlb_count(XLB_STAT_TO_STACK);
    return TC_ACT_OK;
}

/* Rewrite and send a packet of the tracked, NATed flow of entry `v`, by its mode. */
static __always_inline int xlb_flow_out(struct __sk_buff *skb, struct xlb_pkt *p,
                                        struct xlb_ct_val *v)
{
    int rc;
    if (v->flags & XLB_CTF_DSR)
        return xlb_dsr_out(skb, p, v->nat_addr, v->nat2_addr, v->flags & XLB_CTF_IPIP);
    if (v->flags & XLB_CTF_FNAT)
        rc = xlb_nat_full(skb, p, v->dir, v->nat_addr, v->nat_port, v->nat2_addr,
                          v->nat2_port);
    else
        rc = xlb_nat(skb, p, v->dir, v->nat_addr, v->nat_port);
    if (rc < 0)
        return TC_ACT_OK;
    return xlb_forward(skb, p);
}

#endif
