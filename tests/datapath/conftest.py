"""The datapath loaded once per session on a private bpffs mount, maps reset per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root


@dataclass
class Loaded:
    node: object
    settings: object


@pytest.fixture(scope="session")
def loaded() -> Iterator[Loaded]:
    require_root()
    from dpd.loader import Settings
    from dpd.node import Node, cleanup

    root = tempfile.mkdtemp(prefix="xlb-dp-")
    settings = Settings(name="dptest", bpf_root=root, max_services=64, max_backends=256,
                        ct_size=4096, redirect=False)
    node = None
    try:
        node = Node.load(settings, ct_aging_interval=0)
        yield Loaded(node, settings)
    finally:  # also when loading failed: no pin or mount is left behind
        if node is not None:
            node.close()
        cleanup(settings)
        os.rmdir(root)


@pytest.fixture
def node(loaded: Loaded) -> Iterator[object]:
    n = loaded.node
    n.delete_services([s.key for s in n.list_services()])  # type: ignore[attr-defined]
    n.flush_conntrack()  # type: ignore[attr-defined]
    n.reset_global_stats()  # type: ignore[attr-defined]
    yield n
