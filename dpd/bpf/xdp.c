/* xdp_packet_func: XDP entry, attached per interface on request, before TC.
 *
 * Quick L2/L3 work only: a packet whose IPv4 or IPv6 source lies in a blocked prefix
 * (blk_v4_map / blk_v6_map, longest prefix match) is dropped here, before the kernel
 * allocates an skb for it, and counted (globally, for the ingress interface and for the
 * prefix). Everything else, malformed or not IP included, passes to TC untouched
 * (XDP_PASS): TC validates and judges it. The programs share their maps (pinned). */

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "maps.h"
#include "stats.h"

struct xlb_vlan_hdr {
    __be16 tci;
    __be16 proto;
};

static __always_inline void xlb_xdp_count_drop(struct xdp_md *ctx, struct xlb_blk_val *v)
{
    xlb_count(XLB_STAT_DROP_BLOCKLIST);
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 slot = 0;
    struct xlb_intf *in = intf_map.lookup(&ifindex);
    if (in)
        slot = in->slot;
    __u32 idx = slot * XLB_STAT_MAX + XLB_STAT_DROP_BLOCKLIST;
    struct xlb_counter *c = intf_stats_map.lookup(&idx);
    if (c)
        c->packets++;
    __u32 id = v->id;
    c = blk_stats_map.lookup(&id);
    if (c) {
        c->packets++;
        c->bytes += ctx->data_end - ctx->data;
    }
}

int xdp_packet_func(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        goto pass;
    __be16 proto = eth->h_proto;
    void *l3 = eth + 1;
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
        struct xlb_vlan_hdr *vh = l3;
        if ((void *)(vh + 1) > end)
            goto pass;
        proto = vh->proto;
        l3 = vh + 1;
    }
    struct xlb_blk_val *v = NULL;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = l3;
        if ((void *)(ip + 1) > end)
            goto pass;
        struct xlb_blk_v4_key k = {.prefixlen = 32, .addr = ip->saddr};
        v = blk_v4_map.lookup(&k);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = l3;
        if ((void *)(ip6 + 1) > end)
            goto pass;
        struct xlb_blk_v6_key k = {.prefixlen = 128};
        __builtin_memcpy(k.addr, &ip6->saddr, sizeof(k.addr));
        v = blk_v6_map.lookup(&k);
    }
    if (v) {
        xlb_xdp_count_drop(ctx, v);
        return XDP_DROP;
    }
pass:
    xlb_count(XLB_STAT_XDP_PASS);
    return XDP_PASS;
}
