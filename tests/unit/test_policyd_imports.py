"""What policyd's modules may import: the CLI not the server, and nothing of policyd dpd.

Each check runs in a fresh interpreter, where sys.modules shows what an import pulled in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli_does_not_load_the_server():
    proc = run_python(
        "import policyd.cli, sys; "
        "assert 'policyd.server' not in sys.modules and 'policyd.reconciler' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('policyd'))"
    )
    assert proc.returncode == 0, proc.stderr


def test_policyd_imports_nothing_from_dpd():
    modules = sorted(
        f"policyd.{p.stem}" for p in (ROOT / "policyd").glob("*.py") if p.stem != "__init__"
    )
    proc = run_python(
        f"import importlib, sys\n"
        f"for name in {modules!r}:\n"
        f"    importlib.import_module(name)\n"
        f"dpd = sorted(m for m in sys.modules if m == 'dpd' or m.startswith('dpd.'))\n"
        f"assert not dpd, dpd\n"
    )
    assert proc.returncode == 0, proc.stderr
