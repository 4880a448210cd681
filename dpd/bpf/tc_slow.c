/* tc_packet_func_slow: conntrack state tracking for flows not yet (or no longer)
 * established, and for new flows: validation, service lookup, endpoint selection,
 * creation of both conntrack entries (never over another flow's), DNAT. IPv4 fragments
 * follow their first fragment; ICMP errors quoting a flow are translated. Packets for
 * no service pass untouched. The firewall (acl.h) judges what has no conntrack entry,
 * before the service lookup; flows it allows to no service are tracked as pass flows. */

#include <uapi/linux/pkt_cls.h>

#include "acl.h"
#include "ct.h"
#include "fwd.h"
#include "icmp.h"
#include "lb.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "ranges.h"
#include "stats.h"

/* The first fragment of a NATed datagram records its ports for the later ones. */
static __always_inline void xlb_frag_record(struct xlb_pkt *p, struct xlb_ct_key *k)
{
    struct xlb_frag_key fk = {};
    struct xlb_frag_val fv = {};
    fk.saddr = k->saddr;
    fk.daddr = k->daddr;
    fk.id = p->ip_id;
    fk.proto = k->proto;
    fv.sport = k->sport;
    fv.dport = k->dport;
    frag_v4_map.update(&fk, &fv);
}

/* A later fragment: the flow its first fragment belongs to, from frag_v4_map. */
static __always_inline int xlb_later_fragment(struct __sk_buff *skb, struct xlb_pkt *p)
{
    struct xlb_frag_key fk = {};
    fk.saddr = p->saddr;
    fk.daddr = p->daddr;
    fk.id = p->ip_id;
    fk.proto = p->proto;
    struct xlb_frag_val *fv = frag_v4_map.lookup(&fk);
    if (!fv) {
        /* no flow to follow: the firewall judges it by its addresses (ports 0) */
        int judged;
        int act = xlb_fw_v4(skb, p, 0, &judged);
        if (act >= 0)
            return act;
        /* To a VIP but its first fragment was not seen (yet, or evicted): it cannot be
         * tied to a flow, and passing it would leak it to the stack untranslated. */
        __be32 dst = p->daddr;
        if (vip_v4_map.lookup(&dst)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_FRAG_NO_FIRST);
            return TC_ACT_SHOT;
        }
        xlb_count(XLB_STAT_PASS_FRAG);
        return TC_ACT_OK;
    }
    p->sport = fv->sport;
    p->dport = fv->dport;
    struct xlb_ct_key k;
    xlb_ct_key_of(&k, p);
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    if (v && (v->flags & XLB_CTF_FW) && xlb_fw_flow(skb, v) >= 0)
        return TC_ACT_SHOT; /* over its POLICE rule's rate */
    if (!v || (v->flags & XLB_CTF_PASS)) {
        xlb_count(XLB_STAT_PASS_FRAG);
        return TC_ACT_OK;
    }
    xlb_ct_touch(v);
    xlb_count(XLB_STAT_FRAG_NAT);
    xlb_count_flow(skb, v->svc_id, v->stat_id);
    if (v->flags & XLB_CTF_DSR) /* sent on unchanged, as its first fragment */
        return xlb_dsr_out(skb, p, v->nat_addr, v->nat2_addr, v->flags & XLB_CTF_IPIP);
    __be16 port = v->nat_port;
    __be16 port2 = v->nat2_port;
    int rc;
    if (v->flags & XLB_CTF_FNAT)
        rc = xlb_nat_l3_full(skb, p, v->dir, v->nat_addr, v->nat2_addr);
    else
        rc = xlb_nat_l3(skb, p, v->dir, v->nat_addr);
    if (rc < 0)
        return TC_ACT_OK;
    if (v->dir == XLB_DIR_ORIG) {
        p->dport = port;
        if (v->flags & XLB_CTF_FNAT)
            p->sport = port2;
    } else {
        p->sport = port;
        if (v->flags & XLB_CTF_FNAT)
            p->dport = port2;
    }
    return xlb_forward(skb, p);
}

/* Make room for a new flow's REPLY entry at `rk` held by another: an entry whose flow is
 * gone (its ORIG evicted, or not pointing back) or closed is removed. 0: removed. */
static __always_inline int xlb_ct_reclaim(struct xlb_ct_key *rk)
{
    struct xlb_ct_val *old = ct_v4_map.lookup(rk);
    if (!old)
        return 0;
    struct xlb_ct_val *op = xlb_ct_peer(rk, old);
    if (op && old->state != XLB_CT_CLOSED)
        return -1; /* a live flow: never overwritten */
    xlb_ct_delete_flow(rk, old);
    return 0;
}

/* A flow the firewall allowed that no service carries (TCP opened by a SYN, or picked up
 * by a bare ACK; UDP; SCTP opened by an INIT, its other chunks judged per packet): both
 * conntrack entries, flagged XLB_CTF_PASS and rewriting nothing (the "NAT" address and
 * port are the destination's own), so that its later
 * packets and its replies take the fast path unjudged (a POLICE or MIRROR rule's ORIG
 * entry keeps the rule: fw). A martian source is passed untracked, judged per packet.
 * A REPLY key held by a live flow is refused as a service flow's is (drop_ct_clash): the
 * client ip:port is in a VIP flow to this very endpoint ip:port (DNAT keeps the client's
 * port), so the endpoint's answers could not be told apart: passed untracked, they would
 * be taken for the VIP flow's and rewritten to come from the VIP. Returns the packet's
 * TC action when it ends here (refused), else -1. */
static __always_inline int xlb_pass_flow(struct __sk_buff *skb, struct xlb_pkt *p,
                                         int first_frag, struct xlb_fw_res *fw)
{
    int midstream = 0;
    if (p->proto == IPPROTO_TCP) {
        __u8 c = p->tcp_flags & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST | XLB_TCP_ACK);
        if (c == XLB_TCP_ACK)
            midstream = 1;
        else if (c != XLB_TCP_SYN)
            return -1;
    } else if (p->proto == IPPROTO_SCTP && p->tcp_flags != XLB_SCTP_INIT) {
        return -1; /* as a service's: only an INIT opens an SCTP flow (the rest: per packet) */
    }
    if (xlb_martian(p->saddr))
        return -1;
    struct xlb_ct_key k;
    struct xlb_ct_val v = {};
    xlb_ct_key_of(&k, p);
    v.nat_addr = p->daddr;
    v.nat_port = p->dport;
    v.dir = XLB_DIR_REPLY;
    v.state = midstream ? XLB_CT_EST : XLB_CT_NEW;
    v.flags = XLB_CTF_PASS;
    v.last_ns = bpf_ktime_get_coarse_ns();
    v.in_ifindex = skb->ingress_ifindex;
    if (p->proto == IPPROTO_SCTP) { /* the answers carry the INIT's initiate tag (sctp.h) */
        v.seq_end = p->ack_seq;
        v.flags |= XLB_CTF_SEQ;
    }
    struct xlb_ct_key rk = {};
    rk.saddr = p->daddr;
    rk.sport = p->dport;
    rk.daddr = p->saddr;
    rk.dport = p->sport;
    rk.proto = p->proto;
    if (ct_v4_map.insert(&rk, &v) && (xlb_ct_reclaim(&rk) || ct_v4_map.insert(&rk, &v))) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
        return TC_ACT_SHOT;
    }
    v.dir = XLB_DIR_ORIG;
    if (p->proto == IPPROTO_TCP) {
        v.seq_end = xlb_seq_end(p);
        v.flags |= XLB_CTF_SEQ;
    } else {
        v.flags &= ~XLB_CTF_SEQ; /* SCTP: the tag comes with the INIT ACK */
    }
    v.flags |= fw->ctf;
    v.fw_rule = fw->rule_id;
    v.fw_arg = fw->target;
    if (ct_v4_map.insert(&k, &v)) {
        ct_v4_map.delete(&rk);
        return -1;
    }
    xlb_count(XLB_STAT_FW_PASS_FLOW);
    if (first_frag)
        xlb_frag_record(p, &k);
    return -1;
}

/* The source a rewritten packet of a service takes (full-NAT's SNAT address, IP-in-IP's
 * outer source): the service's own address, else the node's toward the endpoint (0: no
 * route to it). */
static __always_inline __be32 xlb_svc_source(struct __sk_buff *skb, struct xlb_nat_val *svc,
                                             __be32 ep_addr)
{
    __be32 a = svc->snat_addr;
    return a ? a : xlb_src_toward(skb, ep_addr);
}

static __always_inline int xlb_new_flow(struct __sk_buff *skb, struct xlb_pkt *p, int first_frag)
{
    /* the firewall first (when on): drop and redirect end here; police and mirror act on
     * this packet, and the flow's ORIG entry keeps them (fw) for its later packets */
    int judged;
    struct xlb_fw_res fw = {};
    int act = xlb_fw_v4_res(skb, p, 1, &judged, &fw);
    if (act >= 0)
        return act;
    struct xlb_nat_key nk = {};
    nk.vip = p->daddr;
    nk.port = p->dport;
    nk.proto = p->proto;
    struct xlb_nat_val *svc = nat_v4_map.lookup(&nk);
    if (!svc)
        svc = xlb_svc_range(&nk); /* a port-range or any-port service: nk becomes its key */
    if (!svc) {
        if (judged) {
            int refused = xlb_pass_flow(skb, p, first_frag, &fw);
            if (refused >= 0)
                return refused;
        }
        xlb_count(XLB_STAT_PASS);
        return TC_ACT_OK;
    }
    /* A TCP flow opens with a SYN; a bare ACK (with PSH, URG) without conntrack has lost
     * it (flush, eviction, node rebuilt): pick by hash, so that every such packet of the
     * flow lands on the same endpoint whatever the algorithm, and track it as
     * established. Nothing else opens a flow. */
    int midstream = 0;
    if (p->proto == IPPROTO_TCP) {
        __u8 c = p->tcp_flags & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST | XLB_TCP_ACK);
        if (c == XLB_TCP_ACK) {
            midstream = 1;
        } else if (c != XLB_TCP_SYN) {
            xlb_count(XLB_STAT_PASS_BAD_FLAGS);
            return TC_ACT_OK;
        }
    } else if (p->proto == IPPROTO_SCTP && p->tcp_flags != XLB_SCTP_INIT) {
        /* an SCTP association opens with an INIT: another chunk has no flow to join */
        xlb_count(XLB_STAT_PASS_BAD_FLAGS);
        return TC_ACT_OK;
    }
    if (xlb_martian(p->saddr)) {
        xlb_count(XLB_STAT_PASS_MARTIAN);
        return TC_ACT_OK;
    }
    struct xlb_ep *ep = xlb_select(svc, p, midstream);
    if (!ep) {
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ENDPOINT);
        return TC_ACT_SHOT;
    }
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xlb_ct_key k;
    struct xlb_ct_val v = {};
    xlb_ct_key_of(&k, p);
    /* endpoint port 0 (port-range and any-port services): the client's port, kept */
    __be16 ep_port = ep->port ? ep->port : p->dport;
    v.nat_addr = ep->addr;
    v.nat_port = ep_port;
    v.dir = XLB_DIR_ORIG;
    v.state = midstream ? XLB_CT_EST : XLB_CT_NEW;
    v.svc_id = svc->svc_id;
    v.stat_id = ep->stat_id;
    v.last_ns = now;
    v.svc = nk;
    v.in_ifindex = skb->ingress_ifindex;

    __u8 mode = svc->mode;
    __u8 algo = svc->algo;
    if (mode == XLB_MODE_DSR || mode == XLB_MODE_DSR_IPIP) {
        /* DSR: the ORIG entry only (replies do not come back through the node) */
        v.flags = XLB_CTF_DSR;
        if (mode == XLB_MODE_DSR_IPIP) {
            __be32 outer = xlb_svc_source(skb, svc, ep->addr);
            if (!outer) {
                xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
                return TC_ACT_SHOT;
            }
            v.flags |= XLB_CTF_IPIP;
            v.nat2_addr = outer;
        }
        if (p->proto == IPPROTO_TCP) {
            v.seq_end = xlb_seq_end(p);
            v.flags |= XLB_CTF_SEQ;
        }
        v.flags |= fw.ctf;
        v.fw_rule = fw.rule_id;
        v.fw_arg = fw.target;
        if (ct_v4_map.insert(&k, &v)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
            return TC_ACT_SHOT;
        }
        xlb_count(XLB_STAT_NEW_FLOW);
        xlb_count_flow(skb, v.svc_id, v.stat_id);
        xlb_lc_opened(algo, v.stat_id);
        if (first_frag)
            xlb_frag_record(p, &k);
        return xlb_dsr_out(skb, p, v.nat_addr, v.nat2_addr, mode == XLB_MODE_DSR_IPIP);
    }

    struct xlb_ct_key rk = {};
    rk.saddr = ep->addr;
    rk.sport = ep_port;
    rk.daddr = p->saddr;
    rk.dport = p->sport;
    rk.proto = p->proto;
    struct xlb_ct_val rv = v;
    rv.nat_addr = nk.vip;
    rv.nat_port = p->dport; /* the service port the client used (a range's: its own) */
    rv.dir = XLB_DIR_REPLY;
    if (p->proto == IPPROTO_SCTP) { /* the answers carry the INIT's initiate tag (sctp.h) */
        rv.seq_end = p->ack_seq;
        rv.flags |= XLB_CTF_SEQ;
    }
    if (p->proto == IPPROTO_TCP) {
        v.seq_end = xlb_seq_end(p);
        v.flags = XLB_CTF_SEQ;
    }

    if (mode == XLB_MODE_FULLNAT) {
        /* Full-NAT: the source becomes the SNAT address (the service's, or the node's
         * toward the endpoint) and a port that makes the REPLY key (endpoint -> SNAT
         * address:port) unique: a hash of the flow picks the first candidate, the next
         * ones are probed; a taken candidate is never overwritten (NOEXIST). */
        __be32 snat = xlb_svc_source(skb, svc, ep->addr);
        if (!snat) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_NO_ROUTE);
            return TC_ACT_SHOT;
        }
        v.flags |= XLB_CTF_FNAT;
        rv.flags |= XLB_CTF_FNAT;
        rv.nat2_addr = p->saddr;
        rv.nat2_port = p->sport;
        rk.daddr = snat;
        __u32 h = xlb_mix(xlb_flow_hash(p) ^ ep->addr ^ ep->port);
        __u32 count = svc->snat_addr ? XLB_SNAT_PORT_COUNT_OWN : XLB_SNAT_PORT_COUNT;
        __u32 cport = bpf_ntohs(p->sport);
        int keep = cport >= XLB_SNAT_PORT_MIN && cport - XLB_SNAT_PORT_MIN < count;
        int ok = 0;
#pragma unroll
        for (int i = 0; i < XLB_SNAT_TRIES; i++) {
            __u32 port = XLB_SNAT_PORT_MIN + (h + i) % count;
            if (i == 0 && keep) /* the client's own port, when in the range */
                port = cport;
            rk.dport = bpf_htons(port);
            if (!ct_v4_map.insert(&rk, &rv) ||
                (!xlb_ct_reclaim(&rk) && !ct_v4_map.insert(&rk, &rv))) {
                ok = 1;
                break;
            }
            xlb_count(XLB_STAT_SNAT_PORT_BUSY);
        }
        if (!ok) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_SNAT_PORTS);
            return TC_ACT_SHOT;
        }
        v.nat2_addr = snat;
        v.nat2_port = rk.dport;
    } else if (ct_v4_map.insert(&rk, &rv)) {
        /* Never over another flow's entry. DNAT keeps the client's port, so two flows
         * from one client ip:port to two VIPs sharing an endpoint ip:port would share a
         * REPLY key: the later flow is refused (full-NAT remaps the port instead, as
         * the kernel's NAT does). */
        if (xlb_ct_reclaim(&rk) || ct_v4_map.insert(&rk, &rv)) {
            xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
            return TC_ACT_SHOT;
        }
    }
    v.flags |= fw.ctf;
    v.fw_rule = fw.rule_id;
    v.fw_arg = fw.target;
    if (ct_v4_map.insert(&k, &v)) {
        ct_v4_map.delete(&rk);
        xlb_count_drop(skb->ingress_ifindex, XLB_STAT_DROP_CT_CLASH);
        return TC_ACT_SHOT;
    }
    xlb_count(XLB_STAT_NEW_FLOW);
    xlb_count_flow(skb, v.svc_id, v.stat_id);
    xlb_lc_opened(algo, v.stat_id);
    if (first_frag)
        xlb_frag_record(p, &k);
    int rc;
    if (v.flags & XLB_CTF_FNAT)
        rc = xlb_nat_full(skb, p, XLB_DIR_ORIG, v.nat_addr, v.nat_port, v.nat2_addr,
                          v.nat2_port);
    else
        rc = xlb_nat(skb, p, XLB_DIR_ORIG, v.nat_addr, v.nat_port);
    if (rc < 0)
        return TC_ACT_OK;
    return xlb_forward(skb, p);
}

int tc_packet_func_slow(struct __sk_buff *skb)
{
    struct xlb_pkt p;
    xlb_count(XLB_STAT_SLOW_PATH);
    int rc = xlb_parse(skb, &p);
    if (rc == XLB_P_V6) { /* IPv6 has its own slow path (tc_slow6.c) */
        pgm_tbl.call(skb, XLB_PGM_SLOW6);
        xlb_count(XLB_STAT_TAILCALL_FAIL);
        return TC_ACT_OK;
    }
    if (rc == XLB_P_ICMP) {
        /* judged, except errors about a tracked flow (as conntrack's RELATED) */
        if (xlb_fw_on() && !xlb_icmp_related(skb)) {
            int judged;
            int act = xlb_fw_v4(skb, &p, 0, &judged);
            if (act >= 0)
                return act;
        }
        return xlb_icmp(skb, &p);
    }
    int first_frag = 0;
    if (rc == XLB_P_FRAG) {
        if (p.frag & 0x1fff)
            return xlb_later_fragment(skb, &p);
        first_frag = 1;
    } else if (rc != XLB_P_OK) {
        return xlb_pass_unparsed(rc);
    }
    struct xlb_ct_key k;
    xlb_ct_key_of(&k, &p);
    struct xlb_ct_val *v = ct_v4_map.lookup(&k);
    if (v) {
        /* A new SYN on a closing or closed tuple starts a new flow, with a new endpoint:
         * the old flow's entries go first (both: a late packet of the old endpoint must
         * not find an entry that leads to the new flow). */
        int reopen = v->dir == XLB_DIR_ORIG && p.proto == IPPROTO_TCP &&
                     (p.tcp_flags & (XLB_TCP_FIN | XLB_TCP_SYN | XLB_TCP_RST | XLB_TCP_ACK)) ==
                         XLB_TCP_SYN &&
                     (v->state == XLB_CT_CLOSING || v->state == XLB_CT_CLOSED);
        if (reopen) {
            xlb_ct_delete_flow(&k, v);
        } else {
            int drop = xlb_ct_step(&p, &k, v);
            if (drop) {
                xlb_count_drop(skb->ingress_ifindex, drop);
                return TC_ACT_SHOT;
            }
            xlb_ct_touch(v);
            if (first_frag)
                xlb_frag_record(&p, &k);
            if ((v->flags & XLB_CTF_FW) && xlb_fw_flow(skb, v) >= 0)
                return TC_ACT_SHOT; /* over its POLICE rule's rate */
            if (v->flags & XLB_CTF_PASS)
                return TC_ACT_OK; /* a flow the firewall allowed: handed on untouched */
            xlb_count_flow(skb, v->svc_id, v->stat_id);
            return xlb_flow_out(skb, &p, v);
        }
    }
    return xlb_new_flow(skb, &p, first_frag);
}
