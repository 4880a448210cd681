"""The map seam: what dpd's tables (services, conntrack, counters, and every table to
come) need from a BPF map, with two implementations.

- ``KernelMap``: a pinned kernel map, through its fd (dpd/bpfsys.py, libbpf).
- ``MemoryMap``: the same semantics in a dict, for tests without root and for
  simulated nodes: capacity (E2BIG when a hash map is full), LRU eviction, arrays whose
  every index exists, per-CPU values.

Keys and values are raw bytes laid out as in the ABI header (dpd/abi.py packs them).
A per-CPU map's value is the kernel's per-CPU buffer: one slot of round_up(value_size,
8) bytes per possible CPU. Errors are classified by errno, never by message text:
``MapFull`` (E2BIG, ENOSPC, ENOMEM on insert) is a full table; any other failure is a
``MapError`` carrying its errno.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from dpd import bpfsys
from dpd.abi import MapSpec
from xlbcore.errors import Exhausted

ANY = bpfsys.BPF_ANY
NOEXIST = bpfsys.BPF_NOEXIST
EXIST = bpfsys.BPF_EXIST

_FULL = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)

Buffer = bytes | bytearray | memoryview  # put_batch_raw's arrays (a numpy array's memoryview)


class MapError(OSError):
    """A map operation failed; `errno` says why."""


class MapFull(MapError, Exhausted):
    """The map has no room for another entry."""


def classify(err: OSError, what: str) -> MapError:
    code = err.errno or 0
    cls = MapFull if code in _FULL else MapError
    return cls(code, f"{what}: {os.strerror(code)}")


def _split(data: bytes, size: int, count: int) -> list[bytes]:
    """`count` items of `size` bytes laid out back to back in `data` (sliced in C)."""
    return list(map(data.__getitem__, map(slice, range(0, count * size, size),
                                          range(size, (count + 1) * size, size))))


def percpu_stride(value_size: int) -> int:
    return (value_size + 7) // 8 * 8


class Map(ABC):
    """One BPF map. Implementations keep the kernel's semantics for its type."""

    def __init__(self, spec: MapSpec, ncpus: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.ncpus = ncpus if spec.per_cpu else 1

    @property
    def value_bytes(self) -> int:
        """Size of the value buffer get() returns and put() takes."""
        if self.spec.per_cpu:
            return percpu_stride(self.spec.value_size) * self.ncpus
        return self.spec.value_size

    def split(self, value: bytes) -> list[bytes]:
        """A per-CPU value buffer as one value per CPU."""
        if not self.spec.per_cpu:
            return [value]
        stride = percpu_stride(self.spec.value_size)
        return [value[i * stride:i * stride + self.spec.value_size] for i in range(self.ncpus)]

    def zero_value(self) -> bytes:
        return bytes(self.value_bytes)

    @abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def put(self, key: bytes, value: bytes, flags: int = ANY) -> None: ...

    @abstractmethod
    def delete(self, key: bytes) -> bool:
        """True if the key was there."""

    @abstractmethod
    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry; entries changed meanwhile may be seen or not."""

    def put_batch(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Write many entries. On failure the exception's `done` says how many of the
        first entries were written."""
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            try:
                self.put(k, v)
            except MapError as e:
                e.done = i  # type: ignore[attr-defined]
                raise

    def put_batch_raw(self, keys: Buffer, values: Buffer) -> None:
        """`put_batch` of entries laid out back to back: `keys` the packed keys, `values`
        as many packed values (any buffer: bytes, a numpy array), each the size
        `value_bytes` says. The kernel takes such arrays as they are (no Python object
        per entry); an in-memory map splits them."""
        count = self._raw_count(keys, values)
        self.put_batch(_split(bytes(keys), self.spec.key_size, count),
                       _split(bytes(values), self.value_bytes, count))

    def _raw_count(self, keys: Buffer, values: Buffer) -> int:
        """How many entries `keys` and `values` (put_batch_raw) hold; checks both sizes."""
        kn, vn = memoryview(keys).nbytes, memoryview(values).nbytes
        count = kn // self.spec.key_size
        if kn != count * self.spec.key_size or vn != count * self.value_bytes:
            raise MapError(errno.EINVAL, f"{self.name}: {kn} bytes of keys and {vn} of "
                                         f"values are not whole entries of "
                                         f"{self.spec.key_size} and {self.value_bytes}")
        return count

    def delete_batch(self, keys: Sequence[bytes]) -> int:
        return sum(self.delete(k) for k in keys)

    def zero(self, indexes: Sequence[int]) -> None:
        """Reset array entries (counters) to zero."""
        if indexes:
            zero = self.zero_value()
            self.put_batch([i.to_bytes(4, "little") for i in indexes], [zero] * len(indexes))

    def count(self) -> int:
        return sum(1 for _ in self.items())


class KernelMap(Map):
    def __init__(self, fd: int, spec: MapSpec, ncpus: int) -> None:
        super().__init__(spec, ncpus)
        self.fd = fd

    def get(self, key: bytes) -> bytes | None:
        try:
            return bpfsys.lookup(self.fd, key, self.value_bytes)
        except OSError as e:
            raise classify(e, f"{self.name} lookup") from None

    def put(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        try:
            bpfsys.update(self.fd, key, value, flags)
        except OSError as e:
            raise classify(e, f"{self.name} update") from None

    def delete(self, key: bytes) -> bool:
        try:
            return bpfsys.delete(self.fd, key)
        except OSError as e:
            raise classify(e, f"{self.name} delete") from None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        if self.spec.per_cpu or self.spec.type in ("array", "prog_array"):
            key = None
            while (key := bpfsys.next_key(self.fd, key, self.spec.key_size)) is not None:
                value = self.get(key)
                if value is not None:
                    yield key, value
            return
        try:  # chunks of about 1 MiB (a maglev_v4_map value alone is 32 KiB)
            yield from bpfsys.lookup_batch(self.fd, self.spec.key_size, self.spec.value_size,
                                           max(1, min(4096, (1 << 20) // self.spec.value_size)))
        except OSError as e:
            raise classify(e, f"{self.name} read") from None

    def put_batch(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        if not keys:
            return
        try:
            bpfsys.update_batch(self.fd, b"".join(keys), b"".join(values), len(keys))
        except OSError as e:
            err = classify(e, f"{self.name} batch update")
            err.done = getattr(e, "done", 0)  # type: ignore[attr-defined]
            raise err from None

    def put_batch_raw(self, keys: Buffer, values: Buffer) -> None:
        count = self._raw_count(keys, values)
        if not count:
            return
        try:
            bpfsys.update_batch(self.fd, keys, values, count)
        except OSError as e:
            err = classify(e, f"{self.name} batch update")
            err.done = getattr(e, "done", 0)  # type: ignore[attr-defined]
            raise err from None

    def delete_batch(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            return bpfsys.delete_batch(self.fd, list(keys))
        except OSError as e:
            raise classify(e, f"{self.name} batch delete") from None

    def count(self) -> int:
        if self.spec.per_cpu or self.spec.type in ("array", "prog_array"):
            return super().count()
        try:  # counted in raw chunks: no Python object per entry
            return sum(n for n, _, _ in bpfsys.lookup_batch_chunks(
                self.fd, self.spec.key_size, self.spec.value_size,
                max(1, min(4096, (1 << 20) // self.spec.value_size))))
        except OSError as e:
            raise classify(e, f"{self.name} read") from None

    def close(self) -> None:
        os.close(self.fd)


class MemoryMap(Map):
    """A map in a dict, with the kernel's semantics for hash, lru_hash, array and
    per-CPU array maps. Thread-safe for single operations (the GIL), as a kernel map is."""

    def __init__(self, spec: MapSpec, ncpus: int = 2) -> None:
        super().__init__(spec, ncpus)
        self._array = spec.type in ("array", "percpu_array", "prog_array")
        self._data: OrderedDict[bytes, bytes] = OrderedDict()

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.spec.key_size:
            raise MapError(errno.EINVAL, f"{self.name}: key of {len(key)} bytes, "
                                         f"map takes {self.spec.key_size}")

    def _index(self, key: bytes) -> int:
        return int.from_bytes(key, "little")

    def get(self, key: bytes) -> bytes | None:
        self._check_key(key)
        if self._array:
            if self._index(key) >= self.spec.max_entries:
                return None
            return self._data.get(key, self.zero_value())
        value = self._data.get(key)
        if value is not None and self.spec.type == "lru_hash":
            self._data.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        self._check_key(key)
        if len(value) != self.value_bytes:
            raise MapError(errno.EINVAL, f"{self.name}: value of {len(value)} bytes, "
                                         f"map takes {self.value_bytes}")
        if self._array:
            if self._index(key) >= self.spec.max_entries:
                raise MapFull(errno.E2BIG, f"{self.name}: index out of range")
            if flags == NOEXIST:
                raise MapError(errno.EEXIST, f"{self.name}: entry exists")
            self._data[key] = bytes(value)
            return
        exists = key in self._data
        if flags == NOEXIST and exists:
            raise MapError(errno.EEXIST, f"{self.name}: entry exists")
        if flags == EXIST and not exists:
            raise MapError(errno.ENOENT, f"{self.name}: no such entry")
        if not exists and len(self._data) >= self.spec.max_entries:
            if self.spec.type != "lru_hash":
                raise MapFull(errno.E2BIG, f"{self.name} update: {os.strerror(errno.E2BIG)}")
            self._data.popitem(last=False)  # evict the least recently used
        self._data[key] = bytes(value)
        self._data.move_to_end(key)

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        if self._array:
            raise MapError(errno.EINVAL, f"{self.name}: array entries cannot be deleted")
        return self._data.pop(key, None) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        if self._array:
            for i in range(self.spec.max_entries):
                k = i.to_bytes(self.spec.key_size, "little")
                yield k, self._data.get(k, self.zero_value())
            return
        yield from list(self._data.items())

    def count(self) -> int:
        return self.spec.max_entries if self._array else len(self._data)
