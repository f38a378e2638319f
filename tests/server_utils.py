"""`jaxpage serve` in a subprocess on a free loopback port, for tests over real HTTP.

`shared_server()` starts one server per test process with small CPU engine flags (the demo
model) and stops it when the process exits; the subprocess also dies with the test process.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"
MODEL = "jaxpage-demo"
MAX_NUM_SEQS = 8
MAX_QUEUED = 16
MAX_MODEL_LEN = 1024  # long requests take seconds: disconnect tests don't race them
SMALL_FLAGS = (
    "--dtype", "float32", "--attention-backend", "xla", "--page-size", "16",
    "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", "64",
    "--max-model-len", str(MAX_MODEL_LEN), "--num-pages", "600",
    "--max-queued-requests", str(MAX_QUEUED), "--http-threads", "64",
    "--keepalive-interval", "0.5", "--stats-interval", "1",
)
HOT = 50.0  # the demo model's random logits are sharp: sample hot to get varied text


@dataclasses.dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, body=None, *, data: bytes | None = None,
             **kwargs) -> requests.Response:
        if data is None:
            data = json.dumps(body).encode()
        return requests.post(self.url + path, data=data, timeout=kwargs.pop("timeout", 120),
                             headers={"Content-Type": "application/json"}, **kwargs)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def open_request(self, path: str, body: dict) -> socket.socket:
        """A raw connection that has sent a POST; read it with read_until, drop it by closing."""
        data = json.dumps(body).encode()
        sock = socket.create_connection((HOST, self.port), timeout=60)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        return sock

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name, labels in braces: 'x{group="global"}'."""
        return parse_metrics(self.get("/metrics").text)

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once no request runs or waits and every KV page is free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if is_idle(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Bytes received until `marker` shows up (raises on EOF or the socket's timeout)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}; got {data[-300:]!r}")
        data += chunk
    return data


def read_until_some(socks: list[socket.socket], marker: bytes, count: int,
                    timeout: float = 60.0) -> list[socket.socket]:
    """The first `count` of `socks` to receive `marker`, whichever they are."""
    received = {s: b"" for s in socks}
    done: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while len(done) < count:
        waiting = [s for s in socks if s not in done]
        ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"only {len(done)} of {count} sockets got {marker!r}")
        for s in ready:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}; got {received[s][-300:]!r}")
            received[s] += chunk
            if marker in received[s]:
                done.append(s)
    return done


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def is_idle(m: dict[str, float]) -> bool:
    used = [v for k, v in m.items() if k.startswith("jaxpage:kv_cache_pages_used")]
    return (m["jaxpage:num_requests_running"] == 0 and m["jaxpage:num_requests_waiting"] == 0
            and bool(used) and not any(used))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Runs `python ARGS...` after asking Linux to SIGTERM it when the test process dies, so no server
# outlives a killed test run (its gunicorn worker exits when its master goes).
_EXEC_DYING_WITH_PARENT = """
import ctypes, os, sys
try:
    ctypes.CDLL(None).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
except (AttributeError, OSError):
    pass
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def start_server(*extra: str, startup_timeout: float = 300.0) -> ServerProcess:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="jaxpage-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, "-m", "jaxpage.cli", "serve",
           "--host", HOST, "--port", str(port), *SMALL_FLAGS, *extra]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    server = ServerProcess(f"http://{HOST}:{port}", proc, log_path)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if server.get("/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:  # not listening yet, or the worker is loading
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"the server was not healthy in {startup_timeout} s:\n"
                               f"{server.log()[-4000:]}")
        time.sleep(0.5)


def stop_server(server: ServerProcess) -> None:
    """SIGTERM the server's process group (gunicorn master and worker), SIGKILL if it lingers;
    removes its log."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)  # the worker, should it outlive the master
    except ProcessLookupError:
        pass
    server.proc.wait()
    server.log_path.unlink(missing_ok=True)


_SHARED: dict[tuple[str, ...], ServerProcess] = {}


def shared_server(*extra: str) -> ServerProcess:
    """One server per flag set per test process, stopped when the process exits."""
    if extra not in _SHARED:
        _SHARED[extra] = start_server(*extra)
        atexit.register(stop_server, _SHARED[extra])
    server = _SHARED[extra]
    if server.proc.poll() is not None:
        raise RuntimeError(f"the shared server died:\n{server.log()[-4000:]}")
    return server


def sse_events(response: requests.Response) -> list[str]:
    """The raw events of a streamed response (comments included), split at blank lines."""
    events, lines = [], []
    for line in response.iter_lines(decode_unicode=True):
        if line:
            lines.append(line)
        elif lines:
            events.append("\n".join(lines))
            lines = []
    if lines:
        events.append("\n".join(lines))
    return events


def sse_data(events: list[str]) -> list:
    """The JSON payloads of the data events (not [DONE], not comments)."""
    return [json.loads(e[len("data: "):]) for e in events
            if e.startswith("data: ") and e != "data: [DONE]"]
