/* ICMP errors (destination unreachable, fragmentation needed included; time exceeded;
 * parameter problem) that quote a NATed flow are translated, so that path MTU discovery
 * and connection errors work through the VIP and no endpoint address leaks:
 *
 * - quoting the client's packet after DNAT (client -> endpoint), sent to the client by
 *   the endpoint or a router: the quoted destination becomes VIP:port, and the outer
 *   source too when the endpoint itself sent the error (a router's stays);
 * - quoting a reply after reverse NAT (VIP -> client), sent to the VIP by the client or
 *   a router: the quoted source and the outer destination become the endpoint's.
 *
 * Full-NAT flows: both quoted ends are translated (the SNAT address:port and the
 * client's), and the error goes to the client (first case) or comes from the SNAT
 * address when the client itself reports (second case). DSR flows: an error sent to
 * the VIP quoting a reply is sent on, unchanged, to the flow's endpoint.
 *
 * The quoted tuple, reversed, is the key of the flow's other entry (REPLY for the first
 * case, ORIG for the second), whose rewrite is the translation. Checksums: the outer IP
 * header, the quoted IP header, the quoted L4 checksum when the quote holds it (SCTP's
 * CRC32c: updated for the ports' change by the quoted length, sctp.h), and the ICMP
 * checksum over every changed word (RFC 1624).
 *
 * An echo request to a VIP (an address in vip_v4_map, which dpd keeps as services
 * come and go) is answered here, out of the interface it came in on, as a host would
 * answer for its own address: ping works against a VIP, whichever endpoints serve it,
 * and no endpoint sees it. Everything else (other queries, echo to other addresses,
 * errors quoting no flow) passes untouched. */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include <uapi/linux/icmp.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>

#include "ct.h"
#include "fwd.h"
#include "nat.h"
#include "parse.h"
#include "sctp.h"
#include "stats.h"

/* Replace one 16-bit word under checksum `*sum` (covering it); returns the ICMP delta
 * of the change (the checksum word itself changed too). */
static __always_inline __u32 xlb_csum_fix(__u16 *sum, __u32 delta)
{
    __u16 old = *sum;
    __u16 new = ~xlb_fold((__u16)~old + delta);
    *sum = new;
    return (~old & 0xffff) + new;
}

static __always_inline int xlb_icmp_pass(void)
{
    xlb_count(XLB_STAT_PASS);
    return TC_ACT_OK;
}

/* Turn an echo request to a VIP into its reply, in place, and send it back. */
static __always_inline int xlb_icmp_echo_reply(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + XLB_L3_OFF;
    struct icmphdr *ic = data + XLB_L4_OFF;
    if ((void *)(ic + 1) > data_end)
        return xlb_icmp_pass();

    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    /* swapping the addresses leaves the IP checksum as it is; a fresh TTL changes it */
    __be32 a = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = a;
    __u32 from = bpf_htons(((__u16)ip->ttl) << 8);
    __u32 to = bpf_htons(((__u16)XLB_ICMP_REPLY_TTL) << 8);
    ip->ttl = XLB_ICMP_REPLY_TTL;
    xlb_ip_csum_add(ip, (~from & 0xffff) + to);
    /* type 8 -> 0: the high byte of the first ICMP word (no pseudo header in ICMP) */
    __u32 old_word = bpf_htons(((__u16)ICMP_ECHO) << 8);
    ic->type = ICMP_ECHOREPLY;
    xlb_csum_fix(&ic->checksum, (~old_word & 0xffff) + bpf_htons(((__u16)ICMP_ECHOREPLY) << 8));
    xlb_count(XLB_STAT_ICMP_ECHO_REPLY);
    return bpf_redirect(skb->ifindex, 0);
}

/* The protocols whose quoted packets have their ports where TCP's are (and flows). */
static __always_inline int xlb_icmp_quotes_ports(__u8 proto)
{
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Whether an ICMP error quotes a tracked flow (the quoted tuple, reversed, is the key of
 * the flow's entry for the other direction): such errors belong to a flow the firewall
 * already allowed, and are not judged again (as conntrack's RELATED). */
static __always_inline int xlb_icmp_related(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct icmphdr *ic = data + XLB_L4_OFF;
    struct iphdr *in = (void *)(ic + 1);
    __u16 *ports = (void *)(in + 1);
    if ((void *)(ports + 2) > data_end)
        return 0;
    if (ic->type != ICMP_DEST_UNREACH && ic->type != ICMP_TIME_EXCEEDED &&
        ic->type != ICMP_PARAMETERPROB)
        return 0;
    if (*(__u8 *)in != 0x45 || !xlb_icmp_quotes_ports(in->protocol) ||
        (in->frag_off & bpf_htons(0x1fff)))
        return 0;
    struct xlb_ct_key k = {};
    k.saddr = in->daddr;
    k.daddr = in->saddr;
    k.sport = ports[1];
    k.dport = ports[0];
    k.proto = in->protocol;
    return ct_v4_map.lookup(&k) != NULL;
}

static __always_inline int xlb_icmp(struct __sk_buff *skb, struct xlb_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + XLB_L3_OFF;
    struct icmphdr *ic = data + XLB_L4_OFF;
    struct iphdr *in = (void *)(ic + 1);
    __u16 *ports = (void *)(in + 1); /* [0] quoted source, [1] quoted destination */

    if ((void *)(ic + 1) > data_end)
        return xlb_icmp_pass();
    if (ic->type == ICMP_ECHO && ic->code == 0) {
        __be32 dst = ip->daddr;
        if (vip_v4_map.lookup(&dst))
            return xlb_icmp_echo_reply(skb);
        return xlb_icmp_pass();
    }
    if ((void *)(ports + 2) > data_end)
        return xlb_icmp_pass();
    if (ic->type != ICMP_DEST_UNREACH && ic->type != ICMP_TIME_EXCEEDED &&
        ic->type != ICMP_PARAMETERPROB)
        return xlb_icmp_pass();
    /* a quote with ports: IPv4 without options, TCP, UDP or SCTP, not a later fragment;
     * and an error goes to the source of the packet it quotes */
    if (*(__u8 *)in != 0x45 || !xlb_icmp_quotes_ports(in->protocol) ||
        (in->frag_off & bpf_htons(0x1fff)) || in->saddr != ip->daddr)
        return xlb_icmp_pass();

    struct xlb_ct_key k = {};
    k.saddr = in->daddr;
    k.daddr = in->saddr;
    k.sport = ports[1];
    k.dport = ports[0];
    k.proto = in->protocol;
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    if (!v || (v->flags & XLB_CTF_PASS)) /* a pass flow's errors need no translation */
        return xlb_icmp_pass();

    if (v->flags & XLB_CTF_DSR) {
        /* quoting a reply the endpoint sent the client directly (VIP -> client), sent
         * to the VIP: the endpoint needs it as it is (path MTU discovery) */
        xlb_count(XLB_STAT_ICMP_NAT);
        return xlb_dsr_out(skb, p, v->nat_addr, v->nat2_addr, v->flags & XLB_CTF_IPIP);
    }

    /* the quote's tuple (q_*) and what it becomes (n_*); the outer addresses likewise */
    int fnat = v->flags & XLB_CTF_FNAT;
    __be32 q_s = in->saddr, q_d = in->daddr, n_s = q_s, n_d = q_d;
    __be16 q_sp = ports[0], q_dp = ports[1], n_sp = q_sp, n_dp = q_dp;
    __be32 o_s = ip->saddr, o_d = ip->daddr, no_s = o_s, no_d = o_d;
    if (v->dir == XLB_DIR_REPLY) {
        /* quoted: client (full-NAT: SNAT address) -> endpoint; becomes client -> VIP */
        n_d = v->nat_addr;
        n_dp = v->nat_port;
        if (fnat) { /* sent to the SNAT address: goes to the client */
            n_s = v->nat2_addr;
            n_sp = v->nat2_port;
            no_d = n_s;
        }
        if (o_s == q_d) /* the endpoint itself reports */
            no_s = n_d;
    } else {
        /* quoted: VIP -> client; becomes endpoint -> client (full-NAT: -> SNAT
         * address), sent to the endpoint (o_d == q_s, checked above) */
        n_s = v->nat_addr;
        n_sp = v->nat_port;
        no_d = n_s;
        if (fnat) {
            n_d = v->nat2_addr;
            n_dp = v->nat2_port;
            if (o_s == q_d) /* the client itself reports: from the SNAT address */
                no_s = n_d;
        }
    }
    __u32 old4 = *(__u32 *)ports; /* SCTP's CRC update: the port bytes as one word */
    in->saddr = n_s;
    in->daddr = n_d;
    ports[0] = n_sp;
    ports[1] = n_dp;
    ip->saddr = no_s;
    ip->daddr = no_d;
    xlb_ip_csum_add(ip, xlb_delta4(o_s, no_s) + xlb_delta4(o_d, no_d));
    p->saddr = no_s;
    p->daddr = no_d;

    __u32 addr_delta = xlb_delta4(q_s, n_s) + xlb_delta4(q_d, n_d);
    __u32 port_delta = (~q_sp & 0xffff) + n_sp + (~q_dp & 0xffff) + n_dp;
    __u32 icmp_delta = addr_delta + port_delta;
    icmp_delta += xlb_csum_fix(&in->check, addr_delta);

    /* the quoted L4 checksum, when the quote holds it (UDP: unless 0, "none"; SCTP: its
     * CRC32c) */
    if (in->protocol == IPPROTO_TCP) {
        __u16 *cs = (void *)ports + offsetof(struct tcphdr, check);
        if ((void *)(cs + 1) <= data_end)
            icmp_delta += xlb_csum_fix(cs, addr_delta + port_delta);
    } else if (in->protocol == IPPROTO_UDP) {
        __u16 *cs = (void *)ports + offsetof(struct udphdr, check);
        if ((void *)(cs + 1) <= data_end && *cs) {
            __u16 old = *cs;
            __u16 new = ~xlb_fold((__u16)~old + addr_delta + port_delta);
            if (!new)
                new = 0xffff;
            *cs = new;
            icmp_delta += (~old & 0xffff) + new;
        }
    } else if (in->protocol == IPPROTO_SCTP) {
        /* the quoted CRC32c, when the quote holds it: the update for the ports' change
         * needs the quoted SCTP packet's length (its IP header says it), not its bytes,
         * so a truncated quote gets it too. Not for a quoted first fragment (its
         * length is not the SCTP packet's; nat.h changes no port of those). */
        __u8 *sh = (void *)ports;
        __u32 *crc = (void *)(sh + XLB_SCTP_CSUM_OFF);
        __u32 tot = bpf_ntohs(in->tot_len);
        if ((void *)(crc + 1) <= data_end && !(in->frag_off & bpf_htons(0x2000)) &&
            tot >= sizeof(*in) + 16 && tot <= 0xffff) {
            __u32 old = *crc;
            xlb_sctp_crc_ports(sh, old4, *(__u32 *)ports, tot - sizeof(*in));
            icmp_delta += xlb_delta4(old, *crc);
        }
    }
    xlb_csum_fix(&ic->checksum, icmp_delta);

    xlb_count(XLB_STAT_ICMP_NAT);
    p->sport = 0;
    p->dport = 0;
    return xlb_forward(skb, p);
}

#endif
