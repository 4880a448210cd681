/* Every map of the datapath, pinned by name under XLB_BPF_ROOT (a bpffs mount).
 * BPF_TABLE_PINNED reuses a pinned map when it exists, so a restarted dpd keeps
 * services and conntrack. Sizes are settings passed by dpd as -D macros. */
#ifndef XLB_MAPS_H
#define XLB_MAPS_H

#include <uapi/linux/bpf.h>

#include "xlb_abi.h"

#ifndef XLB_BPF_ROOT
#error "XLB_BPF_ROOT must be defined by the loader"
#endif
#ifndef XLB_MAX_SERVICES
#define XLB_MAX_SERVICES 131072
#endif
#ifndef XLB_MAX_BACKENDS
#define XLB_MAX_BACKENDS 262144
#endif
#ifndef XLB_CT_SIZE
#define XLB_CT_SIZE 262144
#endif

#ifndef XLB_FRAG_SIZE
#define XLB_FRAG_SIZE 8192
#endif

#ifndef XLB_MAGLEV_TABLES
#define XLB_MAGLEV_TABLES 65536
#endif

#ifndef XLB_ACL_RULES
#define XLB_ACL_RULES 16384
#endif
#ifndef XLB_ACL_SIZE
#define XLB_ACL_SIZE 131072 /* classifier entries, both generations */
#endif
#ifndef XLB_MAX_INTF
#define XLB_MAX_INTF 256 /* interfaces with counters; slot 0: any other */
#endif

#define XLB_PIN(name) XLB_BPF_ROOT "/" #name

BPF_TABLE_PINNED("prog", int, int, pgm_tbl, 8, XLB_PIN(pgm_tbl));
BPF_TABLE_PINNED("hash", struct xlb_nat_key, struct xlb_nat_val, nat_v4_map,
                 XLB_MAX_SERVICES, XLB_PIN(nat_v4_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct xlb_ct_key, struct xlb_ct_val, ct_v4_map,
                 XLB_CT_SIZE, XLB_PIN(ct_v4_map));
/* IPv6 services and their conntrack (svc6.h): service ids and endpoint runs and counter
 * slots are shared with IPv4's (one id space: svc_stats_map, ep_map, ep_stats_map, ...). */
BPF_TABLE_PINNED("hash", struct xlb_nat6_key, struct xlb_nat6_val, nat_v6_map,
                 XLB_MAX_SERVICES, XLB_PIN(nat_v6_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct xlb_ct6_key, struct xlb_ct6_val, ct_v6_map,
                 XLB_CT_SIZE, XLB_PIN(ct_v6_map));
/* per-CPU room for a new IPv6 flow's conntrack value and keys (the IPv6 slow path's
 * stack is short of them) */
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_scratch6, scratch6_map, 1,
                 XLB_PIN(scratch6_map));
BPF_TABLE_PINNED("lru_hash", struct xlb_frag_key, struct xlb_frag_val, frag_v4_map,
                 XLB_FRAG_SIZE, XLB_PIN(frag_v4_map));
#ifndef XLB_RANGE_SIZE
#define XLB_RANGE_SIZE 16384 /* port prefixes of all port-range and any-port services */
#endif
/* (vip, proto, port prefix) -> the port-range or any-port service holding it */
BPF_TABLE_PINNED("lpm_trie", struct xlb_range_key, struct xlb_range_val, range_v4_map,
                 XLB_RANGE_SIZE, XLB_PIN(range_v4_map), BPF_F_NO_PREALLOC);
/* VIP -> how many services it carries: the datapath answers ICMP echo to a VIP. */
BPF_TABLE_PINNED("hash", __be32, u32, vip_v4_map, XLB_MAX_SERVICES, XLB_PIN(vip_v4_map),
                 BPF_F_NO_PREALLOC);
/* IPv6 VIP (struct xlb_ep6: the address alone) -> how many services it carries: the
 * datapath answers ICMPv6 echo to a VIP. */
BPF_TABLE_PINNED("hash", struct xlb_ep6, u32, vip_v6_map, XLB_MAX_SERVICES, XLB_PIN(vip_v6_map),
                 BPF_F_NO_PREALLOC);
/* svc_id * 2 + (XLB_SVC_MAGLEV_B of the service's flags) -> its Maglev table: two
 * per service while dpd replaces one (make-before-break), one otherwise. */
BPF_TABLE_PINNED("hash", u32, struct xlb_maglev, maglev_v4_map, XLB_MAGLEV_TABLES,
                 XLB_PIN(maglev_v4_map), BPF_F_NO_PREALLOC);
/* svc_id -> dpd's record of the service's health check and conntrack timeouts. */
BPF_TABLE_PINNED("hash", u32, struct xlb_svc_cfg, svc_cfg_map, XLB_MAX_SERVICES,
                 XLB_PIN(svc_cfg_map), BPF_F_NO_PREALLOC);
#ifndef XLB_PERSIST_SIZE
#define XLB_PERSIST_SIZE 65536 /* clients remembered by session persistence (LRU) */
#endif
/* (svc_id, client address) -> the client's endpoint (session persistence). */
BPF_TABLE_PINNED("lru_hash", struct xlb_persist_key, struct xlb_persist_val, persist_v4_map,
                 XLB_PERSIST_SIZE, XLB_PIN(persist_v4_map));
/* Services' endpoints and slot tables (struct xlb_ep, xlb_slots): each service holds a
 * run of consecutive entries of each (xlb_nat_val.ep_base, slot_base), allocated by dpd
 * (dpd/extents.py); a changed set goes to fresh runs before its service points at them.
 * XLB_EP_TABLE entries, XLB_SLOT_TABLE chunks of XLB_SLOT_CHUNK slots (both default to
 * XLB_MAX_BACKENDS); while a service is replaced its old runs and new ones coexist. */
#ifndef XLB_EP_TABLE
#define XLB_EP_TABLE XLB_MAX_BACKENDS
#endif
#ifndef XLB_SLOT_TABLE
#define XLB_SLOT_TABLE XLB_MAX_BACKENDS
#endif
BPF_TABLE_PINNED("array", u32, struct xlb_ep, ep_map, XLB_EP_TABLE, XLB_PIN(ep_map));
/* ep_map's index -> the IPv6 address of an IPv6 service's endpoint there */
BPF_TABLE_PINNED("array", u32, struct xlb_ep6, ep6_map, XLB_EP_TABLE, XLB_PIN(ep6_map));
BPF_TABLE_PINNED("array", u32, struct xlb_slots, slot_map, XLB_SLOT_TABLE, XLB_PIN(slot_map));
/* stat_id -> the endpoint's active flows (least connections): the datapath adds one per
 * flow it opens, dpd's conntrack sweep sets it to the live count (dpd/conntrack.py). */
BPF_TABLE_PINNED("array", u32, u32, ep_conn_map, XLB_MAX_BACKENDS, XLB_PIN(ep_conn_map));
/* Shared, not per CPU: round-robin is exact across CPUs (only new flows touch it). */
BPF_TABLE_PINNED("array", u32, u32, rr_map, XLB_MAX_SERVICES, XLB_PIN(rr_map));
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, svc_stats_map, XLB_MAX_SERVICES,
                 XLB_PIN(svc_stats_map));
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, ep_stats_map, XLB_MAX_BACKENDS,
                 XLB_PIN(ep_stats_map));
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, stats_map, XLB_STAT_MAX,
                 XLB_PIN(stats_map));
BPF_TABLE_PINNED("array", u32, struct xlb_cfg, cfg_map, 1, XLB_PIN(cfg_map));

/* Firewall: the classifier (both generations), its tuples, which one is live, the
 * node's record of the rules and per-rule counters. */
BPF_TABLE_PINNED("hash", struct xlb_acl_key, struct xlb_acl_val, acl_map, XLB_ACL_SIZE,
                 XLB_PIN(acl_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct xlb_acl_tuple, acl_tuple_map, XLB_ACL_TUPLES * 2,
                 XLB_PIN(acl_tuple_map));
BPF_TABLE_PINNED("array", u32, struct xlb_acl_cfg, acl_cfg_map, 1, XLB_PIN(acl_cfg_map));
BPF_TABLE_PINNED("hash", u32, struct xlb_acl_rule, acl_rules_map, XLB_ACL_RULES,
                 XLB_PIN(acl_rules_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, acl_stats_map, XLB_ACL_RULES,
                 XLB_PIN(acl_stats_map));
/* Interfaces: settings by ifindex; drops by reason per interface slot
 * (intf_stats_map[slot * XLB_STAT_MAX + XLB_STAT_*]). */
BPF_TABLE_PINNED("hash", u32, struct xlb_intf, intf_map, XLB_MAX_INTF, XLB_PIN(intf_map));
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, intf_stats_map,
                 XLB_MAX_INTF * XLB_STAT_MAX, XLB_PIN(intf_stats_map));

/* XDP stage: the blocklist (LPM tries by source address; prefixes across both share
 * XLB_BLOCKLIST_SIZE ids) and each prefix's drop counter. */
#ifndef XLB_BLOCKLIST_SIZE
#define XLB_BLOCKLIST_SIZE 16384
#endif
BPF_TABLE_PINNED("lpm_trie", struct xlb_blk_v4_key, struct xlb_blk_val, blk_v4_map,
                 XLB_BLOCKLIST_SIZE, XLB_PIN(blk_v4_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct xlb_blk_v6_key, struct xlb_blk_val, blk_v6_map,
                 XLB_BLOCKLIST_SIZE, XLB_PIN(blk_v6_map), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, blk_stats_map,
                 XLB_BLOCKLIST_SIZE, XLB_PIN(blk_stats_map));

/* Mirroring: mirrored interface (ifindex) -> where copies go; copies per mirror. */
BPF_TABLE_PINNED("hash", u32, struct xlb_mirr, mirr_map, XLB_MAX_INTF, XLB_PIN(mirr_map));
BPF_TABLE_PINNED("percpu_hash", u32, struct xlb_counter, mirr_stats_map, XLB_MAX_INTF,
                 XLB_PIN(mirr_stats_map));

/* Policers: the buckets (shared, updated with compare-and-swap), the policed interfaces
 * (ifindex -> policer id) and per policer counters (id * 2 + XLB_POLX_PASS|DROP). */
#ifndef XLB_MAX_POLICERS
#define XLB_MAX_POLICERS 1024
#endif
BPF_TABLE_PINNED("array", u32, struct xlb_polx, polx_map, XLB_MAX_POLICERS, XLB_PIN(polx_map));
BPF_TABLE_PINNED("hash", u32, u32, polx_intf_map, XLB_MAX_INTF, XLB_PIN(polx_intf_map));
BPF_TABLE_PINNED("percpu_array", u32, struct xlb_counter, polx_stats_map,
                 XLB_MAX_POLICERS * 2, XLB_PIN(polx_stats_map));

/* Events: a ring buffer dpd reads (pinned: the programs and every dpd share it). bcc has
 * no pinned form of BPF_RINGBUF_OUTPUT: this is its table type with the pinned section. */
#ifndef XLB_RING_BYTES
#define XLB_RING_BYTES (1 << 20)
#endif
struct pkt_ring_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" XLB_PIN(pkt_ring))))
struct pkt_ring_table_t pkt_ring = {.max_entries = XLB_RING_BYTES};

#endif
