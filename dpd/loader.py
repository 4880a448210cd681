"""Compile, load and pin the datapath; reopen what a previous dpd left pinned.

The bpf root is a bpffs mount (created if missing); each dpd instance pins under
<root>/<node-name>/: every map (BPF_TABLE_PINNED reuses existing pins, so services and
conntrack survive a restart), the prog array pgm_tbl (so tail calls keep working while
no dpd runs) and both programs.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dpd import abi, bpfsys

log = structlog.get_logger("dpd.loader")

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAMS = ("tc_packet_func", "tc_packet_func_slow")


class LoaderError(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    name: str
    bpf_root: str = "/opt/xlb/dp/bpf"
    max_services: int = 131072
    max_backends: int = 262144
    ct_size: int = 262144
    redirect: bool = True

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.bpf_root, self.name)


def _mounts() -> list[tuple[str, str]]:
    with open("/proc/self/mounts") as f:
        return [(parts[1], parts[2]) for parts in (line.split() for line in f)]


def is_bpffs(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mnt == real and fstype == "bpf" for mnt, fstype in _mounts())


def ensure_bpffs(root: str) -> None:
    if is_bpffs(root):
        return
    os.makedirs(root, exist_ok=True)
    res = subprocess.run(["mount", "-t", "bpf", "bpf", root], capture_output=True, text=True)
    if res.returncode != 0:
        raise LoaderError(f"cannot mount bpffs on {root}: {res.stderr.strip()}")
    log.info("bpffs_mounted", path=root)


def source_text() -> str:
    """bpf/xlb.c with every local #include inlined: bcc rewrites map calls
    (map.lookup(...)) only in the main text, not in included files."""
    seen: set[str] = set()

    def inline(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (BPF_DIR / name).read_text()
        return re.sub(r'#include "([\w.]+)"', lambda m: inline(m.group(1)), text)

    return inline("xlb.c")


def check_pins(settings: Settings) -> None:
    """Refuse to reuse pinned maps whose layout differs from this build's: bcc would
    silently reuse them and the programs would read garbage."""
    expected = abi.expected_maps(settings)
    for name, want in expected.items():
        path = os.path.join(settings.pin_dir, name)
        if not os.path.exists(path):
            continue
        got = bpfsys.pinned_map_info(path)
        if (got.type, got.key_size, got.value_size, got.max_entries) != want:
            raise LoaderError(
                f"pinned map {path} is {got.type} key={got.key_size} value={got.value_size} "
                f"max={got.max_entries}, this dpd needs {want}; run `xlb-dpd --cleanup` "
                "(drops services and conntrack) or start with the old settings"
            )


class Datapath:
    """The loaded programs and the bcc handle on the pinned maps."""

    def __init__(self, settings: Settings) -> None:
        from bcc import BPF  # imported here: the pure-Python parts of dpd need no bcc

        self.settings = settings
        ensure_bpffs(settings.bpf_root)
        os.makedirs(settings.pin_dir, exist_ok=True)
        check_pins(settings)
        reused = [n for n in abi.expected_maps(settings) if os.path.exists(self.pin(n))]
        self.reused_maps = reused
        cflags = [
            f'-DXLB_BPF_ROOT="{settings.pin_dir}"',
            f"-DXLB_MAX_SERVICES={settings.max_services}",
            f"-DXLB_MAX_BACKENDS={settings.max_backends}",
            f"-DXLB_CT_SIZE={settings.ct_size}",
        ]
        try:
            self.bpf = BPF(text=source_text(), cflags=cflags)
            self.fns = {p: self.bpf.load_func(p.encode(), BPF.SCHED_CLS) for p in PROGRAMS}
        except Exception as e:
            raise LoaderError(f"loading the datapath failed: {e}") from e
        self.tags = {p: bpfsys.prog_tag(fn.fd) for p, fn in self.fns.items()}
        self.previous_tags = self._pinned_tags()
        self.unchanged = self.previous_tags == self.tags
        self._pin_programs()
        pgm = self.bpf.get_table(b"pgm_tbl")
        pgm[ctypes.c_int(abi.PGM_SLOW)] = ctypes.c_int(self.fns["tc_packet_func_slow"].fd)
        cfg = self.table("cfg_map")
        cfg[cfg.Key(0)] = cfg.Leaf(abi.CFG_REDIRECT if settings.redirect else 0, 0)
        log.info(
            "datapath_loaded",
            pin_dir=settings.pin_dir,
            reused_maps=len(reused),
            programs_changed=not self.unchanged,
            tag=self.tags["tc_packet_func"],
        )

    def pin(self, name: str) -> str:
        return os.path.join(self.settings.pin_dir, name)

    def table(self, name: str) -> Any:
        return self.bpf.get_table(name.encode())

    @property
    def fast_fd(self) -> int:
        return int(self.fns["tc_packet_func"].fd)

    @property
    def slow_fd(self) -> int:
        return int(self.fns["tc_packet_func_slow"].fd)

    def _pinned_tags(self) -> dict[str, str]:
        tags = {}
        for p in PROGRAMS:
            path = self.pin(p)
            if os.path.exists(path):
                fd = bpfsys.obj_get(path)
                try:
                    tags[p] = bpfsys.prog_tag(fd)
                finally:
                    os.close(fd)
        return tags

    def _pin_programs(self) -> None:
        for p, fn in self.fns.items():
            path = self.pin(p)
            if os.path.exists(path):
                os.unlink(path)
            bpfsys.obj_pin(fn.fd, path)

    def close(self) -> None:
        """Release this process's fds; pins and attachments stay."""
        self.bpf.cleanup()


def remove_pins(settings: Settings) -> list[str]:
    """Delete every pin of this instance (maps and programs) and its directory."""
    removed: list[str] = []
    d = settings.pin_dir
    if not os.path.isdir(d):
        return removed
    for entry in sorted(os.listdir(d)):
        os.unlink(os.path.join(d, entry))
        removed.append(entry)
    os.rmdir(d)
    return removed


def unmount_if_empty(root: str) -> bool:
    """Unmount the bpffs root when no instance uses it any more."""
    if not is_bpffs(root):
        return False
    leftovers = [e for e in os.listdir(root) if e not in ("maps.debug", "progs.debug")]
    if leftovers:
        return False
    subprocess.run(["umount", root], check=False)
    return True
