"""xlb.dpd.v1 firewall and interface methods (PutFirewallRules, SetInterfaceConfig, ...).

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.firewall calls."""

from __future__ import annotations


class FirewallRpcs:
    pass
