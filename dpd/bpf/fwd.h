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

    xlb_count(XLB_STAT_REDIRECT);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return xlb_redirect_neigh(fib.ifindex, NULL, 0, 0);
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    return bpf_redirect(fib.ifindex, 0);

stack:
    xlb_count(XLB_STAT_TO_STACK);
    return TC_ACT_OK;
}

#endif
