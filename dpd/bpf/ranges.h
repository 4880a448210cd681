/* Port-range and any-port services (docs/services.md): when no exact-port service holds
 * a new flow's (vip, port, proto), range_v4_map (an LPM trie of port prefixes) names the
 * range, else the any-port service of the (vip, proto), that holds the port; its
 * nat_v4_map entry is keyed by (vip, first port, proto, range 1). Two lookups, on a miss
 * of the exact-port lookup only: established flows are found in conntrack, new flows to
 * exact-port services never come here. */
#ifndef XLB_RANGES_H
#define XLB_RANGES_H

#include "maps.h"

/* The range service of `nk` (vip, port, proto, range 0); on a match `nk` becomes its
 * nat_v4_map key. NULL: none. */
static __always_inline struct xlb_nat_val *xlb_svc_range(struct xlb_nat_key *nk)
{
    struct xlb_range_key rk = {};
    rk.prefixlen = XLB_RANGE_BASE_BITS + 16;
    rk.vip = nk->vip;
    rk.proto = nk->proto;
    rk.port = nk->port;
    struct xlb_range_val *r = range_v4_map.lookup(&rk);
    if (!r)
        return NULL;
    nk->port = r->first;
    nk->range = 1;
    return nat_v4_map.lookup(nk);
}

#endif
