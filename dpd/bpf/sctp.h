/* SCTP (RFC 9260) for services: what the first chunk means to conntrack, and the
 * incremental update of the packet's CRC32c when NAT changes its ports.
 *
 * SCTP's checksum is a CRC32c over the SCTP packet only (common header and chunks, the
 * checksum field taken as 0): no pseudo header, so a rewrite of the IP addresses leaves
 * it as it is, and a rewrite of the ports changes it. There is no BPF helper for CRC32c
 * (bpf_csum_diff and bpf_l4_csum_replace are the Internet checksum's), and recomputing
 * it over the whole packet would cost a pass over every byte; but a CRC is linear over
 * GF(2): for two messages of the same length n that differ only in their first 4 bytes
 * (the ports) by D (old XOR new, as a 32-bit polynomial), the CRCs differ by
 *
 *     D(x) * x^(8n) mod P(x)        (P: the Castagnoli polynomial)
 *
 * the affine parts (initial value, final XOR) cancelling. So the new CRC is the old one
 * XOR that delta: right if it was right, and exactly as wrong as it was if it was wrong
 * (a bad packet is never "fixed" into a good one). x^(8n) is the product of the
 * precomputed x^(8 * 2^k) for the bits k of n (at most 16 multiplications for n under
 * 64 KiB, one per set bit), each a 32-step carry-less multiplication mod P.
 *
 * Values are in the reflected representation the CRC register uses (bit 31 is x^0),
 * which is also how the four bytes of D and of the checksum field read as a
 * little-endian 32-bit word: the field holds the CRC little-endian (RFC 9260 App. A). */
#ifndef XLB_SCTP_H
#define XLB_SCTP_H

#include <uapi/linux/bpf.h>

#include "parse.h"
#include "xlb_abi.h"

#define XLB_SCTP_CSUM_OFF 8  /* the CRC32c in the common header */
#define XLB_CRC32C_POLY 0x82f63b78 /* P, reflected */

#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define xlb_le32(x) __builtin_bswap32(x)
#else
#define xlb_le32(x) (x)
#endif

/* a * b mod P (reflected: bit 31 is x^0). */
static __always_inline __u32 xlb_gf2_mulmod(__u32 a, __u32 b)
{
    __u32 r = 0;
    for (int i = 0; i < 32; i++) {
        r ^= b & -((a >> (31 - i)) & 1);
        b = (b >> 1) ^ (XLB_CRC32C_POLY & -(b & 1));
    }
    return r;
}

/* d * x^(8n) mod P: the CRC32c change of an n-byte message whose first 4 bytes change
 * by d (old XOR new, read little-endian). K_k = x^(8 * 2^k) mod P, checked against a
 * Python model by tests/unit/test_sctp_crc.py. */
#define XLB_CRC_STEP(k, K)                     \
    if (n & (1u << (k)))                       \
        d = xlb_gf2_mulmod(d, K);
static __always_inline __u32 xlb_crc32c_shift(__u32 d, __u32 n)
{
    XLB_CRC_STEP(0, 0x00800000)
    XLB_CRC_STEP(1, 0x00008000)
    XLB_CRC_STEP(2, 0x82f63b78)
    XLB_CRC_STEP(3, 0x6ea2d55c)
    XLB_CRC_STEP(4, 0x18b8ea18)
    XLB_CRC_STEP(5, 0x510ac59a)
    XLB_CRC_STEP(6, 0xb82be955)
    XLB_CRC_STEP(7, 0xb8fdb1e7)
    XLB_CRC_STEP(8, 0x88e56f72)
    XLB_CRC_STEP(9, 0x74c360a4)
    XLB_CRC_STEP(10, 0xe4172b16)
    XLB_CRC_STEP(11, 0x0d65762a)
    XLB_CRC_STEP(12, 0x35d73a62)
    XLB_CRC_STEP(13, 0x28461564)
    XLB_CRC_STEP(14, 0xbf455269)
    XLB_CRC_STEP(15, 0xe2ea32dc)
    return d;
}
#undef XLB_CRC_STEP

/* The ports of an SCTP packet at `sh` (bounds-checked by the caller for 12 bytes) are
 * about to change from `old4` to `new4` (both the 4 port bytes read as one word): update
 * its CRC32c for an SCTP packet of `n` bytes. A field of 0 is left alone: the sender's
 * stack leaves it 0 when a device computes it (CHECKSUM_PARTIAL with csum_not_inet, as
 * over a veth), and the device then computes it over the packet as rewritten. */
static __always_inline void xlb_sctp_crc_ports(__u8 *sh, __u32 old4, __u32 new4, __u32 n)
{
    __u32 *crc = (__u32 *)(sh + XLB_SCTP_CSUM_OFF);
    if (old4 == new4 || *crc == 0)
        return;
    *crc ^= xlb_le32(xlb_crc32c_shift(xlb_le32(old4 ^ new4), n));
}

/* Verification tags (RFC 9260 8.5.1). An SCTP flow's conntrack entries keep, in seq_end
 * (with XLB_CTF_SEQ; TCP's field, unused by SCTP: the value does not grow), the tag the
 * packets of their direction carry: the REPLY entry the client's INIT's initiate tag
 * (xlb_new_flow), the ORIG entry the endpoint's INIT ACK's (only from an INIT ACK that
 * carries the client's tag). An ABORT or SHUTDOWN COMPLETE must carry its direction's
 * tag, or with the T bit set the other direction's (the sender's own): otherwise it is
 * dropped (XLB_STAT_DROP_RST_WINDOW: SCTP's RST) and the flow's state is kept. A tag not
 * learned (yet) is not checked (DSR flows see no INIT ACK). An INIT (re)opening a flow
 * that is not established learns the client's tag again. `v`: the entry the packet hit,
 * `pv`: its peer (may be NULL). Returns 0 or the drop reason. */
static __always_inline int xlb_sctp_tags(struct xlb_pkt *p, struct xlb_ct_val *v,
                                         struct xlb_ct_val *pv)
{
    __u8 f = p->tcp_flags;
    if (f & XLB_SCTP_END) {
        struct xlb_ct_val *t = (f & XLB_SCTP_TBIT) ? pv : v;
        if (t && (t->flags & XLB_CTF_SEQ) && t->seq_end != p->seq)
            return XLB_STAT_DROP_RST_WINDOW;
        return 0;
    }
    if (!pv)
        return 0;
    if ((f & XLB_SCTP_INIT) && v->state != XLB_CT_EST) {
        pv->seq_end = p->ack_seq; /* the answers carry the initiator's tag */
        pv->flags |= XLB_CTF_SEQ;
        v->flags &= ~XLB_CTF_SEQ; /* the other's comes with its INIT ACK */
    } else if ((f & XLB_SCTP_INIT_ACK) && (!(v->flags & XLB_CTF_SEQ) || v->seq_end == p->seq)) {
        pv->seq_end = p->ack_seq;
        pv->flags |= XLB_CTF_SEQ;
    }
    return 0;
}

/* The conntrack state an SCTP packet moves its flow to, from the first chunk as parse.h
 * flagged it (XLB_SCTP_*): INIT (re)opens a closed or closing flow, SHUTDOWN and
 * SHUTDOWN ACK close it (CLOSING), ABORT and SHUTDOWN COMPLETE end it (CLOSED: aged in
 * seconds); any packet of the endpoint establishes a new flow (its INIT ACK), as a second
 * packet of the client does for DSR, which sees no reply. */
static __always_inline __u8 xlb_sctp_next(__u8 st, __u8 flags, __u8 dir, __u32 ctf)
{
    if (flags & XLB_SCTP_END)
        return XLB_CT_CLOSED;
    if (flags & XLB_SCTP_INIT)
        return st == XLB_CT_CLOSED || st == XLB_CT_CLOSING ? XLB_CT_NEW : st;
    if (flags & XLB_SCTP_SHUT)
        return st == XLB_CT_CLOSED ? st : XLB_CT_CLOSING;
    if (st == XLB_CT_NEW && (dir == XLB_DIR_REPLY || (ctf & XLB_CTF_DSR)))
        return XLB_CT_EST;
    return st;
}

#endif
