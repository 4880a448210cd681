"""Load the datapath: reuse what a previous dpd left pinned, compile only what changed.

The bpf root is a bpffs mount (created if missing); each dpd instance pins under
<root>/<node-name>/: every map (services and conntrack outlive dpd), the prog array
pgm_tbl (tail calls keep working while no dpd runs) and both programs.

Start-up, in order:

1. Parse the ABI (dpd/abi.py) and check every existing map pin against it: a map of
   another type or layout (an older xlb) is refused with a clear error, never reused.
2. The build id is the SHA-256 of the program source and compile flags. When every
   pin exists and cfg_map holds the same build id, the pinned programs are what this
   dpd would compile: they are reused as they are, and nothing is compiled (a restart
   serves within a second, and costs no CPU that traffic needs).
3. Otherwise a child process (``python -m dpd.compile``, at low CPU priority) compiles
   with bcc and LLVM, creates missing maps and pins the new programs under staging
   names; this process never loads LLVM. The old programs keep handling traffic
   meanwhile. Then the new slow path goes into pgm_tbl, the caller moves attachments to
   the new fast path (an atomic replace), the staged pins replace the old ones and
   cfg_map records the build id.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from dpd import abi as abi_mod
from dpd import bpfsys
from dpd.abi import BPF_DIR, Abi, MapSpec
from dpd.maps import KernelMap, Map
from dpd.routes import RTPROT_XLB
from xlbcore.errors import PreconditionError

log = structlog.get_logger("dpd.loader")

PROGRAMS = ("tc_packet_func", "tc_packet_func_slow", "xdp_packet_func", "tc_mirror_func",
            "tc_police_func", "tc_packet_func_slow6")
# programs of another type than TC (sched_cls): bcc's program type names
PROGRAM_TYPES = {"xdp_packet_func": "XDP"}
# Suffix of the program pins a compile made and dpd has not installed yet (bpffs
# refuses names with a dot).
STAGED = "_new"
COMPILE_TIMEOUT = 300.0


class LoaderError(PreconditionError):
    """The datapath cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    name: str
    bpf_root: str = "/opt/xlb/dp/bpf"
    max_services: int = 131072
    max_backends: int = 262144
    ct_size: int = 262144
    redirect: bool = True
    blocklist_size: int = 16384  # blocked prefixes, v4 and v6 together (the XDP stage)
    route_proto: int = RTPROT_XLB  # the protocol id of the routes dpd installs

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.bpf_root, self.name)

    def macros(self) -> dict[str, int]:
        """Map sizes as the -D macros maps.h reads."""
        return {
            "XLB_MAX_SERVICES": self.max_services,
            "XLB_MAX_BACKENDS": self.max_backends,
            "XLB_CT_SIZE": self.ct_size,
            "XLB_BLOCKLIST_SIZE": self.blocklist_size,
        }

    def cflags(self) -> list[str]:
        return [f'-DXLB_BPF_ROOT="{self.pin_dir}"',
                *(f"-D{k}={v}" for k, v in self.macros().items())]


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
    """dpd/bpf/xlb.c with every local #include inlined once: bcc rewrites map calls
    (map.lookup(...)) only in the main text, not in included files."""
    seen: set[str] = set()

    def inline(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (BPF_DIR / name).read_text()
        return re.sub(r'#include "([\w.]+)"', lambda m: inline(m.group(1)), text)

    return inline("xlb.c")


def build_id(settings: Settings) -> bytes:
    h = hashlib.sha256(source_text().encode())
    for flag in settings.cflags():
        h.update(b"\0" + flag.encode())
    return h.digest()


def check_pins(specs: dict[str, MapSpec], pin_dir: str) -> list[str]:
    """Refuse pinned maps whose type or layout differs from this build's (bcc would
    silently reuse them and the programs would read garbage). Returns the names of
    the maps that exist."""
    existing = []
    for name, want in specs.items():
        path = os.path.join(pin_dir, name)
        if not os.path.exists(path):
            continue
        try:
            got = bpfsys.pinned_map_info(path)
        except OSError as e:
            raise LoaderError(f"pin {path} cannot be used: {e.strerror}; run "
                              "`xlb-dpd --name NAME --cleanup` to remove it") from None
        have = (got.type, got.key_size, got.value_size, got.max_entries)
        need = (want.type, want.key_size, want.value_size, want.max_entries)
        if have != need:
            raise LoaderError(
                f"pinned map {path} is {got.type} key={got.key_size} value={got.value_size} "
                f"max={got.max_entries}, this dpd needs {want.type} key={want.key_size} "
                f"value={want.value_size} max={want.max_entries} (left by another xlb "
                "version or other map sizes): start with the settings it was made with, "
                "or run `xlb-dpd --name NAME --cleanup` (drops services and conntrack)"
            )
        existing.append(name)
    return existing


def compile_programs(settings: Settings, should_stop: Callable[[], bool] = lambda: False
                     ) -> None:
    """Compile in a child process that pins the programs as NAME_new (and creates any
    missing map). Raises LoaderError with the compiler's message on failure."""
    cmd = [sys.executable, "-m", "dpd.compile", "--pin-dir", settings.pin_dir,
           "--suffix", STAGED, "--", *settings.cflags()]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if should_stop():
                    raise LoaderError("start-up cancelled while compiling") from None
                if time.monotonic() - started > COMPILE_TIMEOUT:
                    raise LoaderError(f"compiling took over {COMPILE_TIMEOUT:g} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise LoaderError(f"compiling the datapath failed (exit {proc.returncode}): {tail}")
    log.info("datapath_compiled", seconds=round(time.monotonic() - started, 2))


class Datapath:
    """What dpd's tables use: the ABI, the maps (by name) and, for a kernel datapath,
    the programs. ``reused``: the maps existed before (their counters may hold counts
    of ids freed earlier)."""

    kind = "abstract"

    def __init__(self, settings: Settings, abi: Abi, maps: dict[str, Map], reused: bool,
                 datapath_id: str) -> None:
        self.settings = settings
        self.abi = abi
        self.maps = maps
        self.reused = reused
        self.datapath_id = datapath_id
        self.tags: dict[str, str] = {}
        self.programs_changed = False

    def pin(self, name: str) -> str:
        return os.path.join(self.settings.pin_dir, name)

    @property
    def fast_fd(self) -> int:
        raise PreconditionError("this node has no kernel datapath (programs not loaded)")

    @property
    def slow_fd(self) -> int:
        raise PreconditionError("this node has no kernel datapath (programs not loaded)")

    @property
    def xdp_fd(self) -> int:
        raise PreconditionError("this node has no kernel datapath (programs not loaded)")

    @property
    def mirror_fd(self) -> int:
        raise PreconditionError("this node has no kernel datapath (programs not loaded)")

    @property
    def police_fd(self) -> int:
        raise PreconditionError("this node has no kernel datapath (programs not loaded)")

    def close(self) -> None:
        pass


class KernelDatapath(Datapath):
    kind = "kernel"

    def __init__(self, settings: Settings,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        abi = abi_mod.load()
        specs = abi.map_specs(settings.macros())
        ensure_bpffs(settings.bpf_root)
        os.makedirs(settings.pin_dir, exist_ok=True)
        existing = check_pins(specs, settings.pin_dir)
        self._fds: list[int] = []
        want = build_id(settings)
        reuse = len(existing) == len(specs) and all(
            os.path.exists(os.path.join(settings.pin_dir, p)) for p in PROGRAMS
        ) and self._pinned_build(settings, specs["cfg_map"]) == want
        if not reuse:
            compile_programs(settings, should_stop)
            check_pins(specs, settings.pin_dir)  # the child made the missing maps
        ncpus = bpfsys.possible_cpus()
        maps: dict[str, Map] = {}
        try:
            for name, spec in specs.items():
                fd = bpfsys.obj_get(os.path.join(settings.pin_dir, name))
                self._fds.append(fd)
                maps[name] = KernelMap(fd, spec, ncpus)
            datapath_id = str(bpfsys.map_info(maps["nat_v4_map"].fd).id)  # type: ignore[attr-defined]
            super().__init__(settings, abi, maps, bool(existing), datapath_id)
            self.progs = self._open_programs(staged=not reuse)
        except BaseException:
            for fd in self._fds:
                os.close(fd)
            raise
        self.tags = {p: bpfsys.prog_tag(fd) for p, fd in self.progs.items()}
        self.programs_changed = not reuse
        self.build_id = want
        self._install_slow_path()
        if not reuse:
            self._replace_program_pins()
        self._write_cfg()
        log.info("datapath_loaded", pin_dir=settings.pin_dir, reused_maps=len(existing),
                 compiled=not reuse, tag=self.tags["tc_packet_func"])

    @staticmethod
    def _pinned_build(settings: Settings, spec: MapSpec) -> bytes | None:
        path = os.path.join(settings.pin_dir, "cfg_map")
        if not os.path.exists(path):
            return None
        fd = bpfsys.obj_get(path)
        try:
            raw = bpfsys.lookup(fd, bytes(4), spec.value_size)
        finally:
            os.close(fd)
        if raw is None or spec.value is None:
            return None
        return bytes(spec.value.codec.unpack(raw)["build_id"])

    def _open_programs(self, staged: bool) -> dict[str, int]:
        out = {}
        for p in PROGRAMS:
            fd = bpfsys.obj_get(self.pin(p + (STAGED if staged else "")))
            self._fds.append(fd)
            out[p] = fd
        return out

    def _install_slow_path(self) -> None:
        """Point pgm_tbl's slow-path slots (IPv4's, IPv6's) at our slow programs (where
        they do not already)."""
        pgm = self.maps["pgm_tbl"]
        for slot, prog in (("XLB_PGM_SLOW", "tc_packet_func_slow"),
                           ("XLB_PGM_SLOW6", "tc_packet_func_slow6")):
            key = self.abi.const(slot).to_bytes(4, "little")
            slow = self.progs[prog]
            current = pgm.get(key)
            if current is None or int.from_bytes(current, "little") != bpfsys.prog_id(slow):
                pgm.put(key, slow.to_bytes(4, "little"))

    def _replace_program_pins(self) -> None:
        for p, fd in self.progs.items():
            final = self.pin(p)
            if os.path.exists(final):
                os.unlink(final)
            bpfsys.obj_pin(fd, final)
            os.unlink(self.pin(p + STAGED))

    def _write_cfg(self) -> None:
        cfg = self.maps["cfg_map"]
        layout = self.abi.structs["xlb_cfg"]
        flags = self.abi.const("XLB_CFG_REDIRECT") if self.settings.redirect else 0
        cfg.put(bytes(4), layout.codec.pack(flags=flags, build_id=self.build_id))

    @property
    def fast_fd(self) -> int:
        return self.progs["tc_packet_func"]

    @property
    def slow_fd(self) -> int:
        return self.progs["tc_packet_func_slow"]

    @property
    def xdp_fd(self) -> int:
        return self.progs["xdp_packet_func"]

    @property
    def mirror_fd(self) -> int:
        return self.progs["tc_mirror_func"]

    @property
    def police_fd(self) -> int:
        return self.progs["tc_police_func"]

    def close(self) -> None:
        """Release this process's fds; pins and attachments stay."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


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
