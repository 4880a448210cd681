"""Thin ctypes layer over libbpf.so.1: map element and batch operations, pins, object
info (map layouts, program tags, BTF) and BPF_PROG_TEST_RUN. dpd's daemon process uses
this alone; bcc (and LLVM) load only in the child process that compiles the programs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

_lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

MAP_TYPES = {
    1: "hash",
    2: "array",
    3: "prog_array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    10: "lru_percpu_hash",
    11: "lpm_trie",
}


class BpfError(OSError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


class _MapInfo(ctypes.Structure):  # struct bpf_map_info (uapi/linux/bpf.h)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 128),
    ]


class _BtfInfo(ctypes.Structure):  # struct bpf_btf_info
    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("name", ctypes.c_uint64),
        ("name_len", ctypes.c_uint32),
        ("kernel_btf", ctypes.c_uint32),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("_rest", ctypes.c_uint8 * 512),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
_lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
]
_lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
_lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    btf_id: int = 0
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0


def obj_get(path: str) -> int:
    """Open a pinned object; the caller closes the fd."""
    return _check(_lib.bpf_obj_get(path.encode()), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(
        info.id,
        MAP_TYPES.get(info.type, str(info.type)),
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.name.decode(errors="replace"),
        info.btf_id,
        info.btf_key_type_id,
        info.btf_value_type_id,
    )


def pinned_map_info(path: str) -> MapInfo:
    fd = obj_get(path)
    try:
        if object_kind(fd) != "map":
            raise BpfError(errno.EINVAL, f"{path} is a {object_kind(fd)}, not a map")
        return map_info(fd)
    finally:
        os.close(fd)


def object_kind(fd: int) -> str:
    """What a bpf fd refers to: "map", "prog", "link", "btf" (from its anon inode name;
    the info call alone cannot tell, it fills whatever struct it is handed)."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    kind = target.removeprefix("anon_inode:bpf").lstrip("-_")
    return kind or target


def pinned_kind(path: str) -> str:
    fd = obj_get(path)
    try:
        return object_kind(fd)
    finally:
        os.close(fd)


_lib.bpf_btf_get_fd_by_id.argtypes = [ctypes.c_uint32]


def btf_raw(btf_id: int) -> bytes:
    """The raw BTF blob (header, types, strings) of a loaded BTF object."""
    fd = _check(_lib.bpf_btf_get_fd_by_id(btf_id), f"open BTF {btf_id}")
    try:
        info = _BtfInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               "BTF info")
        buf = ctypes.create_string_buffer(info.btf_size)
        info2 = _BtfInfo(btf=ctypes.addressof(buf), btf_size=info.btf_size)
        size = ctypes.c_uint32(ctypes.sizeof(info2))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info2), ctypes.byref(size)),
               "BTF info")
        return buf.raw[: info2.btf_size]
    finally:
        os.close(fd)


def prog_id(fd: int) -> int:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return int(info.id)


def prog_tag(fd: int) -> str:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return bytes(info.tag).hex()


def prog_tag_by_id(prog_id: int) -> str | None:
    fd = _lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return prog_tag(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int


# struct __sk_buff up to ingress_ifindex (offset 36), the field a test run may set
_SKB_CTX_SIZE = 40


def prog_test_run(fd: int, packet: bytes, repeat: int = 1,
                  ingress_ifindex: int = 0) -> TestRunResult:
    """Run a loaded program on `packet` (BPF_PROG_TEST_RUN); duration is the mean ns/run.
    `ingress_ifindex`: what the program reads as skb->ingress_ifindex (any number)."""
    ctx = None
    if ingress_ifindex:
        ctx = ctypes.create_string_buffer(_SKB_CTX_SIZE)
        ctypes.c_uint32.from_buffer(ctx, 36).value = ingress_ifindex
    buf_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 256
    buf_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(buf_in, ctypes.c_void_p),
        data_out=ctypes.cast(buf_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=out_size,
        repeat=repeat,
    )
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
        opts.ctx_size_in = _SKB_CTX_SIZE
    rc = _lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts))
    if rc < 0:
        err = ctypes.get_errno() or errno.EINVAL
        raise BpfError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return TestRunResult(opts.retval, buf_out.raw[: opts.data_size_out], opts.duration)


_lib.bpf_map_lookup_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p,
]


def lookup_batch_chunks(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> Iterator[tuple[int, bytes, bytes]]:
    """A map's entries as (count, packed keys, packed values) chunks of up to `chunk`
    entries, one BPF_MAP_LOOKUP_BATCH each: no Python object per entry. Entries changed
    during the walk may be seen or not. `value_size`: per-CPU maps' whole per-CPU size."""
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    first = True
    while True:
        count = ctypes.c_uint32(chunk)
        rc = _lib.bpf_map_lookup_batch(
            fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), None
        )
        err = ctypes.get_errno() if rc < 0 else 0
        n = count.value
        if n:
            # string_at copies the n entries only (.raw would copy the whole buffer)
            yield n, ctypes.string_at(keys, n * key_size), ctypes.string_at(values, n * value_size)
        if rc < 0:
            if err == errno.ENOENT:
                return
            raise BpfError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def lookup_batch(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a map as raw bytes (lookup_batch_chunks, entry by entry)."""
    for n, kraw, vraw in lookup_batch_chunks(fd, key_size, value_size, chunk):
        for i in range(n):
            yield (kraw[i * key_size:(i + 1) * key_size],
                   vraw[i * value_size:(i + 1) * value_size])


_lib.bpf_map_delete_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p,
]


def delete_batch(fd: int, keys: list[bytes], chunk: int = 8192) -> int:
    """Delete `keys` (raw bytes, all one size) in batches; keys already gone are skipped.
    Returns how many were deleted."""
    deleted = 0
    for k in range(0, len(keys), chunk):
        part = keys[k:k + chunk]
        buf = ctypes.create_string_buffer(b"".join(part), len(part) * len(part[0]))
        count = ctypes.c_uint32(len(part))
        rc = _lib.bpf_map_delete_batch(fd, buf, ctypes.byref(count), None)
        deleted += count.value
        if rc < 0 and ctypes.get_errno() == errno.ENOENT:
            # stopped at a key that is gone (evicted meanwhile): delete the rest one by one
            for key in part[count.value + 1:]:
                kb = ctypes.create_string_buffer(key, len(key))
                one = ctypes.c_uint32(1)
                if _lib.bpf_map_delete_batch(fd, kb, ctypes.byref(one), None) == 0:
                    deleted += 1
        elif rc < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"BPF_MAP_DELETE_BATCH: {os.strerror(err)}")
    return deleted


# -- map elements ------------------------------------------------------------------------

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_map_update_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_void_p,
]
_lib.libbpf_num_possible_cpus.argtypes = []


def possible_cpus() -> int:
    return int(_check(_lib.libbpf_num_possible_cpus(), "possible CPUs"))


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under `key`, or None when there is none."""
    out = ctypes.create_string_buffer(value_size)
    if _lib.bpf_map_lookup_elem(fd, key, out) < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise BpfError(err, f"map lookup: {os.strerror(err)}")
    return out.raw


def update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(_lib.bpf_map_update_elem(fd, key, value, flags), "map update")


def delete(fd: int, key: bytes) -> bool:
    """True if `key` was there."""
    if _lib.bpf_map_delete_elem(fd, key) < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        raise BpfError(err, f"map delete: {os.strerror(err)}")
    return True


def next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(key_size)
    if _lib.bpf_map_get_next_key(fd, key, out) < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise BpfError(err, f"map next key: {os.strerror(err)}")
    return out.raw


def _in(buf: bytes | bytearray | memoryview) -> object:
    """A buffer as a pointer argument, without a copy when it is writable (a numpy
    array's memoryview, a bytearray) or bytes."""
    if isinstance(buf, bytes):
        return buf
    view = memoryview(buf)
    if view.readonly:
        return bytes(view)
    return (ctypes.c_char * view.nbytes).from_buffer(view)


def update_batch(fd: int, keys: bytes | bytearray | memoryview,
                 values: bytes | bytearray | memoryview, count: int) -> None:
    """Write `count` packed keys and values (buffers laid out back to back) with one
    BPF_MAP_UPDATE_BATCH. On failure BpfError.done says how many were written (the
    first ones)."""
    n = ctypes.c_uint32(count)
    if _lib.bpf_map_update_batch(fd, _in(keys), _in(values), ctypes.byref(n), None) < 0:
        err = ctypes.get_errno()
        exc = BpfError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)}")
        exc.done = n.value  # type: ignore[attr-defined]
        raise exc


def prog_name_by_id(prog_id: int) -> str | None:
    """A loaded program's name (bpf_prog_info.name, at most 15 characters), or None when
    no such program exists."""
    fd = _lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = _ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               "prog info")
        # struct bpf_prog_info: name[16] at offset 64, i.e. 48 bytes into _rest
        raw = bytes(info._rest[48:64])
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)
