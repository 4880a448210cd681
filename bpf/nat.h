/* NAT rewrite with incremental IP and L4 checksum updates. The kernel helpers keep
 * CHECKSUM_PARTIAL packets (veth, GSO) correct as well as fully checksummed ones. */
#ifndef XLB_NAT_H
#define XLB_NAT_H

/* ORIG rewrites the destination, REPLY the source. */
static __always_inline void xlb_nat(struct __sk_buff *skb, struct xlb_pkt *p, __u8 dir,
                                    __be32 new_addr, __be16 new_port)
{
    __u32 addr_off, port_off, csum_off;
    __be32 old_addr;
    __be16 old_port;
    __u64 l4flags = 0;

    if (dir == XLB_DIR_ORIG) {
        addr_off = p->l3_off + offsetof(struct iphdr, daddr);
        port_off = p->l4_off + 2;
        old_addr = p->daddr;
        old_port = p->dport;
        p->daddr = new_addr;
        p->dport = new_port;
    } else {
        addr_off = p->l3_off + offsetof(struct iphdr, saddr);
        port_off = p->l4_off;
        old_addr = p->saddr;
        old_port = p->sport;
        p->saddr = new_addr;
        p->sport = new_port;
    }
    if (p->proto == IPPROTO_TCP) {
        csum_off = p->l4_off + offsetof(struct tcphdr, check);
    } else {
        csum_off = p->l4_off + offsetof(struct udphdr, check);
        l4flags = BPF_F_MARK_MANGLED_0;
    }
    if (old_addr != new_addr) {
        bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
                            l4flags | BPF_F_PSEUDO_HDR | sizeof(new_addr));
        bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old_addr,
                            new_addr, sizeof(new_addr));
        bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0);
    }
    if (old_port != new_port) {
        bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | sizeof(new_port));
        bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0);
    }
}

#endif
