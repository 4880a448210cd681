"""Shared test policy: root-only layers skip on a laptop without privileges, but never
under CI=true, where a missing capability is a failure."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("this test needs root (BPF, network namespaces); CI runs as root")
    pytest.skip("needs root")


@pytest.fixture(autouse=True)
def _root_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root"):
        require_root()
