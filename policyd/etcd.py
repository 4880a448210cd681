"""A small etcd v3 client over etcd's gRPC gateway (JSON over HTTP), standard library only.

Why not a PyPI client: ``etcd3`` is unmaintained and its generated stubs break with the
protobuf 4+ runtime policyd uses; its forks pin old grpcio/protobuf too. Generating stubs
from etcd's protos drags in gogoproto and google.api annotations. The JSON gateway is part
of every etcd v3 server (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/*``, ``/v3/watch``),
is stable across 3.4 and 3.5, and needs nothing beyond ``http.client``. policyd uses a
handful of calls: range, transactions with compares, leases, and a watch used as a wake-up.

Keys and values are bytes (base64 on the wire, as the gateway wants); int64 fields come
back as strings and are turned into ints here. Any transport failure or non-200 answer is
an ``EtcdError`` (a ``UnavailableError``: gRPC UNAVAILABLE when it reaches a client).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from xlbcore.errors import UnavailableError, ValidationError, quote

TIMEOUT = 2.0  # seconds for one request (a lease of ~2 s must be renewable in time)


class EtcdError(UnavailableError):
    """etcd could not be reached or refused a request (-> UNAVAILABLE)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def parse_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of ``etcd://HOST:PORT`` or ``http://HOST:PORT``; ValidationError else."""
    parts = urlsplit(url)
    if parts.scheme not in ("etcd", "http") or not parts.hostname or parts.path not in ("", "/"):
        raise ValidationError(f"store: {quote(url)} is not etcd://HOST:PORT or http://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValidationError(f"store: {quote(url)} has a bad port") from None
    return parts.hostname, port


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(item.get("key", "")), _unb64(item.get("value", "")),
                    int(item.get("create_revision", 0)), int(item.get("mod_revision", 0)),
                    int(item.get("lease", 0)))


class Etcd:
    """One etcd endpoint. Thread-safe: each thread keeps its own HTTP connection."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        self.url = url
        self.host, self.port = parse_endpoint(url)
        self.timeout = timeout
        self._local = threading.local()
        self._watches: set[http.client.HTTPConnection] = set()  # open watch streams
        self._watches_lock = threading.Lock()

    # -- transport ------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to /v3/`path`; the decoded answer. EtcdError on any failure (the
        connection is dropped and made again at the next call)."""
        data = json.dumps(body).encode()
        try:
            conn = self._conn()
            conn.request("POST", f"/v3/{path}", data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise EtcdError(f"etcd {self.host}:{self.port}: {exc or type(exc).__name__}") from None
        if resp.status != 200:
            self.close()
            raise EtcdError(f"etcd {self.host}:{self.port}: {path}: HTTP {resp.status}:"
                            f" {raw[:200].decode(errors='replace')}")
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    # -- kv -------------------------------------------------------------------------

    def get(self, key: bytes) -> KeyValue | None:
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def range(self, start: bytes, end: bytes, limit: int = 0,
              revision: int = 0) -> tuple[list[KeyValue], int]:
        """Keys in [start, end), ascending, at most `limit` (0: all), as of store revision
        `revision` (0: now); with the store's revision the read was at."""
        body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end)}
        if limit:
            body["limit"] = limit
        if revision:
            body["revision"] = revision
        answer = self.call("kv/range", body)
        return ([_kv(i) for i in answer.get("kvs", [])],
                int(answer.get("header", {}).get("revision", 0)))

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: bytes) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, dict[str, Any]]:
        """An etcd transaction (compares and operations as the gateway spells them, see
        ``compare_*`` and ``op_*``); (succeeded, the whole answer)."""
        answer = self.call("kv/txn", {"compare": compare, "success": success,
                                      "failure": failure or []})
        return bool(answer.get("succeeded", False)), answer

    # -- leases ---------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew `lease` once; its remaining TTL (0: it has expired)."""
        return int(self.call("lease/keepalive", {"ID": lease}).get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": lease})

    # -- watch ----------------------------------------------------------------------

    def watch(self, prefix: bytes, start_revision: int, timeout: float) -> Iterator[int]:
        """Watch the keys under `prefix` from `start_revision`: yields the revision of each
        batch of events as it arrives. Ends (returns) when nothing arrives for `timeout`
        seconds or the stream breaks; the caller re-reads and watches again."""
        body = json.dumps({"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
            "start_revision": start_revision}}).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        with self._watches_lock:
            self._watches.add(conn)
        try:
            conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return
            while True:
                line = resp.readline()
                if not line:
                    return
                result = json.loads(line).get("result", {})
                if result.get("events"):
                    yield int(result["header"]["revision"])
        except (OSError, http.client.HTTPException, ValueError):
            return
        finally:
            with self._watches_lock:
                self._watches.discard(conn)
            conn.close()

    def abort_watches(self) -> None:
        """End every watch of this client now (they return), e.g. to stop at once."""
        with self._watches_lock:
            conns = list(self._watches)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def compare_created(key: bytes, create_revision: int) -> dict[str, Any]:
    """True when `key`'s create revision is `create_revision` (0: the key is absent)."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(create_revision)}


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def op_delete_range(start: bytes, end: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(start), "range_end": _b64(end)}}


def op_get(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def response_kvs(answer: dict[str, Any], index: int) -> list[KeyValue]:
    """The key-values of the `index`th (range) response of a transaction's answer."""
    responses = answer.get("responses", [])
    if index >= len(responses):
        return []
    return [_kv(i) for i in responses[index].get("response_range", {}).get("kvs", [])]
