/* Events to dpd through pkt_ring (xlb_abi.h, docs/events.md). */
#ifndef XLB_EVENTS_H
#define XLB_EVENTS_H

#include <uapi/linux/bpf.h>

#include "maps.h"
#include "stats.h"

/* An event without packet bytes (FLOW_REFUSED, POLICER_DROP). */
static __always_inline void xlb_event(__u8 kind, __u32 id, __u32 ifindex, __u32 pkt_len)
{
    struct xlb_event *ev = pkt_ring.ringbuf_reserve(sizeof(struct xlb_event));
    if (!ev) {
        xlb_count(XLB_STAT_EVENT_LOST);
        return;
    }
    ev->kind = kind;
    ev->pad = 0;
    ev->cap_len = 0;
    ev->ifindex = ifindex;
    ev->pkt_len = pkt_len;
    ev->id = id;
    ev->time_ns = bpf_ktime_get_ns();
    pkt_ring.ringbuf_submit(ev, 0);
}

/* A trapped packet: its first XLB_TRAP_BYTES bytes (all of a shorter one). */
static __always_inline void xlb_trap(struct __sk_buff *skb, __u32 rule_id)
{
    struct xlb_event *ev = pkt_ring.ringbuf_reserve(sizeof(struct xlb_event));
    if (!ev) {
        xlb_count(XLB_STAT_EVENT_LOST);
        return;
    }
    __u32 len = skb->len;
    __u32 n = len < XLB_TRAP_BYTES ? len : XLB_TRAP_BYTES;
    ev->kind = XLB_EV_TRAP;
    ev->pad = 0;
    ev->ifindex = skb->ingress_ifindex;
    ev->pkt_len = len;
    ev->id = rule_id;
    ev->time_ns = bpf_ktime_get_ns();
    if (n < 1 || n > XLB_TRAP_BYTES || bpf_skb_load_bytes(skb, 0, ev->data, n) < 0)
        n = 0;
    ev->cap_len = n;
    pkt_ring.ringbuf_submit(ev, 0);
    xlb_count(XLB_STAT_TRAP);
}

#endif
