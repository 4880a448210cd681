"""IP-in-IP decapsulation for DSR endpoints on kernels without an ipip device
(CONFIG_NET_IPIP unset): a TC ingress program that strips the outer IPv4 header of an
IP-in-IP packet addressed to the interface's address, so the stack receives the inner
packet (the client's, to the VIP) as if it had arrived as is. The same for IPv6-in-IPv6
(CONFIG_IPV6_TUNNEL unset: no ip6tnl device) when the address is an IPv6 one.

Run ``python -m lab.decap NS:IFNAME:ADDRESS ...`` (as root): compiles once, attaches to
each interface (clsact, a direct-action filter) and exits; the filter stays until the
interface (or its namespace) goes.
"""

from __future__ import annotations

import socket
import sys

import structlog

log = structlog.get_logger(__name__)

SOURCE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

BPF_HASH(local_map, u32, u32, 256); /* the endpoints' addresses (outer destinations) */
struct a6 {
    u32 w[4];
};
BPF_HASH(local6_map, struct a6, u32, 256); /* the same, IPv6 */

static __always_inline int ip6ip6_decap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    if ((void *)(ip6 + 1) > end || ip6->nexthdr != 41 /* IPPROTO_IPV6 */)
        return TC_ACT_OK;
    struct a6 daddr;
    __builtin_memcpy(&daddr, &ip6->daddr, sizeof(daddr));
    if (!local6_map.lookup(&daddr))
        return TC_ACT_OK;
    if (bpf_skb_adjust_room(skb, -(int)sizeof(struct ipv6hdr), BPF_ADJ_ROOM_MAC, 0))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int ipip_decap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    if ((void *)(eth + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6))
        return ip6ip6_decap(skb);
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    if (ip->protocol != IPPROTO_IPIP || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
        return TC_ACT_OK;
    u32 daddr = ip->daddr;
    if (!local_map.lookup(&daddr))
        return TC_ACT_OK;
    if (bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, 0))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
"""


def attach(targets: list[tuple[str, str, str]]) -> None:
    from bcc import BPF
    from pyroute2 import IPRoute
    from pyroute2.netns import setns

    b = BPF(text=SOURCE.encode())
    fn = b.load_func(b"ipip_decap", BPF.SCHED_CLS)
    table = b["local_map"]
    table6 = b["local6_map"]
    home = open("/proc/self/ns/net")
    try:
        for ns, ifname, address in targets:
            setns(ns)
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                try:
                    ipr.tc("add", "clsact", idx)
                except Exception:  # noqa: BLE001 - already there
                    pass
                ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name="md_ipip_decap",
                       parent="ffff:fff2", classid=1, direct_action=True)
            if ":" in address:
                key = table6.Key()
                raw = socket.inet_pton(socket.AF_INET6, address)
                for i in range(4):
                    key.w[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
                table6[key] = table6.Leaf(1)
            else:
                table[table.Key(int.from_bytes(socket.inet_aton(address), "little"))] = \
                    table.Leaf(1)
            log.info("decap.attached", ns=ns, ifname=ifname, address=address)
    finally:
        setns(home.fileno())
        home.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    attach([tuple(a.split(":", 2)) for a in args])  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    sys.exit(main())
