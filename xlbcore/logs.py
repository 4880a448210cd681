"""structlog configuration shared by the xlb daemons (generic: nothing daemon-specific here).

One event per line, either logfmt-style ``key=value`` (``kv``) or JSON (``json``). Records
that other libraries emit through the standard ``logging`` module go through the same
renderer, so a daemon's stderr stays one format. Multi-line values (tracebacks) are
escaped onto the event's line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

FORMATS = ("kv", "json")
LEVELS = ("debug", "info", "warning", "error")


def _renderer(fmt: str) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    if fmt == "kv":
        return structlog.processors.LogfmtRenderer(
            key_order=["ts", "level", "event"], drop_missing=True, bool_as_flag=False
        )
    raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")


def configure_logging(fmt: str = "kv", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger) to write to `stream` (stderr).

    `fmt` is ``kv`` or ``json``; `level` one of debug, info, warning, error.
    Safe to call more than once (the last call wins).
    """
    level_no = logging.getLevelNamesMapping().get(level.upper())
    if level_no is None or level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    renderer = _renderer(fmt)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    # Third-party records (grpc, asyncio, ...) through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_xlb_handler", False):
            root.removeHandler(old)
    handler._xlb_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # Other libraries' debug output is noise for an operator; theirs starts at INFO.
    root.setLevel(max(level_no, logging.INFO))
