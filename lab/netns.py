"""Small helpers around ``ip netns``: namespaces, commands in a namespace, sysctl.

Commands run through ``ip netns exec NS argv...`` (a subprocess), which is simple and
robust: sockets opened by the command live in the namespace. Every child is started in
its own session (process group) so that a timeout or a cleanup can end it together with
anything it spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
REPO_ROOT = Path(__file__).resolve().parent.parent


class NetnsError(RuntimeError):
    """A command in (or about) a namespace failed."""


def _ip(args: Sequence[str], check: bool = True, timeout: float = 30.0) -> str:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (first word of each line)."""
    out = _ip(["netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def create(name: str) -> None:
    """Create namespace ``name`` and bring its loopback up."""
    _ip(["netns", "add", name])
    _ip(["-n", name, "link", "set", "lo", "up"])
    log.debug("netns.created", ns=name)


def pids(name: str) -> list[int]:
    """Process ids whose network namespace is ``name``."""
    if not exists(name):
        return []
    out = _ip(["netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_pids(name: str, grace: float = 2.0) -> None:
    """End the processes inside namespace ``name`` (by pid): SIGTERM, then SIGKILL."""
    victims = [p for p in pids(name) if p != os.getpid()]
    if not victims:
        return
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        victims = [p for p in victims if _alive(p)]
        if not victims:
            return
        time.sleep(0.05)
    for pid in victims:
        _signal(pid, signal.SIGKILL)
    log.warning("netns.killed_leftover_pids", ns=name, pids=victims)


def delete(name: str) -> None:
    """Delete namespace ``name`` (idempotent); ends its processes first."""
    if not exists(name):
        return
    kill_pids(name)
    _ip(["netns", "del", name], check=False)
    if exists(name):
        raise NetnsError(f"namespace {name} still present after 'ip netns del'")
    log.debug("netns.deleted", ns=name)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive; reap it if it is our child
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().split(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return False


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``python -m lab.*`` children: the repo root on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    if extra:
        env.update(extra)
    return env


def _argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    args = [str(a) for a in argv]
    return ["ip", "netns", "exec", ns, *args] if ns else args


def kill_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """End a Popen started by :func:`popen` and its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        # the group may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("netns.process_unkillable", pid=proc.pid)


def run(
    ns: str | None,
    argv: Sequence[str],
    check: bool = True,
    timeout: float | None = 60.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in namespace ``ns`` (None: the current one) and capture its output.

    On timeout the whole process group is killed and :class:`NetnsError` raised; with
    ``check`` a non-zero exit raises :class:`NetnsError` with the command's stderr.
    """
    full = _argv(ns, argv)
    proc = subprocess.Popen(
        full,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_group(proc, grace=1.0)
        raise NetnsError(f"timeout after {timeout}s in ns {ns}: {' '.join(full)}") from exc
    except BaseException:
        kill_group(proc, grace=1.0)
        raise
    res = subprocess.CompletedProcess(full, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"exit {proc.returncode} in ns {ns}: {' '.join(full)}: {err.strip()[-2000:]}"
        )
    return res


def popen(
    ns: str | None,
    argv: Sequence[str],
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    text: bool = True,
) -> subprocess.Popen[str]:
    """Start ``argv`` in namespace ``ns`` in its own process group (see :func:`kill_group`)."""
    return subprocess.Popen(
        _argv(ns, argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        text=text,
        start_new_session=True,
    )


def sysctl(ns: str | None, settings: Mapping[str, str | int]) -> None:
    """Set sysctls (``{"net.ipv4.ip_forward": 1, ...}``) in namespace ``ns``."""
    if not settings:
        return
    args = ["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in settings.items()]
    run(ns, args, timeout=15)


def sysctl_get(ns: str | None, key: str) -> str:
    return run(ns, ["sysctl", "-n", key], timeout=15).stdout.strip()
