"""kube-proxy-style rule sets, generated as text for one ``iptables-restore`` / ``nft -f``.

The shapes follow what kube-proxy writes for ClusterIP services:

- iptables mode: ``nat PREROUTING/OUTPUT -> KUBE-SERVICES``, one rule per service
  (``-d VIP/32 -p tcp --dport P -j KUBE-SVC-x``), each ``KUBE-SVC-x`` picks a
  ``KUBE-SEP-y`` with ``-m statistic --mode random --probability 1/(n-i)`` and each
  ``KUBE-SEP-y`` DNATs to its endpoint (with the hairpin masquerade mark rule).
- nftables mode: one ``ip kube-proxy`` table, a verdict map ``service-ips`` keyed
  ``ipv4_addr . inet_proto . inet_service`` -> ``goto service-x``; service chains pick an
  endpoint chain with ``numgen random mod N vmap {...}``; endpoint chains ``dnat``.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.services import ServiceSpec

NFT_TABLE = "kube-proxy"


def _svc_chain(s: ServiceSpec) -> str:
    return f"KUBE-SVC-{s.key_hash()}"


def _sep_chain(s: ServiceSpec, i: int) -> str:
    ep = s.endpoints[i]
    return f"KUBE-SEP-{s.key_hash(f'/{ep.ip}:{ep.port}')}"


def iptables_restore_text(services: Sequence[ServiceSpec]) -> str:
    chains = ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
    rules = [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" "
        "-j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring "
        "SNAT\" -j MASQUERADE --random-fully",
    ]
    svc_rules: list[str] = []
    for s in services:
        svc = _svc_chain(s)
        chains.append(svc)
        svc_rules.append(
            f"-A KUBE-SERVICES -d {s.vip}/32 -p {s.proto} -m comment --comment "
            f"\"{s.name}:p{s.port} cluster IP\" -m {s.proto} --dport {s.port} -j {svc}"
        )
        n = len(s.endpoints)
        for i, ep in enumerate(s.endpoints):
            sep = _sep_chain(s, i)
            chains.append(sep)
            comment = f"-m comment --comment \"{s.name}:p{s.port} -> {ep.ip}:{ep.port}\""
            if i < n - 1:
                prob = 1.0 / (n - i)
                rules.append(f"-A {svc} {comment} -m statistic --mode random "
                             f"--probability {prob:.11f} -j {sep}")
            else:
                rules.append(f"-A {svc} {comment} -j {sep}")
            rules.append(f"-A {sep} -s {ep.ip}/32 -m comment --comment \"{s.name}:p{s.port}\" "
                         f"-j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p {s.proto} -m comment --comment \"{s.name}:p{s.port}\" "
                         f"-m {s.proto} -j DNAT --to-destination {ep.ip}:{ep.port}")
    out = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]"]
    out += [f":{c} - [0:0]" for c in chains]
    out += svc_rules  # KUBE-SERVICES in service order: the measured one last
    out += rules
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def _nft_svc_chain(s: ServiceSpec) -> str:
    return f"service-{s.key_hash()[:8]}-{s.name}/{s.proto}/p{s.port}"


def _nft_ep_chain(s: ServiceSpec, i: int) -> str:
    ep = s.endpoints[i]
    return (f"endpoint-{s.key_hash(f'/{ep.ip}:{ep.port}')[:8]}-{s.name}/{s.proto}/p{s.port}"
            f"__{ep.ip}/{ep.port}")


def nft_text(services: Sequence[ServiceSpec]) -> str:
    t = f"ip {NFT_TABLE}"
    lines = [
        f"add table {t}",
        f"add chain {t} mark-for-masquerade",
        f"add rule {t} mark-for-masquerade mark set mark or 0x4000",
        f"add chain {t} masquerading",
        f"add rule {t} masquerading mark and 0x4000 == 0 return",
        f"add rule {t} masquerading mark set mark xor 0x4000",
        f"add rule {t} masquerading masquerade fully-random",
        f"add chain {t} services",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}",
        f"add rule {t} nat-prerouting jump services",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add rule {t} nat-output jump services",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
    ]
    elements: list[str] = []
    for s in services:
        svc = _nft_svc_chain(s)
        lines.append(f"add chain {t} {svc}")
        eps = []
        for i, ep in enumerate(s.endpoints):
            epc = _nft_ep_chain(s, i)
            lines.append(f"add chain {t} {epc}")
            lines.append(f"add rule {t} {epc} ip saddr {ep.ip} jump mark-for-masquerade")
            lines.append(f"add rule {t} {epc} meta l4proto {s.proto} dnat to {ep.ip}:{ep.port}")
            eps.append(f"{i} : goto {epc}")
        lines.append(f"add rule {t} {svc} numgen random mod {len(s.endpoints)} "
                     f"vmap {{ {', '.join(eps)} }}")
        elements.append(f"{s.vip} . {s.proto} . {s.port} : goto {svc}")
    # one element statement per 1000 keeps single lines reasonable
    for i in range(0, len(elements), 1000):
        lines.append(f"add element {t} service-ips {{ {', '.join(elements[i:i + 1000])} }}")
    return "\n".join(lines) + "\n"
