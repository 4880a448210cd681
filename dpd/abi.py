"""Constants and map layouts of the datapath ABI (bpf/xlb_abi.h, bpf/maps.h).

The eBPF side is the source of truth; tests/datapath checks that the sizes here match
what bcc built, and dpd checks pinned maps against them before reusing them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpd.loader import Settings

MAX_EPS = 64
SLOTS = 256
PGM_SLOW = 1

DIR_ORIG = 1
DIR_REPLY = 2

CT_NEW = 1
CT_REPLIED = 2
CT_EST = 3
CT_CLOSING = 4
CT_CLOSED = 5

ALGO_RR = 1
ALGO_HASH = 2

CFG_REDIRECT = 1

STAT_NAMES = (
    "pass",
    "unused_1",
    "slow_path",
    "new_flow",
    "drop_no_endpoint",
    "redirect",
    "to_stack",
    "tailcall_fail",
    "drop_ct_insert",
)
STAT_MAX = 16

NAT_KEY_SIZE = 8
NAT_VAL_SIZE = 16 + MAX_EPS * 12 + SLOTS
CT_KEY_SIZE = 16
CT_VAL_SIZE = 40
COUNTER_SIZE = 16


def expected_maps(s: Settings) -> dict[str, tuple[str, int, int, int]]:
    """map name -> (type, key size, value size, max entries)."""
    return {
        "pgm_tbl": ("prog_array", 4, 4, 8),
        "nat_v4_map": ("hash", NAT_KEY_SIZE, NAT_VAL_SIZE, s.max_services),
        "ct_v4_map": ("lru_hash", CT_KEY_SIZE, CT_VAL_SIZE, s.ct_size),
        "rr_map": ("array", 4, 4, s.max_services),
        "svc_stats_map": ("percpu_array", 4, COUNTER_SIZE, s.max_services),
        "ep_stats_map": ("percpu_array", 4, COUNTER_SIZE, s.max_backends),
        "stats_map": ("percpu_array", 4, COUNTER_SIZE, STAT_MAX),
        "cfg_map": ("array", 4, 8, 1),
    }
