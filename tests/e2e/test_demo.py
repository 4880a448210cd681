"""`make run` (python -m lab.demo) end to end: it exits 0 and what it prints shows the
issue's three things working, a mirrored packet captured, a policed stream delivered at
the policer's rate, and a trapped packet's event through policyd; and it leaves no
namespace behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lab import netns

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def demo() -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "lab.demo", "--backends", "2",
                          "--requests", "20"], capture_output=True, text=True,
                         cwd=netns.REPO_ROOT, env=netns.python_env(), timeout=600)
    sys.stderr.write(f"--- demo stderr ---\n{res.stderr[-4000:]}\n")
    return res.returncode, res.stdout


def _line(out: str, pattern: str) -> re.Match[str]:
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{out}"
    return m


def test_the_demo_succeeds_and_cleans_up(demo):
    rc, out = demo
    assert rc == 0, out
    assert out.rstrip().endswith("cleaned up: namespaces, dpd pins and bpffs mount, processes")
    lb_ns = _line(out, r"^topology: client \S+ -> lb node \((\S+)\)").group(1)
    assert lb_ns not in netns.list_namespaces()


def test_the_demo_shows_a_mirrored_packet(demo):
    _, out = demo
    m = _line(out, r"the first (\d+) copies captured on bmmir1; the mirror counted (\d+)$")
    assert int(m.group(1)) > 0 and int(m.group(2)) >= int(m.group(1))
    _line(out, r"^  first copy: TCP 198\.18\.0\.2:\d+ -> 198\.19\.0\.10:80 \[S\] \(\d+ bytes\)$")


def test_the_demo_shows_a_policed_stream(demo):
    _, out = demo
    m = _line(out, r"offered ([\d.]+) Mbit/s \((\d+) datagrams\), delivered ([\d.]+) Mbit/s "
                   r"\((\d+) received on be1\)$")
    offered, delivered = float(m.group(1)), float(m.group(3))
    assert offered >= 14.4 and abs(delivered - 8.0) <= 0.8, m.group(0)
    _line(out, r"^applied policer demo-c0-in \(c0: 8\.0 Mbit/s, burst 15000 bytes\) at revision "
               r"\d+: node1 SYNCED in \d+ ms, 1 policer\(s\)$")
    m = _line(out, r"^  policer demo-c0-in on node1: passed (\d+) packets, dropped (\d+); "
                   r"datapath drop_policer \+(\d+)$")
    assert int(m.group(2)) > 0.35 * (int(m.group(1)) + int(m.group(2)))
    assert m.group(2) == m.group(3)
    _line(out, r"POLICER_DROP events from policyd's WatchEvents .*: node node1, interface c0, "
               r"policer demo-c0-in, dropped [1-9]\d* so far$")


def test_the_demo_shows_a_trapped_packet_event(demo):
    _, out = demo
    # one datagram, or one more each time the event did not come (the stream opening)
    sent = _line(out, r"^  (\d) UDP datagram\(s\) 198\.18\.0\.2 -> 198\.19\.0\.10:53: \1 "
                      r"answered").group(1)
    _line(out, r"^  event from policyd's WatchEvents: node node1, TRAP, reason demo-trap-dns, "
               r"interface c0$")
    _line(out, r"^    UDP 198\.18\.0\.2:\d+ -> 198\.19\.0\.10:53, (\d+) of \1 bytes captured$")
    _line(out, r"^    first bytes: ([0-9a-f]{2} ){28}\.\.\. payload b'WHO'$")
    _line(out, rf"^  datapath trap counter \+{sent}$")
    _line(out, r"^removed the policer and the trap rule: .*, 0 policer\(s\) left$")
