"""Loading: a restart with unchanged programs reuses the pins without compiling; a
changed build is compiled and installed; pins of another layout are refused."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from dpd import abi, bpfsys
from dpd.loader import KernelDatapath, LoaderError, Settings
from dpd.node import cleanup

pytestmark = pytest.mark.root


@pytest.fixture
def settings() -> Iterator[Settings]:
    root = tempfile.mkdtemp(prefix="xlb-ld-")
    s = Settings(name="ldtest", bpf_root=root, max_services=16, max_backends=64,
                 ct_size=1024, redirect=False)
    try:
        yield s
    finally:
        cleanup(s)
        os.rmdir(root)


def test_restart_with_unchanged_programs_reuses_them_without_compiling(settings):
    first = KernelDatapath(settings)
    try:
        assert first.programs_changed
        tags, ids = first.tags, bpfsys.prog_id(first.fast_fd)
    finally:
        first.close()
    second = KernelDatapath(settings)
    try:
        assert not second.programs_changed
        assert second.tags == tags
        assert bpfsys.prog_id(second.fast_fd) == ids  # the very program that was pinned
        assert not any(e.endswith("_new") for e in os.listdir(settings.pin_dir))
    finally:
        second.close()


def test_a_different_build_is_compiled_and_replaces_the_pins(settings):
    first = KernelDatapath(settings)
    try:
        old_id = bpfsys.prog_id(first.fast_fd)
        cfg = first.maps["cfg_map"]
        codec = first.abi.structs["xlb_cfg"].codec
        cfg.put(bytes(4), codec.pack(flags=0, build_id=b"\1" * 32))  # as an older build
    finally:
        first.close()
    second = KernelDatapath(settings)
    try:
        assert second.programs_changed
        assert bpfsys.prog_id(second.fast_fd) != old_id
        pinned = bpfsys.obj_get(second.pin("tc_packet_func"))
        try:
            assert bpfsys.prog_id(pinned) == bpfsys.prog_id(second.fast_fd)
        finally:
            os.close(pinned)
        slot = second.maps["pgm_tbl"].get((1).to_bytes(4, "little"))
        assert slot is not None
        assert int.from_bytes(slot, "little") == bpfsys.prog_id(second.slow_fd)
    finally:
        second.close()


def test_pins_of_another_layout_are_refused_with_what_to_do(settings):
    os.makedirs(settings.bpf_root, exist_ok=True)
    from dpd.loader import ensure_bpffs

    ensure_bpffs(settings.bpf_root)
    os.makedirs(settings.pin_dir, exist_ok=True)
    subprocess.run(["bpftool", "map", "create", os.path.join(settings.pin_dir, "ct_v4_map"),
                    "type", "lru_hash", "key", "16", "value", "32", "entries", "1024",
                    "name", "ct_v4_map"], check=True)
    ct_val = abi.load().structs["xlb_ct_val"].size  # the layout this build needs
    with pytest.raises(LoaderError,
                       match=rf"value=32.*needs lru_hash key=16 value={ct_val}.*--cleanup"):
        KernelDatapath(settings)
    assert os.listdir(settings.pin_dir) == ["ct_v4_map"]  # nothing else was created
