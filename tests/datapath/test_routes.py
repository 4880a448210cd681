"""Forwarding by the routes dpd installs, through the real fast path (BPF_PROG_TEST_RUN,
redirect on): longest prefix match, ECMP spread and stickiness, weights, and the same
next hop as the kernel picks for the 5-tuple. The probe runs in a namespace of its own
(tests/datapath/routes_probe.py): routes go into that namespace's FIB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root

MACS = [f"02:00:5e:00:01:{i:02x}" for i in range(8)]


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    require_root()
    from lab import netns

    ns = f"rtdp{os.getpid()}"
    netns.create(ns)
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                              "tests.datapath.routes_probe"], capture_output=True, text=True,
                             timeout=300, env=netns.python_env(), cwd=netns.REPO_ROOT)
    finally:
        netns.delete(ns)
    assert res.returncode == 0, res.stderr[-4000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_longest_prefix_wins(probe: dict[str, Any]) -> None:
    assert probe["lpm"] == {"near": MACS[1], "far": MACS[0]}


def test_ecmp_spreads_and_keeps_a_flow_on_its_next_hop(probe: dict[str, Any]) -> None:
    e = probe["ecmp"]
    share = Counter(e["first"].values())
    assert set(share) == {MACS[0], MACS[1]} and min(share.values()) >= 32, share
    assert e["again"] == e["first"]  # the flow's later packets (conntrack hits)
    assert e["fresh"] == e["first"]  # the same tuple after a conntrack flush


def test_the_datapath_picks_the_kernels_next_hop(probe: dict[str, Any]) -> None:
    e = probe["ecmp"]
    assert e["first"] == e["kernel"]


def test_weights_and_eight_next_hops(probe: dict[str, Any]) -> None:
    weighted = Counter(probe["weighted"].values())
    assert weighted[MACS[0]] >= 190, weighted  # 7/8 of 256 = 224
    eight = Counter(probe["eight"].values())
    assert set(eight) == set(MACS) and min(eight.values()) >= 30, eight  # 64 each expected
