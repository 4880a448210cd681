"""The datapath ABI as Python sees it, read from the C headers: the single source.

``dpd/bpf/xlb_abi.h`` defines every constant and every map key/value struct;
``dpd/bpf/maps.h`` declares every map. This module parses both (a deliberately small
subset of C: ``#define NAME <integer expression>``, structs of fixed-size fields and
arrays, ``BPF_TABLE_PINNED(...)`` declarations), computes each struct's layout with the
C alignment rules of x86-64 and BPF (the same for these types), and gives codecs that
pack and unpack values by field name. Nothing here restates a layout by hand.

tests/datapath/test_abi.py checks every layout computed here against the BTF of the
maps the kernel loaded (size and the offset of every field, recursively), as Cilium's
alignchecker does, so a parser mistake cannot go unnoticed.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parent / "bpf"


class AbiError(ValueError):
    """The headers use something this parser does not understand."""


# scalar C type -> (size, struct format char, kind)
_SCALARS: dict[str, tuple[int, str, str]] = {
    "__u8": (1, "B", "u"), "u8": (1, "B", "u"), "__s8": (1, "b", "s"),
    "__u16": (2, "H", "u"), "u16": (2, "H", "u"), "__s16": (2, "h", "s"),
    "__u32": (4, "I", "u"), "u32": (4, "I", "u"), "__s32": (4, "i", "s"), "int": (4, "i", "s"),
    "__u64": (8, "Q", "u"), "u64": (8, "Q", "u"), "__s64": (8, "q", "s"),
    "__be16": (2, "H", "be"), "__be32": (4, "4s", "be"), "__be64": (8, "8s", "be"),
}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    ctype: str  # scalar type name, or "struct NAME"
    count: int  # array length; 0 for a plain field
    elem_size: int
    struct: Layout | None = None

    @property
    def size(self) -> int:
        return self.elem_size * max(self.count, 1)


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    align: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"struct {self.name} has no field {name}")

    def holes(self) -> list[tuple[int, int]]:
        """(offset, length) of every implicit padding gap, trailing included."""
        out = []
        at = 0
        for f in self.fields:
            if f.offset > at:
                out.append((at, f.offset - at))
            at = f.offset + f.size
        if self.size > at:
            out.append((at, self.size - at))
        return out

    @functools.cached_property
    def codec(self) -> Codec:
        return Codec(self)

    @functools.cached_property
    def dtype(self) -> Any:
        """The layout as a numpy structured dtype (same size, every field at its offset;
        pads left out, so an array made with np.zeros holds them zero), for building
        the values of a whole batch in one array. ``__be16``/``__be32`` are big-endian
        integers: assign host-order ints, or the raw bytes through a '>u4' view."""
        import numpy as np  # dpd's bulk encoding only

        names, formats, offsets = [], [], []
        for f in self.fields:
            if f.name.startswith("pad"):
                continue
            if f.struct is not None:
                base = f.struct.dtype
            else:
                size, _, kind = _SCALARS[f.ctype]
                base = np.dtype(f"{'>' if kind == 'be' else '<'}{'i' if kind == 's' else 'u'}"
                                f"{size}")
            names.append(f.name)
            formats.append((base, (f.count,)) if f.count else base)
            offsets.append(f.offset)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": self.size})


@dataclass(frozen=True)
class MapDecl:
    name: str
    type: str  # bcc's name: hash, lru_hash, array, percpu_array, prog
    key: str  # "struct xlb_nat_key" or a scalar type
    value: str
    max_entries: str  # a constant name or a number, resolved by Abi.map_specs
    flags: str = ""

    @property
    def kernel_type(self) -> str:
        """The map type as the kernel's map info names it (bpfsys.MAP_TYPES)."""
        return {"prog": "prog_array"}.get(self.type, self.type)

    @property
    def per_cpu(self) -> bool:
        return self.type.startswith("percpu") or self.type.startswith("lru_percpu")


@dataclass(frozen=True)
class MapSpec:
    """A map as it must exist for one set of settings."""

    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    per_cpu: bool
    key: Layout | None = None  # None for a scalar key
    value: Layout | None = None


_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitAnd: operator.and_,
}


def _eval(expr: str, consts: Mapping[str, int]) -> int:
    """An integer constant expression of literals and earlier constants."""
    text = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr.strip())
    text = text.replace("/", "//")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in consts:
            return consts[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise AbiError(f"not an integer constant expression: {expr!r}")

    try:
        return ev(ast.parse(text, mode="eval").body)
    except SyntaxError:
        raise AbiError(f"not an integer constant expression: {expr!r}") from None


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_]\w*)[ \t]+(.+?)\s*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_MEMBER = re.compile(r"^(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*([^\]]+)\s*\])?$")
_TABLE = re.compile(r"\bBPF_TABLE_PINNED\s*\((.*?)\)\s*;", re.S)


class Abi:
    """Constants, struct layouts and map declarations of the datapath."""

    def __init__(self, abi_header: str, maps_header: str = "") -> None:
        self.constants: dict[str, int] = {}
        self.defaults: dict[str, int] = {}  # settings with a default in maps.h
        self.structs: dict[str, Layout] = {}
        self.maps: dict[str, MapDecl] = {}
        self._parse_defines(_strip_comments(abi_header), self.constants)
        self._parse_structs(_strip_comments(abi_header))
        if maps_header:
            text = _strip_comments(maps_header)
            self._parse_defines(text, self.defaults, skip_strings=True)
            # a default may name another setting (XLB_EP_TABLE: XLB_MAX_BACKENDS): kept
            # as written, evaluated again with the settings of each map_specs call
            self._default_exprs = {n: v for n, v in _DEFINE.findall(text) if n in self.defaults}
            self._parse_maps(text)

    @classmethod
    def from_dir(cls, directory: Path = BPF_DIR) -> Abi:
        return cls((directory / "xlb_abi.h").read_text(), (directory / "maps.h").read_text())

    # -- parsing -------------------------------------------------------------------------

    def _parse_defines(self, text: str, into: dict[str, int], skip_strings: bool = False) -> None:
        for name, value in _DEFINE.findall(text):
            if name.endswith("_H") or "(" in name:
                continue  # include guards
            if skip_strings and ('"' in value or "#" in value):
                continue  # XLB_PIN(name) and the like
            into[name] = _eval(value, {**self.constants, **into})

    def _parse_structs(self, text: str) -> None:
        for name, body in _STRUCT.findall(text):
            fields: list[Field] = []
            offset = 0
            align = 1
            for decl in filter(None, (d.strip() for d in body.split(";"))):
                m = _MEMBER.match(" ".join(decl.split()))
                if not m:
                    raise AbiError(f"struct {name}: cannot read member {decl!r}")
                ctype, fname, count_expr = m.groups()
                count = _eval(count_expr, self.constants) if count_expr else 0
                sub: Layout | None = None
                if ctype.startswith("struct "):
                    sub = self.structs.get(ctype.split()[1])
                    if sub is None:
                        raise AbiError(f"struct {name}.{fname}: {ctype} is not defined before")
                    size, falign = sub.size, sub.align
                elif ctype in _SCALARS:
                    size = falign = _SCALARS[ctype][0]
                else:
                    raise AbiError(f"struct {name}.{fname}: unknown type {ctype}")
                offset = -(-offset // falign) * falign
                fields.append(Field(fname, offset, ctype, count, size, sub))
                offset += size * max(count, 1)
                align = max(align, falign)
            size = -(-offset // align) * align
            self.structs[name] = Layout(name, size, align, tuple(fields))

    def _parse_maps(self, text: str) -> None:
        for args in _TABLE.findall(text):
            parts = [a.strip() for a in " ".join(args.split()).split(",")]
            if len(parts) < 6:
                raise AbiError(f"BPF_TABLE_PINNED({args}): expected at least 6 arguments")
            mtype, key, value, name, max_entries = parts[0].strip('"'), *parts[1:5]
            flags = parts[6] if len(parts) > 6 else ""
            self.maps[name] = MapDecl(name, mtype, key, value, max_entries, flags)

    # -- use -----------------------------------------------------------------------------

    def const(self, name: str) -> int:
        return self.constants[name]

    def prefixed(self, prefix: str) -> dict[str, int]:
        """Constants named PREFIX<NAME>, as {name in lower case: value}."""
        return {k[len(prefix):].lower(): v for k, v in self.constants.items()
                if k.startswith(prefix)}

    def stat_names(self) -> dict[int, str]:
        """Global counter index -> name, from the XLB_STAT_* constants."""
        out = {}
        for name, index in self.prefixed("XLB_STAT_").items():
            if name != "max" and not name.startswith("unused"):
                out[index] = name
        return dict(sorted(out.items()))

    def _type(self, ctype: str) -> tuple[int, Layout | None]:
        if ctype.startswith("struct "):
            layout = self.structs[ctype.split()[1]]
            return layout.size, layout
        if ctype not in _SCALARS:
            raise AbiError(f"unknown map key/value type {ctype}")
        return _SCALARS[ctype][0], None

    def map_specs(self, settings: Mapping[str, int]) -> dict[str, MapSpec]:
        """Every map with its sizes; `settings` overrides maps.h's defaults by macro
        name (e.g. {"XLB_CT_SIZE": 4096})."""
        consts = {**self.constants}
        for name, expr in getattr(self, "_default_exprs", {}).items():
            consts[name] = settings[name] if name in settings else _eval(expr, consts)
        consts.update(settings)
        out = {}
        for d in self.maps.values():
            ksize, klayout = self._type(d.key)
            vsize, vlayout = self._type(d.value)
            out[d.name] = MapSpec(d.name, d.kernel_type, ksize, vsize,
                                  _eval(d.max_entries, consts), d.per_cpu, klayout, vlayout)
        return out


@functools.cache
def load() -> Abi:
    """The ABI of the sources shipped with this dpd."""
    return Abi.from_dir(BPF_DIR)


# -- codecs ---------------------------------------------------------------------------------


_OP_PLAIN, _OP_BE16, _OP_RAW, _OP_ARRAY, _OP_STRUCT, _OP_STRUCTS = range(6)


@dataclass
class _Slot:
    name: str
    kind: str  # "u", "s", "be16", "be", "bytes", "array", "struct", "structs"
    count: int = 0
    sub: Codec | None = None
    elem_size: int = 0


@dataclass
class Codec:
    """Packs and unpacks one struct by field name, through one precompiled
    ``struct.Struct`` (explicit pad fields are skipped on unpack and zeroed on pack).

    Values: unsigned/signed fields are ints; ``__be16`` is an int in host order (the
    codec swaps it); ``__be32`` is the 4 raw bytes (network order, as socket.inet_aton
    gives); ``__u8 x[N]`` and ``__be32 x[N]`` are bytes; other scalar arrays are tuples;
    a struct field is a dict and an array of structs a list of dicts (only the elements
    given on pack)."""

    layout: Layout
    _struct: struct.Struct = field(init=False)
    _slots: list[_Slot] = field(init=False)

    def __post_init__(self) -> None:
        fmt = ["="]
        slots: list[_Slot] = []
        parts: list[tuple[str, str]] = []  # (field name or "" for padding, format)
        at = 0
        for f in self.layout.fields:
            if f.offset > at:
                parts.append(("", f"{f.offset - at}x"))
            at = f.offset + f.size
            if f.name.startswith("pad"):
                parts.append(("", f"{f.size}x"))
                continue
            if f.struct is not None:
                parts.append((f.name, f"{f.size}s"))
                slots.append(_Slot(f.name, "structs" if f.count else "struct", f.count,
                                   f.struct.codec, f.elem_size))
                continue
            size, char, kind = _SCALARS[f.ctype]
            if f.count and (char == "B" or char.endswith("s")):  # u8 or __be32 array
                parts.append((f.name, f"{f.size}s"))
                slots.append(_Slot(f.name, "bytes", f.count))
            elif f.count:
                parts.append((f.name, f"{f.count}{char}"))
                slots.append(_Slot(f.name, "array", f.count))
            else:
                parts.append((f.name, char))
                slots.append(_Slot(f.name, "be16" if (kind, size) == ("be", 2) else kind))
        if self.layout.size > at:
            parts.append(("", f"{self.layout.size - at}x"))
        fmt.extend(p for _, p in parts)
        self._struct = struct.Struct("".join(fmt))
        self._slots = slots
        self._parts = parts
        if self._struct.size != self.layout.size:
            raise AbiError(f"codec of struct {self.layout.name}: {self._struct.size} bytes, "
                           f"layout says {self.layout.size}")

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    @functools.cached_property
    def _ops(self) -> list[tuple[str, int, Codec | None, int]]:
        """(name, operation, sub-codec, count) per slot, for the packing loop."""
        op = {"u": _OP_PLAIN, "s": _OP_PLAIN, "be16": _OP_BE16, "be": _OP_RAW, "bytes": _OP_RAW,
              "array": _OP_ARRAY, "struct": _OP_STRUCT, "structs": _OP_STRUCTS}
        return [(s.name, op[s.kind], s.sub, s.count) for s in self._slots]

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def _flat(self, values: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        append = out.append
        get = values.get
        for name, op, sub, count in self._ops:
            v = get(name)
            if op == _OP_PLAIN:
                append(v or 0)
            elif op == _OP_BE16:
                append(socket.htons(v or 0))
            elif op == _OP_RAW:
                append(bytes(v or b""))
            elif op == _OP_STRUCTS:
                pack = sub.pack_dict  # type: ignore[union-attr]
                append(b"".join([pack(item) for item in v]) if v else b"")
            elif op == _OP_STRUCT:
                append(sub.pack_dict(v or {}))  # type: ignore[union-attr]
            else:  # _OP_ARRAY
                vals = list(v or ())
                out.extend(vals + [0] * (count - len(vals)))
        return out

    def pack_dict(self, values: Mapping[str, Any]) -> bytes:
        """`pack` with the values in a mapping."""
        if not values.keys() <= self._name_set:
            unknown = sorted(set(values) - self._name_set)[0]
            raise KeyError(f"struct {self.layout.name} has no field {unknown}")
        return self._struct.pack(*self._flat(values))

    def pack(self, **values: Any) -> bytes:
        return self.pack_dict(values)

    def packer(self, *names: str) -> Callable[..., bytes]:
        """A fast packing function taking the values of `names` positionally, in that
        order; every field but the pads must be named (checked here, once). Values as
        for `pack`, except that an array of structs is given already packed (bytes,
        the elements' packings joined; zero-filled to the array's size)."""
        slots = {s.name: s for s in self._slots}
        missing = set(slots) - set(names)
        unknown = set(names) - set(slots)
        if missing or unknown or len(names) != len(set(names)):
            raise KeyError(f"struct {self.layout.name} packer: missing {sorted(missing)}, "
                           f"unknown {sorted(unknown)}")
        where = {n: i for i, n in enumerate(names)}
        order = [where[s.name] for s in self._slots]
        be16 = [i for i, s in enumerate(self._slots) if s.kind == "be16"]
        if any(s.kind in ("array", "struct") for s in self._slots):
            raise AbiError(f"struct {self.layout.name}: packer takes scalar, byte-array and "
                           "struct-array fields only")
        pack = self._struct.pack
        htons = socket.htons
        if not be16 and order == list(range(len(order))):
            return pack

        def packed(*values: Any) -> bytes:
            flat = [values[i] for i in order]
            for i in be16:
                flat[i] = htons(flat[i])
            return pack(*flat)

        return packed

    def wire_struct(self, names: Sequence[str], array: str = "",
                    element: Sequence[str] = (), count: int = 0) -> struct.Struct:
        """One ``struct.Struct`` for the whole value, for bulk packing and unpacking
        without a Python call per field: its items are the fields `names` (every field
        but the pads, in layout order: both checked here), except that the array of
        structs `array` is its first `count` elements, each as its fields `element`
        (the element's fields in layout order, checked), the other elements zero.
        Values are as the wire holds them: ``__be16`` in network byte order (give
        socket.htons(port), read socket.ntohs), ``__be32`` the 4 raw bytes."""
        if list(names) != self.names:
            raise KeyError(f"struct {self.layout.name} wire_struct: fields {list(names)}, "
                           f"layout order is {self.names}")
        fmt = ["="]
        for name, part in self._parts:
            if not name or name != array:
                fmt.append(part)
                continue
            f = self.layout.field(array)
            sub = f.struct.codec if f.struct is not None else None
            if sub is None or not f.count:
                raise AbiError(f"struct {self.layout.name}.{array}: not an array of structs")
            if list(element) != sub.names:
                raise KeyError(f"struct {sub.layout.name} wire_struct: fields "
                               f"{list(element)}, layout order is {sub.names}")
            if not 0 <= count <= f.count:
                raise AbiError(f"struct {self.layout.name}.{array}: {count} elements, "
                               f"it holds {f.count}")
            fmt.extend([p for _, p in sub._parts] * count)
            if f.count > count:
                fmt.append(f"{(f.count - count) * f.elem_size}x")
        st = struct.Struct("".join(fmt))
        if st.size != self.layout.size:
            raise AbiError(f"wire struct of {self.layout.name}: {st.size} bytes, layout says "
                           f"{self.layout.size}")
        return st

    def pack_into(self, buf: bytearray | memoryview, offset: int, **values: Any) -> None:
        self._struct.pack_into(buf, offset, *self._flat(values))

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, Any]:
        raw = self._struct.unpack_from(data, offset)
        out: dict[str, Any] = {}
        i = 0
        for s in self._slots:
            if s.kind == "array":
                out[s.name] = tuple(raw[i:i + s.count])
                i += s.count
                continue
            v = raw[i]
            i += 1
            if s.kind == "be16":
                v = socket.ntohs(v)
            elif s.kind == "struct":
                assert s.sub is not None
                v = s.sub.unpack(v)
            elif s.kind == "structs":
                assert s.sub is not None
                v = _Elements(s.sub, v, s.elem_size)
            out[s.name] = v
        return out


class _Elements:
    """An array-of-structs field, decoded on access (a service holds 64 endpoint slots
    of which a few are used)."""

    def __init__(self, codec: Codec, raw: bytes, elem_size: int) -> None:
        self._codec, self._raw, self._size = codec, raw, elem_size

    def __len__(self) -> int:
        return len(self._raw) // self._size

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._codec.unpack(self._raw, i * self._size)
