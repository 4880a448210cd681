"""Reading a docs/ page's examples as written, for the tests that run them: a section of
the page, its fenced blocks, and the commands of a sh block as argument lists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def doc_section(doc: str, heading: str = "## Through policyd") -> str:
    """docs/`doc` from `heading` to the next heading of its level (or the page's end)."""
    text = (DOCS / doc).read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks of `text`, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a sh block: continued lines joined, a quoted argument may span
    lines, comment lines and trailing comments dropped."""
    out, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        if not pending:
            line = line.split(" # ")[0].strip()
            if not line or line.startswith("#"):
                continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            argv = shlex.split(pending)
        except ValueError:  # a quoted argument goes on on the next line
            continue
        pending = ""
        out.append(argv)
    return out
