"""The package layering of docs/architecture.md, checked on the source: xlbcore
imports neither daemon; dpd and policyd import each other in no direction (they meet
only at the generated API); only tests, lab and bench sit above them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "xlbcore": {"dpd", "policyd", "lab", "bench", "tests"},
    "dpd": {"policyd", "lab", "bench", "tests"},
    "policyd": {"dpd", "lab", "bench", "tests"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_no_package_imports_one_above_or_beside_it():
    offences = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_packages(path) & banned
            if bad:
                offences.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert offences == []
