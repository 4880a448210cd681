"""The firewall: rule sets compiled into a tuple space, written stage-and-swap (pure
Python over the map seam: unit tests reach all of it without root).

Rules come parsed and validated (xlbcore.firewall: the model policyd shares); here they
are bound to this node (interface names -> ifindexes: an unknown interface is refused),
ranked and compiled.

**Ranks.** The higher priority decides between overlapping rules, then the name that
sorts first: a rule's rank is its place in that order (0 is the best). The datapath keeps
the lowest rank that matches.

**Tuple space search** (as Open vSwitch classifies). Each lookup *shape* (which fields a
rule matches, with which prefix lengths) is a tuple with a mask; a rule is one entry
(masked key -> rank, rule id, action) in the tuple of its shape. A port range is not a
prefix: it is split into the fewest port prefixes that cover it (1024-65535: six), each
an entry, in the tuple of its length. When two entries have the same masked key in one
tuple (the same packets) the better rank keeps it. Tuples are sorted by the best rank
they hold (``min_rank``): the datapath looks the packet's key up in each tuple in turn,
masked, and stops as soon as the next tuple cannot beat the match in hand. The cost
follows the number of shapes (at most XLB_ACL_TUPLES), not the number of rules.

**Stage and swap.** acl_map holds two generations side by side (the generation is in
the key's ``tuple`` field, acl_tuple_map[gen * XLB_ACL_TUPLES + i] is tuple i). A
change compiles the node's whole new rule set, writes it into the idle generation, then
sets the idle generation's tuple count, then flips acl_cfg.gen (one write: a packet is
judged by the old set or by the new one, never by a mixture), then deletes the old
generation. A set that does not fit is refused before the flip (RESOURCE_EXHAUSTED) and
what was staged is removed: nothing is half-written.

``Classifier.judge`` is the reference model of the datapath's verdict (the same search,
in Python): dpd uses it to find the established flows a new set drops
(flush_existing), and the tests compare the kernel's verdict with it.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from dpd.ids import IdPool
from dpd.loader import Datapath
from dpd.maps import MapError, MapFull
from xlbcore.errors import Exhausted, PreconditionError, ValidationError, quote
from xlbcore.firewall import (
    Action,
    PortRange,
    RuleMatch,
    RuleProto,
    RuleSpec,
    rule_order,
)

log = structlog.get_logger("dpd.firewall")

V4, V6 = 4, 6
_ALL16 = 0xFFFF
_ALL32 = 0xFFFFFFFF
_ALL128 = (1 << 128) - 1
ZONE_MAX = 31
FLIP_GRACE_S = 0.002  # after the flip, before the old generation's entries are deleted


class Policy(enum.IntEnum):
    """An interface's policy for packets no rule matches (values match the API's
    DefaultPolicy and the datapath's XLB_POLICY_*)."""

    ALLOW = 1
    DROP = 2


# -- packets and verdicts --------------------------------------------------------------


def addr_int(address: str) -> tuple[int, int]:
    """(family, the address in the 128-bit key space): an IPv4 address fills the top 32
    bits (src[0] of struct xlb_acl_key), an IPv6 address all 128."""
    a = ipaddress.ip_address(address)
    if a.version == 4:
        return V4, int(a) << 96
    return V6, int(a)


@dataclass(frozen=True)
class Packet:
    """What the firewall sees of a packet. Addresses are in the 128-bit key space
    (addr_int); ports are 0 for anything but TCP and UDP."""

    family: int
    proto: int
    ifindex: int
    src: int
    dst: int
    sport: int = 0
    dport: int = 0

    @classmethod
    def of(cls, src: str, dst: str, proto: int, sport: int = 0, dport: int = 0,
           ifindex: int = 0) -> Packet:
        fam, s = addr_int(src)
        _, d = addr_int(dst)
        return cls(fam, proto, ifindex, s, d, sport, dport)

    def key(self) -> tuple[int, int, int, int, int, int, int]:
        return (self.family, self.proto, self.ifindex, self.sport, self.dport, self.src,
                self.dst)


@dataclass(frozen=True)
class Verdict:
    """The firewall's decision. `rule`: the deciding rule's name (None: the interface's
    default policy, or the firewall is off). `judged`: False when the firewall is off
    (the packet goes on as if there were no firewall)."""

    action: Action
    rule: str | None = None
    target: int = 0  # REDIRECT, MIRROR: the interface's ifindex; POLICE: the policer id
    judged: bool = True

    @property
    def drops(self) -> bool:
        return self.action is Action.DROP


OFF = Verdict(Action.ALLOW, judged=False)


# -- rules bound to the node -----------------------------------------------------------


@dataclass(frozen=True)
class BoundRule:
    """A rule as the node holds it: its spec, its counter slot and what its names
    resolved to when it was put: the ingress interface's ifindex (0: any) and the action's
    target (REDIRECT, MIRROR: the interface's ifindex; POLICE: the policer's id; else 0)."""

    name: str
    spec: RuleSpec
    rule_id: int
    in_ifindex: int = 0
    target: int = 0


def _prefix(prefix: str) -> tuple[int, int]:
    """(value, length) of a prefix in the 128-bit key space."""
    if not prefix:
        return 0, 0
    net = ipaddress.ip_network(prefix)
    if net.version == 4:
        return int(net.network_address) << 96, net.prefixlen
    return int(net.network_address), net.prefixlen


def port_prefixes(r: PortRange | None) -> list[tuple[int, int]]:
    """The fewest (value, prefix length) port prefixes whose union is the range; None
    (any port) is one prefix of length 0."""
    if r is None:
        return [(0, 0)]
    out = []
    a, b = r.first, r.last
    while a <= b:
        size = (a & -a) if a else 1 << 16  # the largest aligned block starting at a
        while size > b - a + 1:
            size >>= 1
        out.append((a, 16 - (size.bit_length() - 1)))
        a += size
    return out


def _mask(bits: int, width: int) -> int:
    return ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)


# A shape: (family matched, proto matched, ifindex matched, sport len, dport len,
# src len, dst len), prefix lengths in bits (addresses in the 128-bit key space).
Shape = tuple[bool, bool, bool, int, int, int, int]
Key = tuple[int, int, int, int, int, int, int]


def shape_mask(shape: Shape) -> Key:
    fam, proto, ifx, sp, dp, sl, dl = shape
    return (0xFF if fam else 0, 0xFF if proto else 0, _ALL32 if ifx else 0,
            _mask(sp, 16), _mask(dp, 16), _mask(sl, 128), _mask(dl, 128))


@dataclass(frozen=True)
class Entry:
    rank: int
    rule_id: int
    action: Action
    target: int
    rule: str


@dataclass
class Tuple:
    shape: Shape
    mask: Key
    min_rank: int
    entries: dict[Key, Entry] = field(default_factory=dict)


def _masked(key: Key, mask: Key) -> Key:
    return (key[0] & mask[0], key[1] & mask[1], key[2] & mask[2], key[3] & mask[3],
            key[4] & mask[4], key[5] & mask[5], key[6] & mask[6])


class TooManyShapes(Exhausted):
    pass


@dataclass
class Classifier:
    """A compiled rule set: tuples sorted by min_rank (then shape, for a stable order)."""

    tuples: list[Tuple]
    rules: int = 0

    @property
    def entries(self) -> int:
        return sum(len(t.entries) for t in self.tuples)

    def lookup(self, pkt: Packet) -> Entry | None:
        """The best-ranked entry matching `pkt`: the datapath's search, step for step."""
        key = pkt.key()
        best: Entry | None = None
        for t in self.tuples:
            if best is not None and t.min_rank >= best.rank:
                break
            e = t.entries.get(_masked(key, t.mask))
            if e is not None and (best is None or e.rank < best.rank):
                best = e
        return best

    def judge(self, pkt: Packet, policies: Mapping[int, Policy], policy_drop: bool) -> Verdict:
        """The datapath's verdict for a packet that has no conntrack entry. `policies`:
        ifindex -> default policy (an interface not in it allows); `policy_drop`: the
        datapath's XLB_ACL_F_POLICY_DROP (some interface's policy is drop)."""
        if not self.tuples and not policy_drop:
            return OFF
        e = self.lookup(pkt)
        if e is not None:
            return Verdict(e.action, e.rule, e.target)
        if policy_drop and policies.get(pkt.ifindex, Policy.ALLOW) is Policy.DROP:
            return Verdict(Action.DROP)
        return Verdict(Action.ALLOW)


def ranked(rules: Iterable[BoundRule]) -> list[BoundRule]:
    """Rules in deciding order: higher priority first, then by name."""
    return sorted(rules, key=lambda r: rule_order(r.name, r.spec))


def compile_rules(rules: Iterable[BoundRule], max_tuples: int) -> Classifier:
    """The tuple space of a rule set; TooManyShapes when it needs more than
    `max_tuples` lookup shapes."""
    by_shape: dict[Shape, Tuple] = {}
    order = ranked(rules)
    for rank, r in enumerate(order):
        m = r.spec.match
        fam = m.family
        src, src_len = _prefix(m.src)
        dst, dst_len = _prefix(m.dst)
        proto = int(m.protocol)
        entry = Entry(rank, r.rule_id, r.spec.action, r.target, r.name)
        for sp, sp_len in port_prefixes(m.src_ports):
            for dp, dp_len in port_prefixes(m.dst_ports):
                shape = (fam != 0, proto != 0, r.in_ifindex != 0, sp_len, dp_len,
                         src_len, dst_len)
                t = by_shape.get(shape)
                if t is None:
                    t = by_shape[shape] = Tuple(shape, shape_mask(shape), rank)
                key = _masked((fam, proto, r.in_ifindex, sp, dp, src, dst), t.mask)
                # ranks ascend: an entry already there is at least as good
                t.entries.setdefault(key, entry)
    if len(by_shape) > max_tuples:
        raise TooManyShapes(
            f"the rule set needs {len(by_shape)} lookup shapes (combinations of matched "
            f"fields, prefix lengths and port-range pieces); the datapath holds "
            f"{max_tuples}: use fewer distinct prefix lengths or port ranges that split "
            "into fewer prefixes")
    tuples = sorted(by_shape.values(), key=lambda t: (t.min_rank, t.shape))
    return Classifier(tuples, len(order))


def _in_prefix(addr: int, prefix: str) -> bool:
    value, length = _prefix(prefix)
    return (addr & _mask(length, 128)) == value


def _in_range(port: int, r: PortRange | None) -> bool:
    return r is None or r.first <= port <= r.last


def rule_matches(r: BoundRule, pkt: Packet) -> bool:
    """Whether `r` matches `pkt`, straight from the rule (no compilation): the
    specification the compiled classifier must agree with."""
    m: RuleMatch = r.spec.match
    if m.family and m.family != pkt.family:
        return False
    if m.protocol is not RuleProto.ANY and int(m.protocol) != pkt.proto:
        return False
    if r.in_ifindex and r.in_ifindex != pkt.ifindex:
        return False
    if m.src and not _in_prefix(pkt.src, m.src):
        return False
    if m.dst and not _in_prefix(pkt.dst, m.dst):
        return False
    return _in_range(pkt.sport, m.src_ports) and _in_range(pkt.dport, m.dst_ports)


def first_match(rules: Iterable[BoundRule], pkt: Packet) -> BoundRule | None:
    """The deciding rule by the definition: the first matching rule in rank order."""
    return next((r for r in ranked(rules) if rule_matches(r, pkt)), None)


# -- interfaces ------------------------------------------------------------------------


class Links:
    """Interface names <-> ifindexes of the node's network namespace."""

    def index(self, name: str) -> int | None:
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    def name(self, ifindex: int) -> str | None:
        try:
            return socket.if_indextoname(ifindex)
        except OSError:
            return None

    def counters(self, ifindex: int) -> dict[str, int]:
        """rx/tx packets and bytes as the kernel counts them for the link."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            try:
                links = ipr.get_links(ifindex)
            except Exception:  # noqa: BLE001 - gone meanwhile: no counters
                return {}
            stats = links[0].get_attr("IFLA_STATS64") if links else None
            if not stats:
                return {}
            return {k: int(stats.get(k, 0)) for k in
                    ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")}


class StaticLinks(Links):
    """A fixed set of interfaces: the in-memory datapath's (simulated nodes, tests)."""

    def __init__(self, names: Mapping[str, int] | None = None) -> None:
        self.by_name = dict(names or {"lo": 1, "eth0": 2, "eth1": 3})

    def index(self, name: str) -> int | None:
        return self.by_name.get(name)

    def name(self, ifindex: int) -> str | None:
        return next((n for n, i in self.by_name.items() if i == ifindex), None)

    def counters(self, ifindex: int) -> dict[str, int]:
        return {}


@dataclass(frozen=True)
class IntfConfig:
    ifindex: int
    slot: int
    policy: Policy = Policy.ALLOW
    zone: str = ""


def parse_zone(value: str, field: str = "zone") -> str:
    if len(value) > ZONE_MAX or not all(c.isascii() and (c.isalnum() or c in "-_")
                                        for c in value):
        raise ValidationError(f"{field}: {quote(value)} is not a zone name: letters, digits, "
                              f"'-' and '_', at most {ZONE_MAX} characters")
    return value


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class FirewallTable:
    """The node's rule set and interface settings, on the maps of the ABI."""

    def __init__(self, dp: Datapath, links: Links | None = None) -> None:
        abi = dp.abi
        self.links = links or Links()
        # a policer's id by name (None: no such policer): set by the node to its policer
        # table's; without one, no POLICE rule can be bound
        self.policer_id: Callable[[str], int | None] = lambda name: None
        m = dp.maps
        self.acl, self.tuple_map, self.cfg_map = m["acl_map"], m["acl_tuple_map"], m["acl_cfg_map"]
        self.rules_map, self.stats_map = m["acl_rules_map"], m["acl_stats_map"]
        self.intf_map, self.intf_stats = m["intf_map"], m["intf_stats_map"]
        self._key = abi.structs["xlb_acl_key"].codec
        self._val = abi.structs["xlb_acl_val"].codec
        self._tuple = abi.structs["xlb_acl_tuple"].codec
        self._cfg = abi.structs["xlb_acl_cfg"].codec
        self._rule = abi.structs["xlb_acl_rule"].codec
        self._intf = abi.structs["xlb_intf"].codec
        self._counter = abi.structs["xlb_counter"].codec
        self._pack_key = self._key.packer("tuple", "family", "proto", "ifindex", "sport",
                                          "dport", "src", "dst")
        self._pack_val = self._val.packer("rank", "rule_id", "target", "action")
        self.max_tuples = abi.const("XLB_ACL_TUPLES")
        self.f_policy_drop = abi.const("XLB_ACL_F_POLICY_DROP")
        self.has_src, self.has_dst = abi.const("XLB_ACL_HAS_SRC"), abi.const("XLB_ACL_HAS_DST")
        self.stat_max = abi.const("XLB_STAT_MAX")
        self._stat_names = abi.stat_names()
        self._lock = threading.Lock()
        self.generation = 0
        self.instance_id = os.urandom(8).hex()

        self._rules: dict[str, BoundRule] = {}
        for kraw, vraw in self.rules_map.items():
            r = self._decode_rule(int.from_bytes(kraw, "little"), vraw)
            self._rules[r.name] = r
        self.rule_ids = IdPool(self.stats_map.spec.max_entries,
                               (r.rule_id for r in self._rules.values()),
                               assume_dirty=dp.reused)
        self._intfs: dict[int, IntfConfig] = {}
        for kraw, vraw in self.intf_map.items():
            v = self._intf.unpack(vraw)
            ifindex = int.from_bytes(kraw, "little")
            self._intfs[ifindex] = IntfConfig(ifindex, v["slot"], Policy(v["policy"] or 1),
                                              _cstr(v["zone"]))
        self.slots = IdPool(self.intf_map.spec.max_entries,
                            [0, *(c.slot for c in self._intfs.values())],
                            assume_dirty=dp.reused)
        c = self._cfg.unpack(self.cfg_map.get(bytes(4)) or bytes(self._cfg.size))
        self._gen = c["gen"] & 1
        self._n_tuples = list(c["n_tuples"])
        self._flags = c["flags"]
        self._live = compile_rules(self._rules.values(), self.max_tuples)
        self._live_keys: list[bytes] = []
        self._restore()

    # -- encoding ------------------------------------------------------------------------

    def _tuple_base(self, gen: int) -> int:
        return gen * self.max_tuples

    def _key_bytes(self, tuple_id: int, k: Key) -> bytes:
        return self._pack_key(tuple_id, k[0], k[1], k[2], k[3], k[4],
                              k[5].to_bytes(16, "big"), k[6].to_bytes(16, "big"))

    def _encode(self, cls: Classifier, gen: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """(acl_map keys, values, acl_tuple_map values) of `cls` as generation `gen`."""
        keys: list[bytes] = []
        vals: list[bytes] = []
        tuples: list[bytes] = []
        base = self._tuple_base(gen)
        pack_val, key_bytes = self._pack_val, self._key_bytes
        for i, t in enumerate(cls.tuples):
            for k, e in t.entries.items():
                keys.append(key_bytes(base + i, k))
                vals.append(pack_val(e.rank, e.rule_id, e.target, int(e.action)))
            m = t.mask
            tuples.append(self._tuple.pack(min_rank=t.min_rank, mask=dict(
                family=m[0], proto=m[1], ifindex=m[2], sport=m[3], dport=m[4],
                src=m[5].to_bytes(16, "big"), dst=m[6].to_bytes(16, "big"))))
        return keys, vals, tuples

    def _record(self, r: BoundRule) -> bytes:
        m = r.spec.match
        src, src_len = _prefix(m.src)
        dst, dst_len = _prefix(m.dst)
        sp = m.src_ports or PortRange(0, 0)
        dp = m.dst_ports or PortRange(0, 0)
        return self._rule.pack(
            name=r.name.encode(), priority=r.spec.priority, action=int(r.spec.action),
            proto=int(m.protocol), family=m.family if (m.src or m.dst) else 0,
            src_len=src_len, dst_len=dst_len,
            has=(self.has_src if m.src else 0) | (self.has_dst if m.dst else 0),
            src=src.to_bytes(16, "big"), dst=dst.to_bytes(16, "big"),
            sport_first=sp.first, sport_last=sp.last, dport_first=dp.first,
            dport_last=dp.last, in_ifindex=r.in_ifindex, target=r.target,
            in_name=m.in_interface.encode(),
            target_name=(r.spec.redirect_interface or r.spec.mirror_interface).encode(),
            policer=r.spec.policer.encode())

    def _decode_rule(self, rule_id: int, raw: bytes) -> BoundRule:
        v = self._rule.unpack(raw)

        def prefix(addr: bytes, length: int) -> str:
            if v["family"] == V4:
                return f"{ipaddress.IPv4Address(addr[:4])}/{length}"
            return f"{ipaddress.IPv6Address(addr)}/{length}"

        def ports(first: int, last: int) -> PortRange | None:
            return None if first == last == 0 else PortRange(first, last)

        src = prefix(v["src"], v["src_len"]) if v["has"] & self.has_src else ""
        dst = prefix(v["dst"], v["dst_len"]) if v["has"] & self.has_dst else ""
        match = RuleMatch(src, dst, RuleProto(v["proto"]),
                          ports(v["sport_first"], v["sport_last"]),
                          ports(v["dport_first"], v["dport_last"]), _cstr(v["in_name"]))
        action = Action(v["action"])
        target = _cstr(v["target_name"])
        spec = RuleSpec(v["priority"], match, action,
                        target if action is Action.REDIRECT else "", _cstr(v["policer"]),
                        target if action is Action.MIRROR else "")
        return BoundRule(_cstr(v["name"]), spec, rule_id, v["in_ifindex"], v["target"])

    # -- acl_cfg -------------------------------------------------------------------------

    def _write_cfg(self) -> None:
        self.cfg_map.put(bytes(4), self._cfg.pack(gen=self._gen, n_tuples=self._n_tuples,
                                                  flags=self._flags))

    # -- start: agree with the maps --------------------------------------------------

    def _restore(self) -> None:
        """Make the classifier agree with the rule records: entries of the idle
        generation (a dpd stopped while staging) go; a live generation that is not what
        the records compile to is staged anew and swapped in."""
        live_base = self._tuple_base(self._gen)
        live: dict[bytes, bytes] = {}
        stale: list[bytes] = []
        for k, v in self.acl.items():
            if live_base <= int.from_bytes(k[:2], "little") < live_base + self.max_tuples:
                live[k] = v
            else:
                stale.append(k)
        if stale:
            self.acl.delete_batch(stale)
        keys, vals, tuples = self._encode(self._live, self._gen)
        n = self._n_tuples[self._gen]
        have_tuples = [self.tuple_map.get((live_base + i).to_bytes(4, "little"))
                       for i in range(n)]
        self._live_keys = list(live)
        if dict(zip(keys, vals, strict=True)) == live and have_tuples == tuples:
            log.info("firewall_restored", rules=len(self._rules), tuples=n,
                     entries=len(keys), stale=len(stale))
            return
        log.warning("firewall_rebuilt", rules=len(self._rules), entries_found=len(live),
                    entries_expected=len(keys))
        self._swap(self._live, [])

    # -- writing -------------------------------------------------------------------------

    def _swap(self, cls: Classifier, records: list[tuple[int, bytes | None]]) -> None:
        """Stage `cls` into the idle generation, write `records` (rule id -> record, None:
        delete), flip. On a map error nothing the datapath reads has changed."""
        idle = self._gen ^ 1
        keys, vals, tuples = self._encode(cls, idle)
        base = self._tuple_base(idle)
        done = 0
        old_records: list[tuple[bytes, bytes | None]] = []
        try:
            try:
                self.acl.put_batch(keys, vals)
                done = len(keys)
            except MapError as e:
                done = getattr(e, "done", 0)
                raise
            self.tuple_map.put_batch([(base + i).to_bytes(4, "little")
                                      for i in range(len(tuples))], tuples)
            for rid, rec in records:
                k = rid.to_bytes(4, "little")
                old_records.append((k, self.rules_map.get(k)))
                if rec is None:
                    self.rules_map.delete(k)
                else:
                    self.rules_map.put(k, rec)
        except MapError as err:
            self.acl.delete_batch(keys[:done] if done < len(keys) else keys)
            for k, old in reversed(old_records):
                if old is None:
                    self.rules_map.delete(k)
                else:
                    self.rules_map.put(k, old)
            if isinstance(err, MapFull):
                raise Exhausted(f"acl_map has no room for the rule set's {len(keys)} "
                                f"entries beside the live set's {len(self._live_keys)}: "
                                f"{err.strerror}") from err
            raise
        # the tuple count first (gen unchanged), then the flip: each write changes one field
        self._n_tuples[idle] = len(tuples)
        self._write_cfg()
        self._gen = idle
        self._write_cfg()
        # every new flow is judged by the new set now: the old generation goes, once a
        # packet that read the old gen just before the flip has finished its search (a
        # judgement takes microseconds; TC programs do not sleep)
        if self._live_keys:
            time.sleep(FLIP_GRACE_S)
        self.acl.delete_batch(self._live_keys)
        self._live, self._live_keys = cls, keys

    def _install(self, rules: dict[str, BoundRule], fresh: list[BoundRule],
                 gone: list[BoundRule], new_ids: list[int]) -> None:
        """Swap in `rules`: `fresh` are the new and changed ones (their records are
        written), `gone` the removed ones, `new_ids` the counter slots to zero."""
        cls = compile_rules(rules.values(), self.max_tuples)
        self.stats_map.zero(self.rule_ids.take_dirty(new_ids))
        records: list[tuple[int, bytes | None]] = [(r.rule_id, self._record(r)) for r in fresh]
        records += [(r.rule_id, None) for r in gone]
        self._swap(cls, records)
        self._rules = rules
        log.info("firewall_swapped", rules=len(rules), tuples=len(cls.tuples),
                 entries=cls.entries, gen=self._gen)

    def _bind(self, i: int, name: str, spec: RuleSpec, rule_id: int) -> BoundRule:
        def resolve(ifname: str, field: str) -> int:
            if not ifname:
                return 0
            ifindex = self.links.index(ifname)
            if ifindex is None:
                raise ValidationError(f"rules[{i}].spec.{field}: no interface "
                                      f"{quote(ifname)} on this node")
            return ifindex

        if spec.action is Action.POLICE:
            pid = self.policer_id(spec.policer)
            if pid is None:
                raise ValidationError(f"rules[{i}].spec.policer: no policer "
                                      f"{quote(spec.policer)} on this node")
            target = pid
        elif spec.action is Action.MIRROR:
            target = resolve(spec.mirror_interface, "mirror_interface")
        else:
            target = resolve(spec.redirect_interface, "redirect_interface")
        return BoundRule(name, spec, rule_id,
                         resolve(spec.match.in_interface, "match.in_interface"), target)

    def policer_rules(self, policer: str) -> list[str]:
        """The names of the rules that charge `policer` (its deletion is refused while
        any does)."""
        with self._lock:
            return sorted(n for n, r in self._rules.items()
                          if r.spec.action is Action.POLICE and r.spec.policer == policer)

    def put(self, rules: list[tuple[str, RuleSpec]]) -> int:
        """Upsert rules by name: the node's whole new set is staged and swapped in. All
        or nothing: ValidationError (unknown interface), Exhausted (too many rules,
        shapes or entries)."""
        with self._lock:
            if rules:
                self.generation += 1
            names = [n for n, _ in rules]
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise ValidationError(f"rules: {quote(dup)} appears more than once in the batch")
            new = dict(self._rules)
            fresh: list[BoundRule] = []
            gone: list[BoundRule] = []
            want_ids = sum(1 for n in names if n not in self._rules)
            new_ids = self.rule_ids.reserve(want_ids, "firewall rules")
            ids = iter(new_ids)
            try:
                for i, (name, spec) in enumerate(rules):
                    prev = self._rules.get(name)
                    r = self._bind(i, name, spec, prev.rule_id if prev else next(ids))
                    if prev == r:
                        continue
                    new[name] = r
                    fresh.append(r)
                if fresh:
                    self._install(new, fresh, gone, new_ids)
            except BaseException:
                self.rule_ids.rollback()
                raise
            self.rule_ids.commit()
            return len(rules)

    def delete(self, names: list[str]) -> int:
        with self._lock:
            if names:
                self.generation += 1
            gone = [self._rules[n] for n in dict.fromkeys(names) if n in self._rules]
            if gone:
                dead = set(names)
                new = {n: r for n, r in self._rules.items() if n not in dead}
                self._install(new, [], gone, [])
                self.rule_ids.release(r.rule_id for r in gone)
            return len(gone)

    # -- reading -------------------------------------------------------------------------

    def rules(self) -> list[BoundRule]:
        """The rules as the node's records hold them (read back from acl_rules_map), in
        deciding order."""
        return ranked(self._decode_rule(int.from_bytes(k, "little"), v)
                      for k, v in self.rules_map.items())

    def count(self) -> int:
        with self._lock:
            return len(self._rules)

    def summary(self) -> tuple[int, int]:
        with self._lock:
            return self.generation, len(self._rules)

    @property
    def classifier(self) -> Classifier:
        return self._live

    def stats(self) -> list[tuple[str, Counter]]:
        """Per-rule packets and bytes (packets a rule decided), in deciding order."""
        with self._lock:
            rules = ranked(self._rules.values())
        return [(r.name, self._sum(self.stats_map, r.rule_id)) for r in rules]

    def _sum(self, m: Any, idx: int) -> Counter:
        raw = m.get(idx.to_bytes(4, "little"))
        packets = nbytes = 0
        for part in (m.split(raw) if raw else []):
            c = self._counter.unpack(part)
            packets += c["packets"]
            nbytes += c["bytes"]
        return Counter(packets, nbytes)

    # -- the model -----------------------------------------------------------------------

    @property
    def policy_drop(self) -> bool:
        return bool(self._flags & self.f_policy_drop)

    def judge(self, pkt: Packet) -> Verdict:
        """What the datapath decides now for `pkt` (a packet with no conntrack entry)."""
        policies = {i: c.policy for i, c in self._intfs.items()}
        return self._live.judge(pkt, policies, self.policy_drop)

    def flush_flows(self, ct: Any) -> int:
        """End the tracked flows (both entries) that the live set drops: each ORIG
        entry's tuple and ingress interface judged by the model. Returns the number of
        flows ended."""
        if not self._live.tuples and not self.policy_drop:
            return 0
        orig = ct.states.orig
        policies = {i: c.policy for i, c in self._intfs.items()}
        items = {k: (ct.key.unpack(k), ct.val.unpack(v)) for k, v in ct.map.items()}
        doomed: list[bytes] = []
        flows = 0
        for raw, (k, v) in items.items():
            if v["dir"] != orig:
                continue
            pkt = Packet(V4, k["proto"], v["in_ifindex"],
                         int.from_bytes(k["saddr"], "big") << 96,
                         int.from_bytes(k["daddr"], "big") << 96, k["sport"], k["dport"])
            if not self._live.judge(pkt, policies, self.policy_drop).drops:
                continue
            flows += 1
            doomed.append(raw)
            peer = ct.peer_key(k, v)
            pv = items.get(peer)
            if pv is not None and pv[1]["dir"] != orig and pv[1]["nat_addr"] == k["daddr"] \
                    and pv[1]["nat_port"] == k["dport"]:
                doomed.append(peer)
        if doomed:
            ct.map.delete_batch(doomed)
            log.info("firewall_flows_flushed", flows=flows, entries=len(doomed))
        return flows

    # -- interfaces ----------------------------------------------------------------------

    def interfaces(self) -> list[IntfConfig]:
        """Every interface with an intf_map entry."""
        with self._lock:
            return list(self._intfs.values())

    def interface(self, ifindex: int) -> IntfConfig | None:
        with self._lock:
            return self._intfs.get(ifindex)

    def _write_intf(self, c: IntfConfig) -> None:
        self.intf_map.put(c.ifindex.to_bytes(4, "little"), self._intf.pack(
            slot=c.slot, policy=int(c.policy), zone=c.zone.encode()))

    def _sync_policy_flag(self) -> None:
        drop = any(c.policy is Policy.DROP for c in self._intfs.values())
        flags = (self._flags | self.f_policy_drop) if drop else (self._flags & ~self.f_policy_drop)
        if flags != self._flags:
            self._flags = flags
            self._write_cfg()

    def ensure_interface(self, ifindex: int) -> IntfConfig:
        """The interface's settings, giving it an entry (its own counter slot, policy
        allow) when it has none: an attached interface counts its drops apart."""
        with self._lock:
            c = self._intfs.get(ifindex)
            if c is not None:
                return c
            return self._new_intf(ifindex, Policy.ALLOW, "")

    def _new_intf(self, ifindex: int, policy: Policy, zone: str) -> IntfConfig:
        slot = self.slots.reserve(1, "interfaces with counters")[0]
        self.slots.commit()
        dirty = self.slots.take_dirty([slot])
        if dirty:
            base = slot * self.stat_max
            self.intf_stats.zero(list(range(base, base + self.stat_max)))
        c = IntfConfig(ifindex, slot, policy, zone)
        try:
            self._write_intf(c)
        except MapError as err:
            self.slots.release([slot])
            if isinstance(err, MapFull):
                raise Exhausted(f"intf_map has no room: {err.strerror}") from err
            raise
        self._intfs[ifindex] = c
        return c

    def set_interface(self, name: str, zone: str, policy: Policy) -> IntfConfig:
        """Set an interface's zone and default policy (FAILED_PRECONDITION if the node
        has no such interface)."""
        zone = parse_zone(zone)
        ifindex = self.links.index(name)
        if ifindex is None:
            raise PreconditionError(f"name: no interface {quote(name)} on this node")
        with self._lock:
            prev = self._intfs.get(ifindex)
            if prev is None:
                c = self._new_intf(ifindex, policy, zone)
            else:
                c = IntfConfig(ifindex, prev.slot, policy, zone)
                self._write_intf(c)
                self._intfs[ifindex] = c
            self._sync_policy_flag()
            log.info("interface_configured", name=name, ifindex=ifindex, zone=zone,
                     policy=policy.name)
            return c

    def interface_drops(self, ifindex: int) -> dict[str, int]:
        """Drops by reason (the global counters' names) of packets that arrived on the
        interface; {} when it has no counter slot of its own."""
        c = self.interface(ifindex)
        if c is None:
            return {}
        out = {}
        base = c.slot * self.stat_max
        for idx, name in self._stat_names.items():
            if not name.startswith("drop"):
                continue
            n = self._sum(self.intf_stats, base + idx).packets
            if n:
                out[name] = n
        return out


def parse_policy(api_value: int, field: str = "default_policy") -> Policy:
    if api_value == 0:
        return Policy.ALLOW
    try:
        return Policy(api_value)
    except ValueError:
        raise ValidationError(f"{field}: unknown policy {api_value}; use DEFAULT_POLICY_ALLOW "
                              "or DEFAULT_POLICY_DROP") from None

