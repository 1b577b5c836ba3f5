"""A fault-injecting reverse proxy for S3-compatible endpoints (reliability tests, chaos drills).

Put it between a client and an S3 server (moto, MinIO) on loopback and point ``AWS_ENDPOINT_URL``
at it: it forwards every request unchanged, except a configured share of requests, which get

* ``500`` InternalError or ``503`` SlowDown (S3's XML error bodies; the server never sees them),
* a slow answer (forwarded after ``slow_s`` seconds),
* a connection reset (RST, no reply) before the request reaches the server, or
* a *lost reply*: forwarded (the server acted on it) and then reset - the case that turns a
  non-idempotent retry into a duplicate, or
* a *truncated body*: the headers and half of a GET's body, then a reset (a download cut mid-stream,
  which HTTP clients only notice while reading the body, after their own retry loop has returned).

``permanent`` makes every request fail the same way (an outage), to prove clients give up with a
clear error in bounded time instead of hanging.

Decisions are deterministic: the n-th attempt of a request (method + path + query names, so a
retry is attempt n+1 of the same request) maps to a hash of (seed, request, n). Thread
interleaving therefore does not change which attempts fail, and a test can replay a run.

Hand-written because no maintained Python package offers S3-aware fault injection on a plain
HTTP hop (toxiproxy works on TCP, needs a Go binary, and knows no 503 SlowDown).
Usage: ``python -m sar_scale.testing.s3_fault_proxy --upstream http://127.0.0.1:5000 --rate 0.15``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from sar_scale.config import StrictModel, load_config

logger = logging.getLogger(__name__)

KINDS = ("error_500", "slowdown_503", "reset", "slow", "lost_reply", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length"}
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
              '<RequestId>fault-{n}</RequestId></Error>')


class FaultConfig(StrictModel):
    """What share of requests fails, and how. Rates are probabilities per attempt; their sum <= 1."""

    error_500: float = Field(0.0, ge=0, le=1, description="answer 500 InternalError")
    slowdown_503: float = Field(0.0, ge=0, le=1, description="answer 503 SlowDown (throttling)")
    reset: float = Field(0.0, ge=0, le=1, description="reset the connection before forwarding (no reply)")
    slow: float = Field(0.0, ge=0, le=1, description="forward after slow_s seconds")
    lost_reply: float = Field(0.0, ge=0, le=1, description="forward, then reset instead of replying")
    truncate: float = Field(0.0, ge=0, le=1, description="GET only: send half of the body, then reset")
    slow_s: float = Field(0.3, ge=0, description="delay of a slow answer")
    permanent: Literal["off", "500", "503", "reset"] = Field(
        "off", description="fail every request this way (an outage); overrides the rates")
    methods: list[str] | None = Field(None, description="only these HTTP methods get faults (default all)")
    queries: list[str] | None = Field(None, description="only requests with one of these query parameters get "
                                      "faults, e.g. [uploadId] with methods [POST] = CompleteMultipartUpload")
    seed: int = Field(0, description="seed of the deterministic fault schedule")

    @field_validator("permanent", mode="before")
    @classmethod
    def _status_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # `permanent=503` on a command line parses as an int

    @model_validator(mode="after")
    def _total(self) -> FaultConfig:
        total = sum(getattr(self, k) for k in KINDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.3f} > 1 ({', '.join(KINDS)})")
        return self

    @classmethod
    def mixed(cls, rate: float, seed: int = 0,
              kinds: tuple[str, ...] = ("error_500", "slowdown_503", "reset", "slow"), **kw: Any) -> FaultConfig:
        """``rate`` split evenly over ``kinds`` (default: 500, 503, reset and slow)."""
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; allowed: {KINDS}")
        return cls(**{k: rate / len(kinds) for k in kinds}, seed=seed, **kw)


def request_identity(method: str, target: str) -> str:
    """What makes two attempts "the same request": method, path and query *names* (+ partNumber).

    Query values such as multipart ``uploadId`` differ between uploads but not between retries.
    """
    parts = urlsplit(target)
    q = parse_qsl(parts.query, keep_blank_values=True)
    names = sorted(f"{k}={v}" if k in ("partNumber", "prefix", "continuation-token", "start-after") else k
                   for k, v in q)
    return f"{method} {parts.path}?{'&'.join(names)}"


class S3FaultProxy:
    """Threaded reverse proxy on 127.0.0.1; ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, upstream: str, config: FaultConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0, upstream_timeout: float = 120.0):
        up = urlsplit(upstream)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (up.hostname, up.port or 80)
        self.upstream_timeout = upstream_timeout
        self.config = config or FaultConfig()
        self._lock = threading.Lock()
        self._attempts: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.events: list[tuple[str, str, int, str]] = []  # (identity, method, attempt, kind) of faults
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def configure(self, config: FaultConfig) -> None:
        """Swap the fault configuration (counts and attempt history are kept)."""
        with self._lock:
            self.config = config

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.events.clear()
            self._attempts.clear()

    def snapshot(self) -> dict[str, int]:
        """Counts so far: ``requests``, ``forwarded``, and one entry per injected fault kind."""
        with self._lock:
            out = {"requests": 0, "forwarded": 0, **{k: 0 for k in KINDS}, "permanent": 0}
            out.update(self.counts)
            out["injected"] = sum(out[k] for k in (*KINDS, "permanent"))
            return out

    def start(self) -> S3FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only when it runs
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ decisions
    def decide(self, method: str, target: str) -> tuple[str, int, FaultConfig]:
        """The fault (or ``"forward"``) for this attempt; deterministic in (seed, request, attempt)."""
        ident = request_identity(method, target)
        with self._lock:
            cfg = self.config
            self._attempts[ident] += 1
            n = self._attempts[ident]
            self.counts["requests"] += 1
            kind = "forward"
            if (cfg.methods is None or method in cfg.methods) and (cfg.queries is None or set(cfg.queries) & {
                    k for k, _ in parse_qsl(urlsplit(target).query, keep_blank_values=True)}):
                if cfg.permanent != "off":
                    kind = "permanent"
                else:
                    h = hashlib.sha256(f"{cfg.seed}|{ident}|{n}".encode()).digest()
                    u = int.from_bytes(h[:8], "big") / 2**64
                    acc = 0.0
                    for k in KINDS:
                        acc += getattr(cfg, k)
                        if u < acc:
                            kind = k
                            break
            if kind == "truncate" and method != "GET":
                kind = "forward"  # only a body download can be cut mid-stream
            if kind in ("forward", "slow", "lost_reply", "truncate"):
                self.counts["forwarded"] += 1  # reached the server
            if kind != "forward":
                self.counts[kind] += 1
                self.events.append((ident, method, n, kind))
            return kind, self.counts["requests"], cfg

    def _uncount(self, kind: str) -> None:
        """A planned fault that could not be applied (e.g. truncating a 1-byte body): not counted."""
        with self._lock:
            self.counts[kind] -= 1
            for i in range(len(self.events) - 1, -1, -1):
                if self.events[i][3] == kind:
                    del self.events[i]
                    break

    # ------------------------------------------------------------------ HTTP
    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real S3

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet; counts say what happened
                logger.debug("proxy: " + fmt, *args)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                """Abort the TCP connection (RST): the client sees a reset, not an HTTP answer."""
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass
                self.close_connection = True

            def _error(self, status: int, code: str, msg: str, n: int) -> None:
                body = b"" if self.command == "HEAD" else _ERROR_XML.format(code=code, msg=msg, n=n).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                kind, n, cfg = proxy.decide(self.command, self.path)
                if kind == "permanent":
                    kind = {"500": "error_500", "503": "slowdown_503", "reset": "reset"}[cfg.permanent]
                if kind == "error_500":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.", n)
                if kind == "slowdown_503":
                    return self._error(503, "SlowDown", "Please reduce your request rate.", n)
                if kind == "reset":
                    return self._reset()
                if kind == "slow":
                    time.sleep(cfg.slow_s)
                try:
                    status, reason, headers, data = self._forward(body)
                except OSError as e:  # upstream down: a gateway error, like a real load balancer
                    logger.warning("proxy: upstream %s:%d failed: %s", *proxy.upstream, e)
                    return self._error(502, "BadGateway", "upstream unavailable", n)
                if kind == "lost_reply":
                    return self._reset()
                self.send_response(status, reason)
                for k, v in headers:
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    cl = next((v for k, v in headers if k.lower() == "content-length"), None)
                    if cl is not None:
                        self.send_header("Content-Length", cl)
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "truncate":
                    if len(data) >= 2:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        return self._reset()
                    proxy._uncount(kind)
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sar_scale.testing.s3_fault_proxy",
        description="Forward S3 requests to UPSTREAM and inject faults (500, 503 SlowDown, slow answers, "
                    "connection resets, lost replies) at given rates; deterministic with --seed. Point "
                    "clients at it with AWS_ENDPOINT_URL. Ctrl-C prints what was injected.")
    p.add_argument("--upstream", required=True, help="the real S3 endpoint, e.g. http://127.0.0.1:5000")
    p.add_argument("--port", type=int, default=0, help="port to listen on (127.0.0.1); 0 = any free port")
    p.add_argument("--rate", type=float, default=0.0, help="total fault rate split over 500/503/reset/slow")
    p.add_argument("--config", default=None, help="YAML of FaultConfig fields (overrides --rate)")
    p.add_argument("overrides", nargs="*", help="FaultConfig overrides, e.g. lost_reply=0.05 permanent=503")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        base = FaultConfig.mixed(a.rate, seed=a.seed).model_dump()
        cfg = load_config(FaultConfig, a.config or base, a.overrides)
    except ValueError as e:  # ConfigError included: names the field
        print(f"s3_fault_proxy: {e}", file=sys.stderr)
        return 2
    # a shell starts background jobs with SIGINT ignored; Ctrl-C / SIGINT must stop us anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    proxy = S3FaultProxy(a.upstream, cfg, port=a.port).start()
    print(f"s3 fault proxy on {proxy.endpoint} -> {a.upstream} ({cfg.model_dump()})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print(proxy.snapshot())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
