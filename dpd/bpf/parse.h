/* Ethernet / IPv4 / TCP / UDP parsing into struct xlb_pkt. */
#ifndef XLB_PARSE_H
#define XLB_PARSE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define XLB_TCP_FIN 0x01
#define XLB_TCP_SYN 0x02
#define XLB_TCP_RST 0x04
#define XLB_TCP_ACK 0x10

struct xlb_pkt {
    __u32 l3_off;
    __u32 l4_off;
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 tcp_flags;
    __u8 ttl;
    __u8 tos;
    __u16 tot_len;
};

/* 0: parsed an unfragmented IPv4 TCP/UDP packet; -1: anything else (not ours). */
static __always_inline int xlb_parse(struct __sk_buff *skb, struct xlb_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return -1;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return -1;
    if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff)))
        return -1; /* fragments are left to the kernel */
    __u32 ihl = ip->ihl * 4;
    p->l3_off = sizeof(*eth);
    p->l4_off = sizeof(*eth) + ihl;
    p->saddr = ip->saddr;
    p->daddr = ip->daddr;
    p->proto = ip->protocol;
    p->ttl = ip->ttl;
    p->tos = ip->tos;
    p->tot_len = bpf_ntohs(ip->tot_len);
    p->tcp_flags = 0;
    void *l4 = (void *)ip + ihl;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return -1;
        p->sport = tcp->source;
        p->dport = tcp->dest;
        p->tcp_flags = ((__u8 *)tcp)[13];
        return 0;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return -1;
        p->sport = udp->source;
        p->dport = udp->dest;
        return 0;
    }
    return -1;
}

#endif
