"""The reconciler's on_pass hook: every pass is reported, failed ones too, and an
observer that raises does not stop the worker."""

from __future__ import annotations

import threading
from dataclasses import replace

from policyd.worker import PassReport


class Passes:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, PassReport]] = []

    def __call__(self, node: str, report: PassReport) -> None:
        with self.lock:
            self.seen.append((node, report))

    def reports(self, node: str) -> list[PassReport]:
        with self.lock:
            return [r for n, r in self.seen if n == node]


def test_on_pass_reports_each_pass(fast, wait_for, policyd, fake_node, client_for):
    passes = Passes()
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, on_pass=passes)))
    client.register_node("node-a", node.address)
    stored = client.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"])

    def put_pass() -> PassReport | None:
        return next((r for r in passes.reports("node-a") if r.result and r.result.put), None)

    report = wait_for(put_pass, what="a pass that put the service")
    assert report.result is not None and report.error == ""
    assert (report.generation, report.result.put, report.result.services) == (
        stored.generation, 1, 1)  # fmt: skip
    assert report.started <= report.ended
    assert 0 <= report.snapshot_s <= report.ended - report.started


def test_on_pass_reports_failed_passes(fast, wait_for, policyd, fake_node, client_for):
    passes = Passes()
    node = fake_node("down")  # never started: nothing listens on its socket
    client = client_for(policyd(settings=replace(fast, on_pass=passes)))
    client.register_node("node-down", node.address)
    failed = wait_for(
        lambda: next((r for r in passes.reports("node-down") if r.result is None), None),
        what="a failed pass",
    )
    assert failed.error.startswith("UNAVAILABLE")
    assert failed.generation == 0  # the store's revision (registering moves none)


def test_a_failing_observer_does_not_stop_the_worker(fast, wait_for, policyd, fake_node,
                                                     client_for):
    calls = []

    def broken(node: str, report: PassReport) -> None:
        calls.append(node)
        raise RuntimeError("observer bug")

    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, on_pass=broken)))
    client.register_node("node-a", node.address)
    stored = client.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"])
    client.wait_synced(["node-a"], timeout=10, generation=stored.generation)
    assert calls and len(node.datapath.snapshot()) == 1
