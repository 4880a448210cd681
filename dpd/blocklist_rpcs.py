"""xlb.dpd.v1 blocklist methods (PutBlocklist, DeleteBlocklist, ListBlocklist), mirror
methods (PutMirrors, DeleteMirrors, ListMirrors) and the XDP side of the interface
messages.

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.blocklist, dpd.mirror and
dpd.xdp calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dpd.blocklist import parse_prefixes
from dpd.mirror import parse_mirror
from dpd.xdp import XdpMode
from xlb.dpd.v1 import datapath_pb2 as pb
from xlbcore.errors import ValidationError, quote
from xlbcore.firewall import parse_ifname
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from dpd.node import Node


def parse_xdp_mode(value: int, field: str = "xdp_mode") -> XdpMode:
    try:
        return XdpMode(value)
    except ValueError:
        raise ValidationError(f"{field}: {quote(value)} is not an XdpMode") from None


class BlocklistRpcs:
    node: Node

    def _xdp_config(self, msg: pb.Interface) -> pb.Interface:
        """Fill an Interface message's XDP mode and program tag."""
        st = self.node.xdp_state(msg.name)
        msg.xdp_mode = pb.XdpMode.ValueType(int(st.mode))
        if st.ours:
            msg.xdp_program_tag = self.node.dp.tags.get("xdp_packet_func", "")
        return msg

    @rpc
    def PutBlocklist(self, request: Any, context: Any) -> pb.PutBlocklistResponse:  # noqa: N802
        prefixes = parse_prefixes(request.prefixes, "prefixes")
        bl = self.node.blocklist
        written = bl.put(prefixes)
        return pb.PutBlocklistResponse(written=written, generation=bl.generation)

    @rpc
    def DeleteBlocklist(self, request: Any, context: Any) -> pb.DeleteBlocklistResponse:  # noqa: N802
        prefixes = parse_prefixes(request.prefixes, "prefixes")
        bl = self.node.blocklist
        deleted = bl.delete(prefixes)
        return pb.DeleteBlocklistResponse(deleted=deleted, generation=bl.generation)

    @rpc
    def ListBlocklist(self, request: Any, context: Any) -> Iterator[pb.BlockedPrefix]:  # noqa: N802
        for b in self.node.blocklist.entries():
            msg = pb.BlockedPrefix(prefix=b.prefix)
            msg.counters.packets, msg.counters.bytes = b.counters.packets, b.counters.bytes
            yield msg

    @rpc
    def PutMirrors(self, request: Any, context: Any) -> pb.PutMirrorsResponse:  # noqa: N802
        specs = [parse_mirror(m.interface, m.mirror_interface, f"mirrors[{i}]")
                 for i, m in enumerate(request.mirrors)]
        names = [s.interface for s in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValidationError(f"mirrors: {quote(dup)} is mirrored twice in one call")
        table = self.node.mirrors
        written = table.put(specs)
        return pb.PutMirrorsResponse(written=written, generation=table.generation)

    @rpc
    def DeleteMirrors(self, request: Any, context: Any) -> pb.DeleteMirrorsResponse:  # noqa: N802
        names = [parse_ifname(n, f"interfaces[{i}]") for i, n in enumerate(request.interfaces)]
        table = self.node.mirrors
        deleted = table.delete(names)
        return pb.DeleteMirrorsResponse(deleted=deleted, generation=table.generation)

    @rpc
    def ListMirrors(self, request: Any, context: Any) -> Iterator[pb.Mirror]:  # noqa: N802
        for m in self.node.mirrors.entries():
            msg = pb.Mirror(interface=m.spec.interface, mirror_interface=m.spec.mirror_interface)
            msg.counters.packets, msg.counters.bytes = m.counters.packets, m.counters.bytes
            yield msg
