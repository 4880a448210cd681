/* Conntrack: two entries per flow (ORIG keyed by the client's tuple, REPLY keyed by
 * the endpoint's), each carrying the rewrite for its direction. The state lives in
 * both so the fast path decides from one lookup.
 *
 * TCP follows the handshake: a SYN-ACK advances NEW -> REPLIED only when it
 * acknowledges the tracked SYN, the client's ACK advances REPLIED -> ESTABLISHED only
 * when it acknowledges the SYN-ACK. Each entry tracks the highest sequence number its
 * direction sent (seq_end); an RST is honoured only near it (XLB_RST_BEHIND/AHEAD). */
#ifndef XLB_CT_H
#define XLB_CT_H

#include "maps.h"
#include "parse.h"
#include "sctp.h"
#include "stats.h"

/* Refresh the last-seen time at most every XLB_CT_TOUCH_NS: aging needs seconds, and
 * not writing the entry on every packet keeps its cache line clean across CPUs. */
#define XLB_CT_TOUCH_NS 500000000ULL

#define XLB_CTF_FINS (XLB_CTF_FIN_ORIG | XLB_CTF_FIN_REPLY)

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

/* The key of the other direction's entry, from the key `k` of entry `v`. */
static __always_inline void xlb_ct_peer_key(struct xlb_ct_key *pk, struct xlb_ct_key *k,
                                            struct xlb_ct_val *v)
{
    pk->proto = k->proto;
    pk->pad[0] = pk->pad[1] = pk->pad[2] = 0;
    if (v->dir == XLB_DIR_ORIG) { /* client -> VIP; reply comes endpoint -> client */
        pk->saddr = v->nat_addr;
        pk->sport = v->nat_port;
        pk->daddr = k->saddr;
        pk->dport = k->sport;
        if (v->flags & XLB_CTF_FNAT) { /* endpoint -> SNAT address:port */
            pk->daddr = v->nat2_addr;
            pk->dport = v->nat2_port;
        }
    } else { /* endpoint -> client; original is client -> VIP */
        pk->saddr = k->daddr;
        pk->sport = k->dport;
        if (v->flags & XLB_CTF_FNAT) { /* endpoint -> SNAT address:port */
            pk->saddr = v->nat2_addr;
            pk->sport = v->nat2_port;
        }
        pk->daddr = v->nat_addr;
        pk->dport = v->nat_port;
    }
}

/* Whether `pv` (found at the peer key of entry `v` with key `k`) belongs to the same
 * flow, i.e. rewrites back to `k`: an entry of another flow is never touched. */
static __always_inline int xlb_ct_is_peer(struct xlb_ct_key *k, struct xlb_ct_val *v,
                                          struct xlb_ct_val *pv)
{
    if (pv->dir == v->dir || (pv->flags & XLB_CTF_FNAT) != (v->flags & XLB_CTF_FNAT))
        return 0;
    if (v->dir == XLB_DIR_ORIG)
        return pv->nat_addr == k->daddr && pv->nat_port == k->dport &&
               (!(v->flags & XLB_CTF_FNAT) ||
                (pv->nat2_addr == k->saddr && pv->nat2_port == k->sport));
    return pv->nat_addr == k->saddr && pv->nat_port == k->sport &&
           (!(v->flags & XLB_CTF_FNAT) ||
            (pv->nat2_addr == k->daddr && pv->nat2_port == k->dport));
}

static __always_inline struct xlb_ct_val *xlb_ct_peer(struct xlb_ct_key *k,
                                                      struct xlb_ct_val *v)
{
    struct xlb_ct_key pk;
    xlb_ct_peer_key(&pk, k, v);
    struct xlb_ct_val *pv = ct_v4_map.lookup(&pk);
    if (pv && !xlb_ct_is_peer(k, v, pv))
        return NULL;
    return pv;
}

/* Delete the flow of entry `v` (key `k`): its peer first, when it is really its peer. */
static __always_inline void xlb_ct_delete_flow(struct xlb_ct_key *k, struct xlb_ct_val *v)
{
    struct xlb_ct_key pk;
    xlb_ct_peer_key(&pk, k, v);
    struct xlb_ct_val *pv = ct_v4_map.lookup(&pk);
    if (pv && xlb_ct_is_peer(k, v, pv))
        ct_v4_map.delete(&pk);
    ct_v4_map.delete(k);
}

static __always_inline __u32 xlb_seq_end(struct xlb_pkt *p)
{
    return p->seq + p->payload + !!(p->tcp_flags & XLB_TCP_SYN) +
           !!(p->tcp_flags & XLB_TCP_FIN);
}

/* Advance the entry's seq_end to what this packet sent (serial number arithmetic). */
static __always_inline void xlb_ct_track_seq(struct xlb_ct_val *v, struct xlb_pkt *p)
{
    __u32 end = xlb_seq_end(p);
    if (!(v->flags & XLB_CTF_SEQ)) {
        v->seq_end = end;
        v->flags |= XLB_CTF_SEQ;
    } else if ((__s32)(end - v->seq_end) > 0) {
        v->seq_end = end;
    }
}

/* An RST from v's direction is honoured when its sequence number is near what that
 * direction sent; in NEW, the endpoint's RST (it refuses the connection) must
 * acknowledge the client's SYN. A direction never seen cannot be checked. */
static __always_inline int xlb_rst_ok(struct xlb_pkt *p, struct xlb_ct_val *v,
                                      struct xlb_ct_val *pv)
{
    if (v->flags & XLB_CTF_SEQ)
        return (__u32)(v->seq_end + XLB_RST_AHEAD - p->seq) <= XLB_RST_BEHIND + XLB_RST_AHEAD;
    if (v->state == XLB_CT_NEW && v->dir == XLB_DIR_REPLY)
        return (p->tcp_flags & XLB_TCP_ACK) && pv && (pv->flags & XLB_CTF_SEQ) &&
               p->ack_seq == pv->seq_end;
    return 1;
}

/* The slow path's conntrack step for a packet that hit entry `v`, whose peer entry
 * (the other direction's, when it is really the same flow's) is `pv` (may be NULL):
 * state transition of both entries and sequence tracking, family-neutral (IPv4 below,
 * IPv6 in svc6.h). Returns 0 to forward the packet, or the XLB_STAT_* reason to drop
 * it for. */
static __always_inline int xlb_ct_step_pv(struct xlb_pkt *p, struct xlb_ct_val *v,
                                          struct xlb_ct_val *pv)
{
    __u8 st = v->state;
    __u8 next = st;
    __u32 fins = v->flags & XLB_CTF_FINS;

    if (p->proto == IPPROTO_SCTP) {
        int bad = xlb_sctp_tags(p, v, pv); /* verification tags */
        if (bad)
            return bad;
        next = xlb_sctp_next(st, p->tcp_flags, v->dir, v->flags); /* by its first chunk */
    } else if (p->proto != IPPROTO_TCP) {
        /* a reply establishes; a DSR flow sees none: its second packet does */
        if (st == XLB_CT_NEW && (v->dir == XLB_DIR_REPLY || (v->flags & XLB_CTF_DSR)))
            next = XLB_CT_EST;
    } else {
        __u8 f = p->tcp_flags;
        if (!xlb_tcp_flags_valid(f))
            return XLB_STAT_DROP_BAD_FLAGS;
        if (f & XLB_TCP_RST) {
            if (!xlb_rst_ok(p, v, pv))
                return XLB_STAT_DROP_RST_WINDOW;
            next = XLB_CT_CLOSED;
        } else if (st == XLB_CT_NEW && v->dir == XLB_DIR_REPLY) {
            /* only a SYN-ACK that acknowledges the tracked SYN answers it */
            if ((f & (XLB_TCP_SYN | XLB_TCP_ACK)) == (XLB_TCP_SYN | XLB_TCP_ACK) && pv &&
                (pv->flags & XLB_CTF_SEQ) && p->ack_seq == pv->seq_end) {
                next = XLB_CT_REPLIED;
                v->seq_end = xlb_seq_end(p);
                v->flags |= XLB_CTF_SEQ;
            } else {
                xlb_count(XLB_STAT_CT_NO_ADVANCE);
            }
        } else {
            if (st == XLB_CT_NEW && (f & XLB_TCP_SYN)) {
                v->seq_end = xlb_seq_end(p); /* the client's SYN (again) */
                v->flags |= XLB_CTF_SEQ;
            } else {
                xlb_ct_track_seq(v, p);
            }
            if (f & XLB_TCP_FIN) {
                fins |= v->dir == XLB_DIR_ORIG ? XLB_CTF_FIN_ORIG : XLB_CTF_FIN_REPLY;
                next = fins == XLB_CTF_FINS ? XLB_CT_CLOSED : XLB_CT_CLOSING;
            } else if (st == XLB_CT_NEW && (v->flags & XLB_CTF_DSR) &&
                       (f & (XLB_TCP_SYN | XLB_TCP_ACK)) == XLB_TCP_ACK) {
                /* DSR: the SYN-ACK went from the endpoint to the client directly, so
                 * the client's first ACK after its SYN establishes (unchecked) */
                next = XLB_CT_EST;
            } else if (st == XLB_CT_REPLIED && v->dir == XLB_DIR_ORIG &&
                       (f & (XLB_TCP_SYN | XLB_TCP_ACK)) == XLB_TCP_ACK) {
                /* only an ACK of the SYN-ACK establishes */
                if (pv && (pv->flags & XLB_CTF_SEQ) && p->ack_seq == pv->seq_end)
                    next = XLB_CT_EST;
                else
                    xlb_count(XLB_STAT_CT_NO_ADVANCE);
            }
        }
        if (next != st || fins != (v->flags & XLB_CTF_FINS)) {
            if (pv) {
                pv->state = next;
                pv->flags = (pv->flags & ~XLB_CTF_FINS) | fins;
            }
        }
    }
    if (next != st || fins != (v->flags & XLB_CTF_FINS)) {
        v->state = next;
        v->flags = (v->flags & ~XLB_CTF_FINS) | fins;
        if (p->proto != IPPROTO_TCP && pv)
            pv->state = next;
    }
    return 0;
}

/* The step of an IPv4 entry `v` (key `k`). */
static __always_inline int xlb_ct_step(struct xlb_pkt *p, struct xlb_ct_key *k,
                                       struct xlb_ct_val *v)
{
    return xlb_ct_step_pv(p, v, xlb_ct_peer(k, v));
}

#endif
