/* Ethernet / IPv4 / TCP / UDP / ICMP parsing and validation into struct xlb_pkt (IPv6
 * is recognised here and parsed into the firewall's key by acl.h).
 *
 * Every packet is checked here, before any lookup, with what is cheap because it is in
 * the headers already read: IP version, header length, total length against the frame,
 * the IP header checksum, TCP data offset, UDP length. Checks that need state or are
 * only needed before state is created (martian sources, TCP flag combinations) are the
 * slow path's (tc_slow.c). */
#ifndef XLB_PARSE_H
#define XLB_PARSE_H

#include <linux/stddef.h>
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define XLB_TCP_FIN 0x01
#define XLB_TCP_SYN 0x02
#define XLB_TCP_RST 0x04
#define XLB_TCP_PSH 0x08
#define XLB_TCP_ACK 0x10
#define XLB_TCP_URG 0x20

/* SCTP has no flags: p->tcp_flags carries what its first chunk means to conntrack, in
 * bits the fast path already sends to the slow path (tc_main.c tests SYN|FIN|RST|ACK
 * against 0 for what is not TCP): a data packet carries none (sctp.h). */
#define XLB_SCTP_INIT XLB_TCP_SYN /* INIT with verification tag 0: opens a flow */
#define XLB_SCTP_SHUT XLB_TCP_FIN /* SHUTDOWN, SHUTDOWN ACK */
#define XLB_SCTP_END XLB_TCP_RST  /* ABORT, SHUTDOWN COMPLETE */
#define XLB_SCTP_TBIT XLB_TCP_PSH /* with END: its T bit (the sender's own tag, RFC 9260 8.5.1) */
#define XLB_SCTP_INIT_ACK XLB_TCP_ACK /* INIT ACK: its initiate tag is learned (sctp.h) */

#define XLB_PACKET_OTHERHOST 3 /* skb->pkt_type: PACKET_OTHERHOST of linux/if_packet.h */

#define XLB_L3_OFF 14 /* sizeof(struct ethhdr) */
#define XLB_L4_OFF 34 /* IPv4 without options */

/* xlb_parse results */
#define XLB_P_OK 0       /* unfragmented TCP/UDP/SCTP, valid: conntrack and NAT may apply */
#define XLB_P_NOT_OURS 1 /* not IPv4, or a protocol xlb does not handle: pass */
#define XLB_P_BAD 2      /* malformed: pass untouched (the kernel drops it), counted */
#define XLB_P_OPTIONS 3  /* IPv4 options: pass untouched, counted */
#define XLB_P_FRAG 4     /* a fragment (first or later): the slow path decides */
#define XLB_P_ICMP 5     /* ICMP: the slow path decides */
#define XLB_P_V6 6       /* IPv6: the slow path's firewall decides (no conntrack or NAT yet) */
#define XLB_P_ND 7       /* acl.h xlb_parse_v6: ICMPv6 neighbour discovery, never judged
                          * (ARP's IPv6 counterpart) */

struct xlb_pkt {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 tcp_flags;
    __u8 ttl;
    __u8 tos;
    __u16 tot_len; /* for the FIB lookup (a BIG TCP packet's is cut to 16 bits) */
    __u32 l4_len;  /* bytes from the L4 header to the end of the IP datagram (fragment) */
    __u32 seq;     /* TCP, host order */
    __u32 ack_seq; /* TCP, host order */
    __u32 payload; /* TCP payload bytes */
    __be16 ip_id;
    __u16 frag;    /* frag_off & (MF | offset), host order; 0 for unfragmented */
};

/* skb->data and skb->data_end read with one instruction each, opaque to the compiler
 * (as Cilium's ctx_data_end): where a function reads them in many places, LLVM may
 * otherwise keep &skb->data_end in a register and load through it, which the verifier
 * refuses ("dereference of modified ctx ptr"). */
static __always_inline void *xlb_data(struct __sk_buff *skb)
{
    void *d;
    asm volatile("%[res] = *(u32 *)(%[base] + %[off])"
                 : [res] "=r"(d)
                 : [base] "r"(skb), [off] "i"(offsetof(struct __sk_buff, data)), "m"(*skb));
    return d;
}

static __always_inline void *xlb_data_end(struct __sk_buff *skb)
{
    void *d;
    asm volatile("%[res] = *(u32 *)(%[base] + %[off])"
                 : [res] "=r"(d)
                 : [base] "r"(skb), [off] "i"(offsetof(struct __sk_buff, data_end)), "m"(*skb));
    return d;
}

/* The IPv4 header (20 bytes, no options) sums to 0xffff when its checksum is right. */
static __always_inline int xlb_ip_csum_ok(struct iphdr *ip)
{
    __u16 *w = (__u16 *)ip;
    __u32 s = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        s += w[i];
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return s == 0xffff;
}

static __always_inline int xlb_parse(struct __sk_buff *skb, struct xlb_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XLB_P_NOT_OURS;
    /* A frame addressed to another host's MAC (a bridge flooding unknown unicast, a
     * promiscuous port) is not for this node: the kernel drops it, and it must never be
     * translated or forwarded here (two nodes on one segment would both NAT it). */
    if (skb->pkt_type == XLB_PACKET_OTHERHOST)
        return XLB_P_NOT_OURS;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return eth->h_proto == bpf_htons(ETH_P_IPV6) ? XLB_P_V6 : XLB_P_NOT_OURS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return XLB_P_BAD;
    __u8 vihl = *(__u8 *)ip;
    if (vihl != 0x45) {
        if ((vihl >> 4) != 4 || (vihl & 15) < 5)
            return XLB_P_BAD;
        return XLB_P_OPTIONS;
    }
    /* Total length within the frame; 0 only for a BIG TCP GSO packet (over 64 KiB). */
    __u32 frame = skb->len - XLB_L3_OFF;
    __u32 tot = bpf_ntohs(ip->tot_len);
    if (tot == 0 && frame > 65535)
        tot = frame;
    if (tot < sizeof(*ip) || tot > frame || !xlb_ip_csum_ok(ip))
        return XLB_P_BAD;
    p->saddr = ip->saddr;
    p->daddr = ip->daddr;
    p->proto = ip->protocol;
    p->ttl = ip->ttl;
    p->tos = ip->tos;
    p->tot_len = tot;
    p->l4_len = tot - sizeof(*ip);
    p->tcp_flags = 0;
    p->ip_id = ip->id;
    p->frag = bpf_ntohs(ip->frag_off) & 0x3fff;
    if (p->frag & 0x1fff) /* a later fragment: no L4 header */
        return XLB_P_FRAG;
    void *l4 = (void *)(ip + 1);
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return XLB_P_BAD;
        __u32 doff = ((__u8 *)tcp)[12] >> 4;
        if (doff < 5 || doff * 4 > p->l4_len)
            return XLB_P_BAD;
        p->sport = tcp->source;
        p->dport = tcp->dest;
        p->tcp_flags = ((__u8 *)tcp)[13];
        p->seq = bpf_ntohl(tcp->seq);
        p->ack_seq = bpf_ntohl(tcp->ack_seq);
        p->payload = p->l4_len - doff * 4;
        return p->frag ? XLB_P_FRAG : XLB_P_OK;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return XLB_P_BAD;
        __u32 ulen = bpf_ntohs(udp->len);
        /* A first fragment's UDP length counts the whole datagram. */
        if (ulen < sizeof(*udp) || (!p->frag && ulen > p->l4_len))
            return XLB_P_BAD;
        p->sport = udp->source;
        p->dport = udp->dest;
        return p->frag ? XLB_P_FRAG : XLB_P_OK;
    }
    if (p->proto == IPPROTO_SCTP) {
        /* common header (ports as TCP's, verification tag, CRC32c: not checked, NAT
         * keeps it right or wrong: sctp.h) and the first chunk's header */
        __u8 *sh = l4;
        if ((void *)(sh + 16) > data_end || p->l4_len < 16)
            return XLB_P_BAD;
        p->sport = *(__be16 *)sh;
        p->dport = *(__be16 *)(sh + 2);
        p->seq = bpf_ntohl(*(__be32 *)(sh + 4)); /* the verification tag */
        p->ack_seq = 0; /* INIT, INIT ACK: the initiate tag */
        __u8 chunk = sh[12];
        if ((chunk == 1 || chunk == 2) && (void *)(sh + 20) <= data_end && p->l4_len >= 20)
            p->ack_seq = bpf_ntohl(*(__be32 *)(sh + 16));
        if (chunk == 1) /* INIT: alone in its packet, with verification tag 0 */
            p->tcp_flags = *(__u32 *)(sh + 4) == 0 ? XLB_SCTP_INIT : 0;
        else if (chunk == 2)
            p->tcp_flags = XLB_SCTP_INIT_ACK;
        else if (chunk == 6 || chunk == 14) /* ABORT, SHUTDOWN COMPLETE */
            p->tcp_flags = XLB_SCTP_END | ((sh[13] & 1) ? XLB_SCTP_TBIT : 0);
        else if (chunk == 7 || chunk == 8) /* SHUTDOWN, SHUTDOWN ACK */
            p->tcp_flags = XLB_SCTP_SHUT;
        return p->frag ? XLB_P_FRAG : XLB_P_OK;
    }
    if (p->proto == IPPROTO_ICMP)
        return p->frag ? XLB_P_NOT_OURS : XLB_P_ICMP;
    return XLB_P_NOT_OURS;
}

/* TCP flags that a tracked flow may carry (ignoring PSH, URG, ECE, CWR): SYN, SYN+ACK,
 * ACK, FIN+ACK, RST, RST+ACK. NULL, SYN+FIN, SYN+RST, FIN without ACK (Xmas) are not. */
static __always_inline int xlb_tcp_flags_valid(__u8 f)
{
    __u8 c = f & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST | XLB_TCP_ACK);
    return c == XLB_TCP_ACK || c == XLB_TCP_SYN || c == (XLB_TCP_SYN | XLB_TCP_ACK) ||
           c == (XLB_TCP_FIN | XLB_TCP_ACK) || c == XLB_TCP_RST ||
           c == (XLB_TCP_RST | XLB_TCP_ACK);
}

/* Sources that never open a flow: 0/8, 127/8, multicast 224/4, 240/4 with broadcast. */
static __always_inline int xlb_martian(__be32 saddr)
{
    __u8 a = ((__u8 *)&saddr)[0];
    return a == 0 || a == 127 || a >= 224;
}

#endif
