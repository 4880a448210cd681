/* xlb datapath ABI: every map's key and value layout, shared by the eBPF programs
 * and dpd (dpd/abi.py mirrors these structs with ctypes; keep both in step).
 * Addresses and ports are in network byte order, everything else host order. */
#ifndef XLB_ABI_H
#define XLB_ABI_H

#define XLB_MAX_EPS 64    /* endpoints per service */
#define XLB_SLOTS 256     /* weighted selection slots per service */

/* pgm_tbl slots */
#define XLB_PGM_SLOW 1

/* conntrack direction */
#define XLB_DIR_ORIG 1   /* client -> VIP: destination is rewritten to the endpoint */
#define XLB_DIR_REPLY 2  /* endpoint -> client: source is rewritten to the VIP */

/* conntrack state (values match the API's ConntrackState) */
#define XLB_CT_NEW 1
#define XLB_CT_REPLIED 2
#define XLB_CT_EST 3
#define XLB_CT_CLOSING 4
#define XLB_CT_CLOSED 5

/* ct flags */
#define XLB_CTF_FIN_ORIG 1
#define XLB_CTF_FIN_REPLY 2

/* algorithms (values match the API's Algorithm) */
#define XLB_ALGO_RR 1
#define XLB_ALGO_HASH 2

/* xlb_cfg.flags */
#define XLB_CFG_REDIRECT 1  /* forward NATed packets with bpf_redirect after a FIB lookup */

/* global counters (index into stats_map) */
#define XLB_STAT_PASS 0          /* not ours: handed to the kernel untouched */
#define XLB_STAT_FAST 1          /* unused: fast path = packets - slow path */
#define XLB_STAT_SLOW 2          /* packets that took the tail call */
#define XLB_STAT_NEW_FLOW 3      /* conntrack entries created */
#define XLB_STAT_NO_EP 4         /* dropped: service has no endpoint with weight > 0 */
#define XLB_STAT_REDIRECT 5      /* forwarded with bpf_redirect / bpf_redirect_neigh */
#define XLB_STAT_STACK 6         /* NATed, then handed to the kernel to route */
#define XLB_STAT_TAILCALL_FAIL 7 /* pgm_tbl slot empty: packet passed */
#define XLB_STAT_CT_INSERT_FAIL 8
#define XLB_STAT_MAX 16

struct xlb_nat_key {
    __be32 vip;
    __be16 port;
    __u8 proto;
    __u8 pad;
};

struct xlb_ep {
    __be32 addr;
    __be16 port;
    __u16 weight;
    __u32 stat_id; /* index into ep_stats_map */
};

struct xlb_nat_val {
    __u32 svc_id; /* index into svc_stats_map and rr_map */
    __u8 algo;
    __u8 mode;
    __u8 n_eps;
    __u8 flags;
    __u16 n_slots; /* 0: no endpoint takes new flows */
    __u16 pad;
    __u32 pad2;
    struct xlb_ep eps[XLB_MAX_EPS];
    __u8 slots[XLB_SLOTS]; /* slot -> index into eps */
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
    __u32 flags;
    __u64 last_ns; /* bpf_ktime_get_ns() of the last packet */
    struct xlb_nat_key svc;
};

struct xlb_counter {
    __u64 packets;
    __u64 bytes;
};

struct xlb_cfg {
    __u32 flags;
    __u32 pad;
};

#endif
