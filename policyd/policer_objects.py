"""policyd's ``Policer`` objects (a token bucket charged by the packets arriving on some
interfaces, docs/policers.md#through-policyd): the spec, its validation and the node
calls the reconcile makes.

How they map onto dpd, whose policers are keyed by name (PutPolicers / DeletePolicers /
ListPolicers): the node key is the object's name, the spec (rate, burst, interfaces) is
what dpd lists back. Interface names are sorted here, as dpd lists them, so that a
read-back compares equal. Whether a node has the interfaces, and whether another
policer already polices one of them there, is the node's business: it refuses the
object (dpd: ``policers[i].interfaces[j]: ...``), an ObjectError on that node while its
other objects apply. policyd does not forbid two Policer objects naming one interface:
with node selectors they may be meant for different nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from policyd.validation import validate_batch, validate_named
from xlb.dpd.v1 import datapath_pb2
from xlbcore.errors import ValidationError, quote
from xlbcore.firewall import parse_ifname
from xlbcore.policer import check_burst, check_rate

INTERFACES_MAX = 64  # interfaces in one Policer object


@dataclass(frozen=True)
class PolicerSpec:
    rate_bps: int
    burst_bytes: int
    interfaces: tuple[str, ...] = ()  # sorted, each once


def parse_policer(msg: Any, field: str = "spec") -> PolicerSpec:
    """An xlb.policy.v1.PolicerSpec: dpd's limits for rate and burst; interface names
    (syntax only), each once, at most INTERFACES_MAX."""
    rate = check_rate(int(msg.rate_bps), f"{field}.rate_bps")
    burst = check_burst(int(msg.burst_bytes), f"{field}.burst_bytes")
    values = list(msg.interfaces)
    if len(values) > INTERFACES_MAX:
        raise ValidationError(f"{field}.interfaces: {len(values)} interfaces, at most "
                              f"{INTERFACES_MAX} per policer")
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if not value:
            raise ValidationError(f"{field}.interfaces[{i}]: an interface name is required")
        name = parse_ifname(value, f"{field}.interfaces[{i}]")
        first = seen.setdefault(name, i)
        if first != i:
            raise ValidationError(
                f"{field}.interfaces[{i}]: {quote(name)} is also {field}.interfaces[{first}]")
    return PolicerSpec(rate, burst, tuple(sorted(seen)))


def fill_policer(msg: Any, spec: PolicerSpec) -> Any:
    msg.rate_bps = spec.rate_bps
    msg.burst_bytes = spec.burst_bytes
    msg.interfaces.extend(spec.interfaces)
    return msg


def policer_key(name: str, spec: PolicerSpec) -> str:
    return name


def validate_policer(msg: Any, field: str = "policer") -> tuple[str, PolicerSpec]:
    """(name, spec) of an xlb.policy.v1.Policer; output-only fields are ignored."""
    return validate_named(msg, field, parse_policer)


def validate_policers(msgs: Sequence[Any], field: str = "policers"
                      ) -> list[tuple[str, PolicerSpec]]:
    """A batch: each valid (errors name ``policers[i]``), no name twice."""
    return validate_batch(msgs, field, validate_policer)


# -- the node's calls (policyd.objects.Kind) ---------------------------------------------

def put_policers(node: Any, items: list[tuple[str, PolicerSpec]], _flush: bool) -> Any:
    request = datapath_pb2.PutPolicersRequest()
    for name, spec in items:
        request.policers.add(name=name, rate_bps=spec.rate_bps, burst_bytes=spec.burst_bytes,
                             interfaces=spec.interfaces)
    return node.stub.PutPolicers(request, timeout=node.timeout)


def delete_policers(node: Any, names: list[str]) -> Any:
    return node.stub.DeletePolicers(datapath_pb2.DeletePolicersRequest(names=names),
                                    timeout=node.timeout)


def list_policers(node: Any) -> dict[str, PolicerSpec | None]:
    """The node's policers by name (interfaces sorted, as dpd lists them)."""
    return {msg.name: PolicerSpec(msg.rate_bps, msg.burst_bytes, tuple(sorted(msg.interfaces)))
            for msg in node.stub.ListPolicers(datapath_pb2.ListPolicersRequest(),
                                              timeout=node.timeout)}
