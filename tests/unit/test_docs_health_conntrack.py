"""The grpcurl examples of docs/health.md and docs/conntrack.md, run as written (only the
socket paths changed) with the real grpcurl against dpd's servicer over in-memory maps
and an in-process policyd. Without grpcurl they skip (fail under CI=true)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_policyd_grpcurl import datapath_socket, grpcurl  # noqa: F401 - fixtures

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(doc: str) -> list[str]:
    """The ```sh blocks of `doc` that call grpcurl."""
    text = (DOCS / doc).read_text()
    return [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "grpcurl" in b]


def run_block(block: str, grpcurl: str, dpd: str, policyd: str) -> str:  # noqa: F811
    script = block.replace("/run/xlb/dpd.sock", dpd).replace("/run/xlb/policyd.sock", policyd)
    env = dict(os.environ, PATH=f"{Path(grpcurl).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, f"{block}\n--- stderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("doc", ["health.md", "conntrack.md"])
def test_the_docs_grpcurl_examples_work_as_written(doc, grpcurl, datapath_socket,  # noqa: F811
                                                   policyd):
    policyd_socket = str(policyd().address.removeprefix("unix:"))
    found = blocks(doc)
    assert found, f"docs/{doc} has no grpcurl example"
    out = "".join(run_block(b, grpcurl, datapath_socket, policyd_socket) for b in found)
    if doc == "health.md":
        assert '"health": "HEALTH_STATE_UNKNOWN"' in out  # ListServices' endpoint_status
        assert '"http_path": "/healthz"' in out or '"httpPath": "/healthz"' in out
    else:
        assert '"conntrack"' in out
