"""A reader of raw BTF (the kernel's type format), enough to lay out the structs of
a loaded map's key and value: what tests/datapath/test_abi.py compares with the
layouts dpd/abi.py computes from the C header.

Format: include/uapi/linux/btf.h. A header, then the type section (type ids count
from 1, in order), then the string section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

_QUALIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


@dataclass
class BtfType:
    id: int
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    members: list[tuple[str, int, int]]  # struct/union: (name, type id, bit offset)
    array: tuple[int, int] | None = None  # (element type id, count)


class Btf:
    def __init__(self, raw: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            struct.unpack_from("<HBBIIIII", raw, 0))
        if magic != BTF_MAGIC:
            raise ValueError("not BTF (bad magic)")
        types = raw[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strings = raw[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: dict[int, BtfType] = {}
        at, tid = 0, 1
        while at < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, at)
            at += 12
            vlen, kind, kflag = info & 0xFFFF, (info >> 24) & 0x1F, bool(info >> 31)
            t = BtfType(tid, kind, self._str(name_off), size_or_type, vlen, kflag, [])
            if kind == KIND_INT or kind in (KIND_VAR, KIND_DECL_TAG):
                at += 4
            elif kind == KIND_ARRAY:
                elem, _index, count = struct.unpack_from("<III", types, at)
                t.array = (elem, count)
                at += 12
            elif kind in (KIND_STRUCT, KIND_UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, at)
                    bit = m_off & 0xFFFFFF if kflag else m_off
                    t.members.append((self._str(m_name), m_type, bit))
                    at += 12
            elif kind == KIND_ENUM:
                at += 8 * vlen
            elif kind in (KIND_FUNC_PROTO,):
                at += 8 * vlen
            elif kind == KIND_DATASEC:
                at += 12 * vlen
            elif kind == KIND_ENUM64:
                at += 12 * vlen
            self.types[tid] = t
            tid += 1

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def resolve(self, tid: int) -> BtfType:
        """The type behind typedefs and qualifiers."""
        t = self.types[tid]
        while t.kind in _QUALIFIERS:
            t = self.types[t.size_or_type]
        return t

    def size(self, tid: int) -> int:
        t = self.resolve(tid)
        if t.kind == KIND_ARRAY:
            assert t.array is not None
            return self.size(t.array[0]) * t.array[1]
        if t.kind == KIND_PTR:
            return 8
        return t.size_or_type

    def layout(self, tid: int) -> dict[str, object]:
        """A struct as {"size": n, "fields": {name: (byte offset, size, sub-layout or
        None)}}, arrays of structs described by their element."""
        t = self.resolve(tid)
        fields: dict[str, object] = {}
        for name, mtype, bit in t.members:
            mt = self.resolve(mtype)
            elem = mt
            while elem.kind == KIND_ARRAY:
                assert elem.array is not None
                elem = self.resolve(elem.array[0])
            sub = self.layout(elem.id) if elem.kind in (KIND_STRUCT, KIND_UNION) else None
            fields[name] = (bit // 8, self.size(mtype), sub)
        return {"name": t.name, "size": t.size_or_type, "fields": fields}
