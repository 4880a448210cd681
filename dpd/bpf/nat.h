/* NAT rewrite. Addresses and ports are written directly into the packet and the IPv4
 * header checksum is updated incrementally (RFC 1624). The L4 checksum goes through
 * bpf_l4_csum_replace, the only place that knows whether the packet is CHECKSUM_PARTIAL
 * (veth, GSO: the field holds the pseudo-header sum, so port changes must not touch it)
 * or fully checksummed. Two helper calls at most, one when the port is unchanged. */
#ifndef XLB_NAT_H
#define XLB_NAT_H

#include <linux/stddef.h>
#include <uapi/linux/bpf.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "parse.h"
#include "sctp.h"
#include "xlb_abi.h"

static __always_inline __u16 xlb_fold(__u32 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)s;
}

/* One's-complement sum of ~from + to over 16-bit words: the checksum delta. */
static __always_inline __u32 xlb_delta4(__be32 from, __be32 to)
{
    __u32 nf = ~from;
    return (nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline void xlb_ip_csum_add(struct iphdr *ip, __u32 delta)
{
    ip->check = ~xlb_fold((__u16)~ip->check + delta);
}

/* Both addresses become (s, d), in the IP header (its checksum adjusted) and in `p`;
 * returns their delta, which an L4 checksum takes as the pseudo header's. */
static __always_inline __u32 xlb_set_addrs(struct iphdr *ip, struct xlb_pkt *p, __be32 s,
                                           __be32 d)
{
    __u32 delta = xlb_delta4(ip->saddr, s) + xlb_delta4(ip->daddr, d);
    ip->saddr = s;
    ip->daddr = d;
    p->saddr = s;
    p->daddr = d;
    xlb_ip_csum_add(ip, delta);
    return delta;
}

/* A later fragment (no L4 header): only the address and the IP checksum change; the
 * L4 checksum, in the first fragment, was adjusted for the whole datagram there. */
static __always_inline int xlb_nat_l3(struct __sk_buff *skb, struct xlb_pkt *p, __u8 dir,
                                      __be32 new_addr)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + XLB_L3_OFF;
    if ((void *)(ip + 1) > data_end)
        return -1;
    __be32 old_addr;
    if (dir == XLB_DIR_ORIG) {
        old_addr = ip->daddr;
        ip->daddr = new_addr;
        p->daddr = new_addr;
    } else {
        old_addr = ip->saddr;
        ip->saddr = new_addr;
        p->saddr = new_addr;
    }
    xlb_ip_csum_add(ip, xlb_delta4(old_addr, new_addr));
    return 0;
}

/* A later fragment of a full-NAT flow: both addresses (ORIG: destination `a`, source
 * `b`; REPLY: source `a`, destination `b`). */
static __always_inline int xlb_nat_l3_full(struct __sk_buff *skb, struct xlb_pkt *p, __u8 dir,
                                           __be32 a, __be32 b)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct iphdr *ip = data + XLB_L3_OFF;
    if ((void *)(ip + 1) > data_end)
        return -1;
    if (dir == XLB_DIR_ORIG)
        xlb_set_addrs(ip, p, b, a);
    else
        xlb_set_addrs(ip, p, a, b);
    return 0;
}

/* SCTP: the packet's addresses and ports become (s, d, sp, dp). Its CRC32c covers no
 * pseudo header: only a port change updates it (sctp.h). A first fragment does not say
 * how long the SCTP packet is, which the update needs: when its ports change it is left
 * untranslated (-1), never given a CRC that does not fit it. */
static __always_inline int xlb_nat_sctp(struct __sk_buff *skb, struct xlb_pkt *p, __be32 s,
                                        __be32 d, __be16 sp, __be16 dp)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct iphdr *ip = data + XLB_L3_OFF;
    __u8 *sh = data + XLB_L4_OFF;
    if ((void *)(ip + 1) > data_end || (void *)(sh + 12) > data_end)
        return -1;
    __u16 *ports = (__u16 *)sh;
    __u32 old4 = *(__u32 *)sh;
    __u32 new4 = ((__u32)dp << 16) | sp; /* as the two ports read in memory order */
    if (xlb_le32(1) != 1)
        new4 = ((__u32)sp << 16) | dp;
    if (old4 != new4 && p->frag)
        return -1;
    xlb_set_addrs(ip, p, s, d);
    xlb_sctp_crc_ports(sh, old4, new4, p->l4_len);
    ports[0] = sp;
    ports[1] = dp;
    p->sport = sp;
    p->dport = dp;
    return 0;
}

/* Full-NAT: both ends rewritten. ORIG: destination (addr, port), source (addr2, port2);
 * REPLY: source (addr, port), destination (addr2, port2). As many helper calls as
 * DNAT: one for both addresses (pseudo header), one for both ports (a precomputed
 * delta, size 0). */
static __always_inline int xlb_nat_full(struct __sk_buff *skb, struct xlb_pkt *p, __u8 dir,
                                        __be32 addr, __be16 port, __be32 addr2, __be16 port2)
{
    void *data = xlb_data(skb);
    void *data_end = xlb_data_end(skb);
    struct iphdr *ip = data + XLB_L3_OFF;
    __u32 l4_off = XLB_L4_OFF;
    __u16 *ports = data + l4_off; /* [0] source, [1] destination */
    __u32 csum_off;
    __u64 l4flags = 0;

    if ((void *)(ip + 1) > data_end || (void *)(ports + 2) > data_end)
        return -1;
    __be32 new_s = dir == XLB_DIR_ORIG ? addr2 : addr;
    __be32 new_d = dir == XLB_DIR_ORIG ? addr : addr2;
    __be16 new_sp = dir == XLB_DIR_ORIG ? port2 : port;
    __be16 new_dp = dir == XLB_DIR_ORIG ? port : port2;
    if (p->proto == IPPROTO_SCTP)
        return xlb_nat_sctp(skb, p, new_s, new_d, new_sp, new_dp);
    __u32 pdelta = (~ports[0] & 0xffff) + new_sp + (~ports[1] & 0xffff) + new_dp;
    __u32 adelta = xlb_set_addrs(ip, p, new_s, new_d);
    ports[0] = new_sp;
    ports[1] = new_dp;
    p->sport = new_sp;
    p->dport = new_dp;

    if (p->proto == IPPROTO_TCP) {
        csum_off = l4_off + offsetof(struct tcphdr, check);
    } else {
        csum_off = l4_off + offsetof(struct udphdr, check);
        l4flags = BPF_F_MARK_MANGLED_0;
    }
    bpf_l4_csum_replace(skb, csum_off, 0, adelta, l4flags | BPF_F_PSEUDO_HDR);
    bpf_l4_csum_replace(skb, csum_off, 0, pdelta, l4flags);
    return 0;
}

/* ORIG rewrites the destination, REPLY the source. */
static __always_inline int xlb_nat(struct __sk_buff *skb, struct xlb_pkt *p, __u8 dir,
                                   __be32 new_addr, __be16 new_port)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + XLB_L3_OFF;
    __u32 l4_off = XLB_L4_OFF;
    __u16 *ports = data + l4_off; /* [0] source, [1] destination */
    __u32 csum_off;
    __u64 l4flags = 0;

    if ((void *)(ip + 1) > data_end || (void *)(ports + 2) > data_end)
        return -1;
    if (p->proto == IPPROTO_SCTP) /* its checksum is no Internet checksum */
        return dir == XLB_DIR_ORIG ? xlb_nat_sctp(skb, p, ip->saddr, new_addr, ports[0], new_port)
                                   : xlb_nat_sctp(skb, p, new_addr, ip->daddr, new_port, ports[1]);
    __be32 old_addr;
    __be16 old_port;
    if (dir == XLB_DIR_ORIG) {
        old_addr = ip->daddr;
        old_port = ports[1];
        ip->daddr = new_addr;
        ports[1] = new_port;
        p->daddr = new_addr;
        p->dport = new_port;
    } else {
        old_addr = ip->saddr;
        old_port = ports[0];
        ip->saddr = new_addr;
        ports[0] = new_port;
        p->saddr = new_addr;
        p->sport = new_port;
    }
    __u32 delta = xlb_delta4(old_addr, new_addr);
    xlb_ip_csum_add(ip, delta);

    if (p->proto == IPPROTO_TCP) {
        csum_off = l4_off + offsetof(struct tcphdr, check);
    } else {
        csum_off = l4_off + offsetof(struct udphdr, check);
        l4flags = BPF_F_MARK_MANGLED_0;
    }
    /* size 0: `to` is a precomputed delta; pseudo header: addresses are in it */
    if (old_addr != new_addr)
        bpf_l4_csum_replace(skb, csum_off, 0, delta, l4flags | BPF_F_PSEUDO_HDR);
    if (old_port != new_port)
        bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | sizeof(new_port));
    return 0;
}

#endif
