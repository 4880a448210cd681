/* Conntrack: two entries per flow (ORIG keyed by the client's tuple, REPLY keyed by
 * the endpoint's), each carrying the rewrite for its direction. The state lives in
 * both so the fast path decides from one lookup. */
#ifndef XLB_CT_H
#define XLB_CT_H

#include "maps.h"
#include "parse.h"

/* Refresh the last-seen time at most every XLB_CT_TOUCH_NS: aging needs seconds, and
 * not writing the entry on every packet keeps its cache line clean across CPUs. */
#define XLB_CT_TOUCH_NS 500000000ULL

static __always_inline void xlb_ct_touch(struct xlb_ct_val *v)
{
    __u64 now = bpf_ktime_get_coarse_ns();
    if (now - v->last_ns > XLB_CT_TOUCH_NS)
        v->last_ns = now;
}

static __always_inline void xlb_ct_key_of(struct xlb_ct_key *k, struct xlb_pkt *p)
{
    k->saddr = p->saddr;
    k->daddr = p->daddr;
    k->sport = p->sport;
    k->dport = p->dport;
    k->proto = p->proto;
    k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* The key of the other direction's entry, from a packet that hit entry `v`. */
static __always_inline void xlb_ct_peer_key(struct xlb_ct_key *k, struct xlb_pkt *p,
                                            struct xlb_ct_val *v)
{
    k->proto = p->proto;
    k->pad[0] = k->pad[1] = k->pad[2] = 0;
    if (v->dir == XLB_DIR_ORIG) { /* client -> VIP; reply comes endpoint -> client */
        k->saddr = v->nat_addr;
        k->sport = v->nat_port;
        k->daddr = p->saddr;
        k->dport = p->sport;
    } else { /* endpoint -> client; original is client -> VIP */
        k->saddr = p->daddr;
        k->sport = p->dport;
        k->daddr = v->nat_addr;
        k->dport = v->nat_port;
    }
}

/* The next state after a packet in direction v->dir; flags collects FINs. */
static __always_inline __u8 xlb_ct_next(struct xlb_ct_val *v, struct xlb_pkt *p, __u32 *flags)
{
    __u8 st = v->state;
    if (p->proto == IPPROTO_UDP) {
        if (v->dir == XLB_DIR_REPLY && st == XLB_CT_NEW)
            return XLB_CT_EST;
        return st;
    }
    __u8 f = p->tcp_flags;
    if (f & XLB_TCP_RST)
        return XLB_CT_CLOSED;
    if (f & XLB_TCP_FIN) {
        *flags |= v->dir == XLB_DIR_ORIG ? XLB_CTF_FIN_ORIG : XLB_CTF_FIN_REPLY;
        if ((*flags & (XLB_CTF_FIN_ORIG | XLB_CTF_FIN_REPLY)) ==
            (XLB_CTF_FIN_ORIG | XLB_CTF_FIN_REPLY))
            return XLB_CT_CLOSED;
        return XLB_CT_CLOSING;
    }
    if (st == XLB_CT_NEW && v->dir == XLB_DIR_REPLY && (f & XLB_TCP_SYN) && (f & XLB_TCP_ACK))
        return XLB_CT_REPLIED;
    if (st == XLB_CT_REPLIED && v->dir == XLB_DIR_ORIG && !(f & XLB_TCP_SYN) &&
        (f & XLB_TCP_ACK))
        return XLB_CT_EST;
    return st;
}

/* Apply a state change to both entries of the flow. */
static __always_inline void xlb_ct_update(struct xlb_pkt *p, struct xlb_ct_val *v)
{
    __u32 flags = v->flags;
    __u8 next = xlb_ct_next(v, p, &flags);
    if (next == v->state && flags == v->flags)
        return;
    v->state = next;
    v->flags = flags;
    struct xlb_ct_key pk;
    xlb_ct_peer_key(&pk, p, v);
    struct xlb_ct_val *pv = ct_v4_map.lookup(&pk);
    if (pv) {
        pv->state = next;
        pv->flags = flags;
    }
}

#endif
