"""The ABI read from the C header (no root): constants, layouts, codecs, and the
numbers the API shares with the datapath."""

from __future__ import annotations

import pytest

from dpd import abi
from dpd.slots import SLOTS
from xlb.dpd.v1 import datapath_pb2
from xlb.types.v1 import types_pb2
from xlbcore.service import Algorithm, Mode

ABI = abi.load()


def test_layouts_are_what_the_programs_index():
    assert ABI.const("XLB_SLOTS") == SLOTS
    # 2-byte endpoint indexes (slot and Maglev tables) reach every endpoint
    assert ABI.structs["xlb_slots"].field("ep").elem_size == 2
    assert ABI.structs["xlb_slots"].field("ep").count == ABI.const("XLB_SLOT_CHUNK")
    assert ABI.structs["xlb_slots"].size == 8  # an array value's unit: no padding
    assert ABI.const("XLB_MAX_EPS") <= 1 << 16 and ABI.const("XLB_MAX_EPS") <= SLOTS
    assert ABI.structs["xlb_maglev"].field("ep").elem_size == 2
    assert ABI.structs["xlb_nat_val"].field("n_eps").size == 2
    assert ABI.structs["xlb_ct_val"].field("last_ns").offset % 8 == 0
    for name, layout in ABI.structs.items():
        assert layout.holes() == [], name


def test_constants_shared_with_the_api_have_the_api_numbers():
    for state in ("NEW", "REPLIED", "ESTABLISHED", "CLOSING", "CLOSED"):
        c = "EST" if state == "ESTABLISHED" else state
        assert ABI.const(f"XLB_CT_{c}") == datapath_pb2.ConntrackState.Value(
            f"CONNTRACK_STATE_{state}")
    assert ABI.const("XLB_DIR_ORIG") == datapath_pb2.DIRECTION_ORIGINAL
    assert ABI.const("XLB_DIR_REPLY") == datapath_pb2.DIRECTION_REPLY
    assert ABI.const("XLB_ALGO_RR") == types_pb2.ALGORITHM_ROUND_ROBIN == Algorithm.ROUND_ROBIN
    assert ABI.const("XLB_ALGO_HASH") == types_pb2.ALGORITHM_HASH == Algorithm.HASH
    for m in Mode:
        assert ABI.const(f"XLB_MODE_{m.name}") == types_pb2.Mode.Value(f"MODE_{m.name}") == m


def test_global_counter_names_come_from_the_header():
    names = ABI.stat_names()
    assert names[ABI.const("XLB_STAT_DROP_NO_ENDPOINT")] == "drop_no_endpoint"
    assert "max" not in names.values() and not any(n.startswith("unused") for n in names.values())
    assert max(names) < ABI.const("XLB_STAT_MAX")


def test_map_specs_take_sizes_from_settings_over_defaults():
    specs = ABI.map_specs({"XLB_CT_SIZE": 4096})
    assert specs["ct_v4_map"].max_entries == 4096
    assert specs["ct_v4_map"].type == "lru_hash"
    assert specs["nat_v4_map"].max_entries == ABI.defaults["XLB_MAX_SERVICES"]
    assert specs["svc_stats_map"].per_cpu and not specs["nat_v4_map"].per_cpu
    assert specs["pgm_tbl"].type == "prog_array"
    assert specs["nat_v4_map"].value is ABI.structs["xlb_nat_val"]


def test_codec_round_trips_by_field_name():
    codec = ABI.structs["xlb_ct_val"].codec
    raw = codec.pack(nat_addr=b"\xc6\x12\x01\x02", nat_port=8080, dir=2, state=3,
                     last_ns=123, svc={"vip": b"\xc6\x13\x00\x0a", "port": 80, "proto": 6})
    assert len(raw) == 56
    assert raw[4:6] == (8080).to_bytes(2, "big")  # __be16 written in network order
    back = codec.unpack(raw)
    assert back["nat_port"] == 8080 and back["state"] == 3 and back["last_ns"] == 123
    assert back["svc"] == {"vip": b"\xc6\x13\x00\x0a", "port": 80, "proto": 6, "range": 0}
    with pytest.raises(KeyError, match="no field bogus"):
        codec.pack(bogus=1)


def test_parser_refuses_what_it_does_not_understand():
    with pytest.raises(abi.AbiError, match="unknown type"):
        abi.Abi("struct s { float x; };")
    with pytest.raises(abi.AbiError, match="not an integer constant"):
        abi.Abi("#define X foo(1)\n")
    parsed = abi.Abi("#define N (2 << 2)\nstruct a { __u8 b; __u32 c[N]; };")
    layout = parsed.structs["a"]
    assert layout.size == 36 and layout.field("c").offset == 4
    assert layout.holes() == [(1, 3)]


def test_positional_packer_names_every_field_and_packs_as_pack_does():
    ep = ABI.structs["xlb_ep"].codec
    fast = ep.packer("addr", "port", "weight", "stat_id", "flags", "prio")
    assert fast(b"\xc6\x12\x01\x02", 8080, 3, 9, 1, 2) == ep.pack(
        addr=b"\xc6\x12\x01\x02", port=8080, weight=3, stat_id=9, flags=1, prio=2)
    with pytest.raises(KeyError, match="missing"):
        ep.packer("addr", "port", "weight")
    val = ABI.structs["xlb_nat_val"].codec
    fast_val = val.packer("svc_id", "algo", "mode", "flags", "n_eps", "n_slots", "persist_s",
                          "snat_addr", "ep_base", "slot_base")
    assert fast_val(1, 1, 2, 0, 1, 1, 30, b"\xc6\x12\x00\x01", 7, 9) == val.pack(
        svc_id=1, algo=1, mode=2, n_eps=1, n_slots=1, persist_s=30,
        snat_addr=b"\xc6\x12\x00\x01", ep_base=7, slot_base=9)


def test_numpy_dtype_has_the_layout_of_every_struct():
    import numpy as np

    for name, layout in ABI.structs.items():
        dt = layout.dtype
        assert dt.itemsize == layout.size, name
        for f in layout.fields:
            if not f.name.startswith("pad"):
                assert dt.fields[f.name][1] == f.offset, (name, f.name)
                assert dt[f.name].itemsize == f.size, (name, f.name)
    codec = ABI.structs["xlb_ct_val"].codec
    row = np.zeros(1, ABI.structs["xlb_ct_val"].dtype)
    row["nat_addr"] = np.frombuffer(b"\xc6\x12\x01\x02", ">u4")
    row["nat_port"], row["state"], row["last_ns"] = 8080, 3, 123
    row["svc"]["vip"] = np.frombuffer(b"\xc6\x13\x00\x0a", ">u4")
    row["svc"]["port"], row["svc"]["proto"] = 80, 6
    assert row.tobytes() == codec.pack(nat_addr=b"\xc6\x12\x01\x02", nat_port=8080, state=3,
                                       last_ns=123, svc={"vip": b"\xc6\x13\x00\x0a",
                                                         "port": 80, "proto": 6})
