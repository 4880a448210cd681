/* xlb datapath ABI: every map's key and value layout and every constant shared by
 * the eBPF programs and dpd. This file is the single source: dpd reads it (dpd/abi.py
 * parses the #defines and structs, and a datapath test checks the result against the
 * BTF of the loaded maps), so nothing is restated in Python.
 *
 * Rules that keep it readable by both: one #define per constant (an integer or an
 * expression of earlier constants), structs of fixed-size fields only, and every
 * padding byte written out as a field named pad*, so that no layout has a hole.
 * Addresses and ports are in network byte order (__be32, __be16), the rest host order. */
#ifndef XLB_ABI_H
#define XLB_ABI_H

#include <linux/types.h>

/* A service's endpoints and its slot table live outside its nat_v4_map value: in ep_map
 * and slot_map, arrays shared by all services in which each service holds a run of
 * consecutive entries that dpd allocates (xlb_nat_val.ep_base, slot_base). A value stays
 * small whatever its endpoint count; a changed set is written to fresh runs and the
 * service flips to them with one write of its value (docs/algorithms.md). */
#define XLB_MAX_EPS 1024  /* endpoints per service */
#define XLB_SLOTS 4096    /* weighted selection slots per service, at most */
#define XLB_SLOT_CHUNK 4  /* slots per slot_map entry (8 bytes: an array value's unit) */
/* Maglev lookup table capacity (entries, a prime): a service's table uses the first
 * xlb_maglev.size entries (a prime <= this, dpd's setting) */
#define XLB_MAGLEV_SIZE 16381

/* pgm_tbl slots */
#define XLB_PGM_SLOW 1
#define XLB_PGM_SLOW6 2 /* IPv6 (tc_slow6.c) */

/* conntrack direction */
#define XLB_DIR_ORIG 1   /* client -> VIP: destination is rewritten to the endpoint */
#define XLB_DIR_REPLY 2  /* endpoint -> client: source is rewritten to the VIP */

/* conntrack state (values match the API's ConntrackState) */
#define XLB_CT_NEW 1
#define XLB_CT_REPLIED 2
#define XLB_CT_EST 3
#define XLB_CT_CLOSING 4
#define XLB_CT_CLOSED 5

/* ct flags. FIN_* are the flow's (kept equal in both entries); SEQ is the entry's
 * own: its seq_end holds the highest sequence number its direction has sent. */
#define XLB_CTF_FIN_ORIG 1
#define XLB_CTF_FIN_REPLY 2
#define XLB_CTF_SEQ 4
/* a flow the firewall allowed that no service carries: tracked (so that established
 * packets and replies are not judged again) but never rewritten */
#define XLB_CTF_PASS 8

/* An RST is honoured when its sequence number lies in
 * [seq_end - XLB_RST_BEHIND, seq_end + XLB_RST_AHEAD] of its direction (see
 * docs/datapath.md): an RST carries the sender's next sequence number, or the
 * acknowledgement of the segment it answers, which lies behind it by the bytes in flight. */
#define XLB_RST_BEHIND 1048576
#define XLB_RST_AHEAD 65536

/* a full-NAT flow (XLB_MODE_FULLNAT): both addresses and ports are rewritten, nat2_*
 * holding the second rewrite (ORIG: the new source, the SNAT address and allocated
 * port; REPLY: the new destination, the client) */
#define XLB_CTF_FNAT 16
/* a DSR flow (XLB_MODE_DSR, XLB_MODE_DSR_IPIP): one ORIG entry, no REPLY (the endpoint
 * answers the client directly); nothing in the IP packet is rewritten, it goes to the
 * endpoint nat_addr by its MAC address, or IP-in-IP encapsulated (XLB_CTF_IPIP) with
 * outer source nat2_addr */
#define XLB_CTF_DSR 32
#define XLB_CTF_IPIP 64
/* a flow a firewall rule polices (charged to policer fw_arg) or mirrors (copied out of
 * ifindex fw_arg), on the ORIG entry only (the rule's direction): every packet of it, fast
 * path included, is charged or copied; fw_rule counts what the rule drops or copies */
#define XLB_CTF_POLICE 128
#define XLB_CTF_MIRROR 256
#define XLB_CTF_FW (XLB_CTF_POLICE | XLB_CTF_MIRROR)

/* modes (xlb_nat_val.mode; values match the API's Mode) */
#define XLB_MODE_DNAT 1
#define XLB_MODE_FULLNAT 2
#define XLB_MODE_DSR 3
#define XLB_MODE_DSR_IPIP 4

/* Full-NAT source ports: a new flow's REPLY key is (endpoint -> SNAT address:port), so
 * the port is chosen to make the key unique. The first candidate is the client's own
 * port when it lies in the range (as the kernel's NAT keeps it: the endpoint then sees
 * one client tuple per tuple of its own, which keeps its TIME_WAIT checks working with
 * per-connection timestamp offsets), else a hash of the client's tuple; then up to
 * XLB_SNAT_TRIES - 1 hash-derived ones are probed (insert with BPF_NOEXIST). The range
 * is [XLB_SNAT_PORT_MIN, XLB_SNAT_PORT_MIN + count): with the node's own address
 * (snat_addr 0) count is XLB_SNAT_PORT_COUNT, below Linux's default ephemeral ports
 * (32768..60999), so that the node's own connections from that address (health probes)
 * never share a tuple with a flow; with a service's own SNAT address, which the node
 * does not use otherwise, XLB_SNAT_PORT_COUNT_OWN (up to 65535). */
#define XLB_SNAT_PORT_MIN 1024
#define XLB_SNAT_PORT_COUNT 31744
#define XLB_SNAT_PORT_COUNT_OWN 64512
#define XLB_SNAT_TRIES 8

/* algorithms (values match the API's Algorithm) */
#define XLB_ALGO_RR 1
#define XLB_ALGO_HASH 2
#define XLB_ALGO_MAGLEV 3
#define XLB_ALGO_SOURCE_HASH 4  /* weighted hash of the client address only */
#define XLB_ALGO_LEAST_CONN 5   /* fewest active flows per weight among sampled slots */

/* least connections: a new flow compares the endpoints of this many consecutive slots
 * of the service's slot table from a random start (the table interleaves endpoints, so
 * consecutive slots are distinct endpoints while weights are comparable): a bounded
 * sample, weighted as the slot table is ("power of d choices", d = 4) */
#define XLB_LC_CHOICES 4

/* xlb_nat_val.flags */
#define XLB_SVC_MAGLEV_B 1 /* the service's Maglev table is maglev_v4_map[svc_id * 2 + 1],
                             * else [svc_id * 2]: dpd writes the other one, then flips */

/* xlb_cfg.flags */
#define XLB_CFG_REDIRECT 1  /* forward NATed packets with bpf_redirect after a FIB lookup */

/* TTL of the echo replies the datapath sends for a VIP */
#define XLB_ICMP_REPLY_TTL 64

/* global counters: XLB_STAT_<NAME> indexes stats_map; dpd reports each as <name> */
#define XLB_STAT_PASS 0             /* not ours: handed to the kernel untouched */
#define XLB_STAT_UNUSED_1 1         /* kept free so the indexes below stay stable */
#define XLB_STAT_SLOW_PATH 2        /* packets that took the tail call */
#define XLB_STAT_NEW_FLOW 3         /* conntrack entries created */
#define XLB_STAT_DROP_NO_ENDPOINT 4 /* dropped: service has no endpoint with weight > 0 */
#define XLB_STAT_REDIRECT 5         /* forwarded with bpf_redirect / bpf_redirect_neigh */
#define XLB_STAT_TO_STACK 6         /* NATed, then handed to the kernel to route */
#define XLB_STAT_TAILCALL_FAIL 7    /* pgm_tbl slot empty: packet passed */
#define XLB_STAT_DROP_CT_INSERT 8   /* dropped: a conntrack entry could not be written */
#define XLB_STAT_PASS_BAD_HEADER 9  /* passed untouched: IPv4/TCP/UDP header malformed */
#define XLB_STAT_PASS_IP_OPTIONS 10 /* passed untouched: IPv4 header with options */
#define XLB_STAT_PASS_BAD_FLAGS 11  /* passed untouched: TCP flags that cannot open a flow */
#define XLB_STAT_PASS_MARTIAN 12    /* passed untouched: martian/multicast/broadcast source */
#define XLB_STAT_DROP_BAD_FLAGS 13  /* dropped: invalid TCP flag combination on a flow */
#define XLB_STAT_DROP_CT_CLASH 14   /* dropped: new flow's entry would overwrite another flow's */
#define XLB_STAT_DROP_RST_WINDOW 15 /* dropped: RST outside the sequence window */
#define XLB_STAT_CT_NO_ADVANCE 16   /* handshake packet that does not answer: state kept */
#define XLB_STAT_FRAG_NAT 17        /* non-first IPv4 fragments NATed with their first */
#define XLB_STAT_PASS_FRAG 18       /* non-first fragments of no known flow: passed */
#define XLB_STAT_ICMP_NAT 19        /* ICMP errors quoting a flow, translated */
#define XLB_STAT_ICMP_ECHO_REPLY 20 /* ICMP echo requests to a VIP, answered */
#define XLB_STAT_DROP_FRAG_NO_FIRST 21 /* dropped: later fragment to a VIP, first unseen */
#define XLB_STAT_DROP_FIREWALL 22     /* dropped: a firewall rule's action is drop */
#define XLB_STAT_DROP_DEFAULT_POLICY 23 /* dropped: no rule matched, interface policy drop */
#define XLB_STAT_FW_REDIRECT 24       /* sent out of another interface by a firewall rule */
#define XLB_STAT_FW_EVAL 25           /* packets the firewall judged (new flows, drops) */
#define XLB_STAT_FW_PASS_FLOW 26      /* firewall-allowed flows of no service, tracked */
#define XLB_STAT_SNAT_PORT_BUSY 32    /* full-NAT: a candidate source port was taken, next tried */
#define XLB_STAT_DROP_SNAT_PORTS 33   /* dropped: full-NAT found no free source port */
#define XLB_STAT_DROP_NO_ROUTE 34     /* dropped: full-NAT or DSR found no route (or source
                                       * address) to the endpoint */
#define XLB_STAT_DSR 35               /* sent to an endpoint by DSR (MAC or IP-in-IP) */
#define XLB_STAT_MAX 40

/* nat_v4_map key. An exact-port service: range 0, port its port. A port-range or
 * any-port service (docs/services.md): range 1, port its first port (0: any-port);
 * range_v4_map leads a new flow's (vip, proto, port) to it when no exact-port service
 * holds the port. */
struct xlb_nat_key {
    __be32 vip;
    __be16 port;
    __u8 proto;
    __u8 range;
};

/* range_v4_map (an LPM trie): the port-range and any-port services of a (vip, proto).
 * A range [first, last] is written as the port prefixes that cover it exactly
 * (prefixlen XLB_RANGE_BASE_BITS + the prefix's bits); any-port is one entry of
 * prefixlen XLB_RANGE_BASE_BITS. Ranges of one (vip, proto) never overlap (dpd refuses
 * it), so the longest match is the range holding the port, else any-port. */
#define XLB_RANGE_BASE_BITS 48 /* vip, proto, pad: matched whole */
struct xlb_range_key {
    __u32 prefixlen;
    __be32 vip;
    __u8 proto;
    __u8 pad;
    __be16 port;
};

struct xlb_range_val {
    __be16 first; /* the service's nat_v4_map key port (0: any-port) */
    __be16 last;  /* its last port (dpd's record; any-port: 0) */
};

/* xlb_ep.flags */
#define XLB_EP_LIVE 1 /* the endpoint holds slots (selectable): clear while health or a
                       * priority group takes it out of selection */
#define XLB_EP_DOWN 2 /* health found it down (dpd's record; the datapath reads LIVE) */

/* ep_map[ep_base + i]: endpoint i of a service (i < n_eps). Selection reads weight,
 * stat_id and flags only (address-family neutral); addr is the IPv4 address. */
struct xlb_ep {
    __be32 addr;
    __be16 port;
    __u16 weight;  /* configured (least connections divides by it) */
    __u32 stat_id; /* index into ep_stats_map and ep_conn_map */
    __u8 flags;    /* XLB_EP_* */
    __u8 prio;     /* priority group (dpd's record: the datapath reads only LIVE) */
    __u16 pad;
};

/* slot_map[slot_base + pos / XLB_SLOT_CHUNK].ep[pos % XLB_SLOT_CHUNK]: slot pos of a
 * service's slot table (pos < n_slots) -> an endpoint index (< n_eps) */
struct xlb_slots {
    __u16 ep[XLB_SLOT_CHUNK];
};

struct xlb_nat_val {
    __u32 svc_id; /* index into svc_stats_map and rr_map */
    __u8 algo;
    __u8 mode;
    __u8 flags;
    __u8 pad;
    __u16 n_eps;
    __u16 n_slots; /* 0: no endpoint takes new flows */
    __u16 persist_s; /* session persistence: a client's new flows go to the endpoint of
                      * its last new flow for this many seconds (persist_v4_map); 0: off */
    __u16 pad2;
    /* XLB_MODE_FULLNAT: the source address of the flows to endpoints; XLB_MODE_DSR_IPIP:
     * the outer source. 0: the node's address toward the endpoint (a FIB lookup) */
    __be32 snat_addr;
    __u32 ep_base;   /* the service's endpoints: ep_map[ep_base .. ep_base + n_eps) */
    __u32 slot_base; /* its slot table: slot_map[slot_base ..] */
};

/* maglev_v4_map value: a Maglev service's lookup table (flow hash % size -> index into
 * the service's eps), written whole by dpd (dpd/maglev.py) before the service points
 * at it. */
struct xlb_maglev {
    __u32 size; /* entries in use: a prime <= XLB_MAGLEV_SIZE */
    __u32 pad;
    __u16 ep[XLB_MAGLEV_SIZE];
    __u16 pad2;
};

/* persist_v4_map: a client's endpoint for a service with persist_s (session
 * persistence), refreshed by each new flow of the client */
struct xlb_persist_key {
    __u32 svc_id;
    __be32 client;
};

struct xlb_persist_val {
    __u32 stat_id; /* the endpoint (checked against the service's endpoint idx: a stat_id
                    * names one endpoint of one service while it stays in the service) */
    __u16 idx;     /* index into the service's endpoints when chosen */
    __u16 pad;
    __u64 last_ns; /* bpf_ktime_get_coarse_ns() of the client's last new flow */
};

struct xlb_ct_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

struct xlb_ct_val {
    __be32 nat_addr; /* ORIG: new destination; REPLY: new source */
    __be16 nat_port;
    __u8 dir;
    __u8 state;
    __u32 svc_id;
    __u32 stat_id;
    __u32 flags;   /* XLB_CTF_* */
    __u32 seq_end; /* TCP, with XLB_CTF_SEQ: highest seq + length this direction sent
                    * (host order; the SYN's ISN + 1 after the SYN) */
    __u64 last_ns; /* bpf_ktime_get_coarse_ns() of the last packet, refreshed at most
                    * every XLB_CT_TOUCH_NS */
    struct xlb_nat_key svc;
    __u32 in_ifindex; /* interface the flow's first packet arrived on (firewall) */
    __be32 nat2_addr; /* XLB_CTF_FNAT: ORIG: new source; REPLY: new destination.
                       * XLB_CTF_IPIP: the outer source */
    __be16 nat2_port; /* XLB_CTF_FNAT: ORIG: new source port; REPLY: new destination port */
    __u16 fw_rule;    /* XLB_CTF_POLICE, XLB_CTF_MIRROR: the rule's id (acl_stats_map) */
    __u32 fw_arg;     /* XLB_CTF_POLICE: the policer id; XLB_CTF_MIRROR: the mirror ifindex */
};

struct xlb_counter {
    __u64 packets;
    __u64 bytes;
};

/* frag_v4_map: the first fragment of a NATed datagram records its ports, so that the
 * later fragments (no L4 header) find the flow's conntrack entry. */
struct xlb_frag_key {
    __be32 saddr;
    __be32 daddr;
    __be16 id;
    __u8 proto;
    __u8 pad;
};

struct xlb_frag_val {
    __be16 sport;
    __be16 dport;
};

#define XLB_BUILD_ID_LEN 32

/* cfg_map[0]: settings of the loaded programs. build_id is the SHA-256 of the program
 * source and compile flags that dpd loaded last: a restarted dpd whose build matches
 * reuses the pinned programs instead of compiling them again. */
struct xlb_cfg {
    __u32 flags; /* XLB_CFG_* */
    __u32 pad;
    __u8 build_id[XLB_BUILD_ID_LEN];
};

/* ---- Firewall (docs/firewall.md) ---------------------------------------------------
 * dpd compiles the rule set into a tuple space (dpd/firewall.py): each lookup shape (which
 * fields a rule matches, with which prefix lengths; port ranges become port prefixes) is a
 * "tuple" with a mask. A packet's key is masked by each tuple's mask in turn and looked up
 * in acl_map; the best-ranked match wins. Tuples are sorted by the best rank they hold, so
 * the search stops as soon as no later tuple can beat the match in hand: the cost follows
 * the number of shapes, not the number of rules. Two rule sets (generations) live side by
 * side: dpd writes the staged one whole, then flips acl_cfg.gen, then clears the old. */
#define XLB_ACL_TUPLES 64 /* lookup shapes per rule set */

/* actions (values match the API's FirewallAction) */
#define XLB_ACT_ALLOW 1
#define XLB_ACT_DROP 2
#define XLB_ACT_REDIRECT 3
#define XLB_ACT_TRAP 4   /* the packet's first bytes to dpd (pkt_ring), then as allow */
#define XLB_ACT_POLICE 5 /* charged to policer `target`: over the rate dropped, else allow */
#define XLB_ACT_MIRROR 6 /* copied out of ifindex `target` (bpf_clone_redirect), then allow */

/* xlb_intf.policy (values match the API's DefaultPolicy) */
#define XLB_POLICY_ALLOW 1
#define XLB_POLICY_DROP 2

/* xlb_acl_key.family */
#define XLB_FAMILY_V4 4
#define XLB_FAMILY_V6 6

/* The packet fields a rule can match. An IPv4 address is in src[0] / dst[0]. */
struct xlb_acl_key {
    __u16 tuple; /* generation * XLB_ACL_TUPLES + tuple index (never masked) */
    __u8 family; /* XLB_FAMILY_* */
    __u8 proto;
    __u32 ifindex; /* ingress interface */
    __be16 sport;
    __be16 dport;
    __be32 src[4];
    __be32 dst[4];
};

struct xlb_acl_val {
    __u32 rank;    /* the rule's place in the set: the lowest rank matching wins */
    __u32 rule_id; /* index into acl_stats_map */
    __u32 target;  /* REDIRECT, MIRROR: the interface's ifindex; POLICE: the policer id */
    __u8 action;   /* XLB_ACT_* */
    __u8 pad[3];
};

/* acl_tuple_map[generation * XLB_ACL_TUPLES + i]: tuple i of a rule set */
struct xlb_acl_tuple {
    __u32 min_rank; /* the best rank among the tuple's entries */
    __u32 pad;
    struct xlb_acl_key mask; /* a packet's key is ANDed with this (tuple: unused) */
};

/* xlb_acl_cfg.flags */
#define XLB_ACL_F_POLICY_DROP 1 /* some interface's default policy is drop (intf_map) */

/* acl_cfg_map[0]: which rule set is live. The firewall is off (no lookup at all, not
 * even intf_map) while n_tuples[gen] is 0 and XLB_ACL_F_POLICY_DROP is clear. */
struct xlb_acl_cfg {
    __u32 gen;        /* 0 or 1 */
    __u32 n_tuples[2]; /* tuples in use per generation */
    __u32 flags;      /* XLB_ACL_F_* */
};

/* acl_rules_map[rule_id]: the node's record of each rule as the API gave it, read back
 * by ListFirewallRules and by a restarted dpd (the datapath never reads it). */
#define XLB_NAME_LEN 64
#define XLB_IFNAME_LEN 16 /* IFNAMSIZ */
#define XLB_ACL_HAS_SRC 1
#define XLB_ACL_HAS_DST 2
struct xlb_acl_rule {
    __u8 name[XLB_NAME_LEN];
    __u16 priority;
    __u8 action;
    __u8 proto;
    __u8 family; /* 0: any; else of src/dst */
    __u8 src_len;
    __u8 dst_len;
    __u8 has;    /* XLB_ACL_HAS_*: which prefixes are set (0.0.0.0/0 is not "any") */
    __be32 src[4];
    __be32 dst[4];
    __u16 sport_first; /* host order; 0..0: any */
    __u16 sport_last;
    __u16 dport_first;
    __u16 dport_last;
    __u32 in_ifindex;       /* 0: any */
    __u32 target;           /* as xlb_acl_val.target */
    /* the interfaces by name as the API gave them: an ifindex alone cannot be named
     * again once its interface is gone (target_name: REDIRECT's or MIRROR's) */
    __u8 in_name[XLB_IFNAME_LEN];
    __u8 target_name[XLB_IFNAME_LEN];
    __u8 policer[XLB_NAME_LEN]; /* POLICE: the policer's name */
};

/* svc_cfg_map[svc_id]: dpd's record of a service's health check and conntrack
 * timeouts (only for services that set either), so that a restarted dpd reads back
 * what the API gave it. The datapath never reads it. */
#define XLB_HC_PAYLOAD 64
#define XLB_CT_TIMEOUTS 6
struct xlb_svc_cfg {
    __u8 hc_kind; /* xlb.types.v1.HealthCheckKind; 0: no health check */
    __u8 hc_rise;
    __u8 hc_fall;
    __u8 hc_req_len;
    __u8 hc_expect_len;
    __u8 hc_path_len;
    __u16 hc_port; /* host order; 0: the endpoint's port */
    __u16 hc_status;
    __u16 pad;
    __u32 hc_interval_ms;
    __u32 hc_timeout_ms;
    __u32 ct_timeouts[XLB_CT_TIMEOUTS]; /* seconds by state (ConntrackTimeouts' order); 0: default */
    __u8 hc_req[XLB_HC_PAYLOAD];
    __u8 hc_expect[XLB_HC_PAYLOAD];
    __u8 hc_path[XLB_HC_PAYLOAD];
    /* (each endpoint's priority group is its xlb_ep.prio) */
};

/* intf_map[ifindex]: per interface settings, written by dpd */
#define XLB_ZONE_LEN 32
struct xlb_intf {
    __u32 slot;    /* index of the interface's counters in intf_stats_map */
    __u8 policy;   /* XLB_POLICY_*: for packets no rule matches */
    __u8 pad[3];
    __u8 zone[XLB_ZONE_LEN];
};

/* ---- XDP stage (docs/xdp.md) -------------------------------------------------------
 * xdp_packet_func runs before TC on the interfaces it is attached to: it drops early
 * what comes from a blocked prefix (blk_v4_map, blk_v6_map: LPM tries keyed by the
 * source address) and passes everything else untouched to TC. Its counters share
 * stats_map and intf_stats_map with TC (indexes above the TC ones). */
#define XLB_STAT_XDP_PASS 30       /* XDP: passed on to TC untouched */
#define XLB_STAT_DROP_BLOCKLIST 31 /* XDP: dropped, the source is in the blocklist */

/* blk_v4_map / blk_v6_map keys (struct bpf_lpm_trie_key layout: prefixlen, then the
 * address in network byte order) */
struct xlb_blk_v4_key {
    __u32 prefixlen;
    __be32 addr;
};

struct xlb_blk_v6_key {
    __u32 prefixlen;
    __be32 addr[4];
};

struct xlb_blk_val {
    __u32 id; /* index into blk_stats_map: the prefix's own drop counter */
    __u32 pad;
};

/* ---- Mirroring (docs/xdp.md#mirroring) ------------------------------------------------
 * mirr_map[ifindex]: every packet arriving on the interface (past the XDP stage) is
 * copied by tc_mirror_func, as it arrived (before TC's NAT), out of the mirror interface
 * (bpf_clone_redirect). tc_mirror_func is its own TC filter, ahead of tc_packet_func,
 * on the mirrored interfaces only. */
#define XLB_STAT_MIRRORED 28    /* copies sent out of a mirror interface */
#define XLB_STAT_MIRROR_FAIL 29 /* copies the kernel refused (mirror interface down or gone) */

struct xlb_mirr {
    __u32 ifindex; /* the mirror interface: copies leave by it */
    __u32 pad;
    /* both interfaces by name as the API gave them (read back by ListMirrors) */
    __u8 name[XLB_IFNAME_LEN];
    __u8 mirror_name[XLB_IFNAME_LEN];
};


/* ---- Policers (docs/policers.md) ---------------------------------------------------------
 * polx_map[id]: a token bucket kept as GCRA (the generic cell rate algorithm, a token
 * bucket's exact equivalent in one word): tat is the time at which the bucket would be
 * full again. A packet of len bytes costs len * byte_ns_q16 >> 16 ns; it conforms when
 * max(tat, now) + cost - now <= burst_ns, and then moves tat there with one 64-bit
 * compare-and-swap (retried up to XLB_POLX_TRIES times when another CPU moved it first;
 * then dropped). Shared by all CPUs: a plain array value, no lock. polx_intf_map[ifindex]
 * names the policer of an interface's incoming packets (tc_police_func, a TC filter of
 * its own on the policed interfaces only). Counters: polx_stats_map[id * 2 + XLB_POLX_*]. */
#define XLB_STAT_DROP_POLICER 27 /* dropped: over its policer's rate */
#define XLB_POLX_TRIES 4
#define XLB_POLX_PASS 0
#define XLB_POLX_DROP 1
#define XLB_POLX_EVENT_NS 1000000000 /* at most one drop event per policer per second */

struct xlb_polx {
    __u64 tat;         /* ns (bpf_ktime_get_ns): when the bucket is full again */
    __u64 byte_ns_q16; /* ns per byte at the rate, << 16 (8e9 * 65536 / rate_bps) */
    __u64 burst_ns;    /* the burst as time at the rate: burst_bytes * ns per byte */
    __u64 event_ns;    /* no drop event before this time */
    /* dpd's record, as the API gave it (the datapath reads none of these) */
    __u64 rate_bps;
    __u64 burst_bytes;
    __u8 name[XLB_NAME_LEN];
};

/* ---- Events (docs/events.md) -------------------------------------------------------------
 * pkt_ring (BPF_MAP_TYPE_RINGBUF, XLB_RING_BYTES): records of struct xlb_event that dpd
 * reads, decodes and streams (WatchEvents). A record the ring has no room for is lost and
 * counted (event_lost). Kinds (values match the API's EventKind): */
#define XLB_EV_TRAP 1         /* a TRAP rule matched: data holds the packet's first bytes */
#define XLB_EV_FLOW_REFUSED 2 /* a new flow refused: its conntrack entries could not be
                               * written (id: the XLB_STAT_* counted: drop_ct_clash,
                               * drop_ct_insert, drop_snat_ports) */
#define XLB_EV_POLICER_DROP 3 /* a policer dropped (id: the policer), XLB_POLX_EVENT_NS apart */
#define XLB_TRAP_BYTES 128
#define XLB_STAT_TRAP 38      /* packets a TRAP rule sent to dpd */
#define XLB_STAT_EVENT_LOST 39 /* events the ring had no room for */

struct xlb_event {
    __u8 kind;      /* XLB_EV_* */
    __u8 pad;
    __u16 cap_len;  /* bytes of data used (TRAP: min(packet length, XLB_TRAP_BYTES)) */
    __u32 ifindex;  /* ingress interface */
    __u32 pkt_len;  /* the packet's whole length */
    __u32 id;       /* TRAP: the rule id; POLICER_DROP: the policer id; FLOW_REFUSED:
                     * XLB_STAT_* */
    __u64 time_ns;  /* bpf_ktime_get_ns() */
    __u8 data[XLB_TRAP_BYTES];
};

/* ---- IPv6 services (docs/ipv6.md) ------------------------------------------------------
 * nat_v6_map and ct_v6_map are the IPv6 twins of nat_v4_map and ct_v4_map. Selection is
 * IPv4's (lb.h xlb_select_idx) on the embedded struct xlb_nat_val `sel`: its endpoints
 * are runs of ep_map as IPv4's (port, weights, counter slot, flags; addr holds a 32-bit
 * fold of the address, its four words XORed), and ep6_map at the same index holds each
 * one's IPv6 address. The conntrack value embeds IPv4's (state machine, flags, ports,
 * counters as there) with the IPv6 rewrite addresses beside it. Only the fixed header is
 * parsed: a packet with an extension header passes untouched (counted). */
#define XLB_STAT_PASS_V6_EXT 36 /* passed untouched: IPv6 with an extension header */

struct xlb_nat6_key {
    __be32 vip[4];
    __be16 port;
    __u8 proto;
    __u8 pad;
};

struct xlb_nat6_val {
    struct xlb_nat_val sel; /* sel.snat_addr unused (0) */
    __be32 snat_addr[4];    /* as xlb_nat_val.snat_addr; all 0: the node's */
};

/* ep6_map[ep_base + i]: the address of endpoint i of an IPv6 service */
struct xlb_ep6 {
    __be32 addr[4];
};

struct xlb_ct6_key {
    __be32 saddr[4];
    __be32 daddr[4];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

struct xlb_ct6_val {
    struct xlb_ct_val c;  /* c.nat_addr, c.nat2_addr and c.svc unused (0) */
    __be32 nat_addr[4];   /* as xlb_ct_val.nat_addr */
    __be32 nat2_addr[4];  /* as xlb_ct_val.nat2_addr */
    struct xlb_nat6_key svc;
    __u32 pad;
};

/* scratch6_map[0] (per CPU): a new IPv6 flow's entry and keys, off the short stack */
struct xlb_scratch6 {
    struct xlb_ct6_val e;
    struct xlb_ct6_key k;
    struct xlb_ct6_key rk;
};

#endif
