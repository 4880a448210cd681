"""The ABI dpd computes from the C header matches what the kernel loaded: every map's
type and sizes, and every key/value struct's size and field offsets, checked against
the BTF of the loaded maps (as Cilium's alignchecker does)."""

from __future__ import annotations

import os

import pytest

from dpd import abi, bpfsys
from dpd.btf import Btf

pytestmark = pytest.mark.root


def _compare(layout: abi.Layout, btf_layout: dict[str, object], where: str) -> None:
    assert layout.size == btf_layout["size"], f"{where}: size"
    fields = btf_layout["fields"]
    assert isinstance(fields, dict)
    assert [f.name for f in layout.fields] == list(fields), f"{where}: field names/order"
    for f in layout.fields:
        offset, size, sub = fields[f.name]
        assert (f.offset, f.size) == (offset, size), f"{where}.{f.name}: offset/size"
        if f.struct is not None:
            assert sub is not None, f"{where}.{f.name}: BTF has no struct"
            _compare(f.struct, sub, f"{where}.{f.name}")


def test_every_map_matches_the_abi_layouts(loaded):
    dp = loaded.node.dp
    specs = dp.abi.map_specs(loaded.settings.macros())
    assert set(specs) == set(dp.maps)
    checked = 0
    for name, spec in specs.items():
        info = bpfsys.pinned_map_info(dp.pin(name))
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (
            spec.type, spec.key_size, spec.value_size, spec.max_entries), name
        if spec.key is None and spec.value is None:
            continue
        assert info.btf_id, f"{name} was loaded without BTF"
        btf = Btf(bpfsys.btf_raw(info.btf_id))
        for layout, tid in ((spec.key, info.btf_key_type_id),
                            (spec.value, info.btf_value_type_id)):
            if layout is not None:
                _compare(layout, btf.layout(tid), f"{name}:{layout.name}")
                checked += 1
    assert checked >= 5  # nat key+value, ct key+value, counters, cfg


def test_structs_have_no_implicit_padding():
    for name, layout in abi.load().structs.items():
        assert layout.holes() == [], f"struct {name} has implicit padding"


def test_pins_are_maps_and_programs_as_they_say(loaded):
    node = loaded.node
    kinds = node.pins()
    assert kinds["tc_packet_func"] == "prog" and kinds["tc_packet_func_slow"] == "prog"
    assert all(kinds[m] == "map" for m in node.dp.maps)
    assert {m.name for m in node.maps()} == set(node.dp.maps)  # GetNode lists maps only
    with pytest.raises(OSError, match="not a map"):
        bpfsys.pinned_map_info(os.path.join(loaded.settings.pin_dir, "tc_packet_func"))
