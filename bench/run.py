#!/usr/bin/env python
"""Measure django_tornado against the servers a Django user would pick instead.

    python bench/run.py [--quick] [--rounds N]

Every server serves the same app (bench/app.py) from ONE process pinned to CPU 0
(plus a 2-process row for django_tornado), with wrk pinned to CPU 1, all on
127.0.0.1. Rounds interleave the servers (A B C ... A B C); each figure is the
median over rounds, and is also given as a ratio to raw Tornado (plain Tornado
handlers, no Django) measured in the same round. Writes a Markdown report to
stdout and bench/results/latest.md, raw figures to bench/results/*.json, and a
chart to docs/bench.png when matplotlib is there. Peers come from
setup.cfg's bench extra, installed on demand; wrk from the OS (apt-get install wrk).
"""

import argparse
import asyncio
import collections
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
THREADS = 16  # django_tornado's default pool; gthread, WSGIContainer and granian WSGI get the same
PY = sys.executable

# granian (Rust HTTP server, 2.x): a supervisor process and ONE worker process
# (both pinned with the rest). Notes from trying it with this app:
# - WSGI: --blocking-threads is the number of Python threads running the app
#   (default backpressure / 2 = 512); granian warns that 6 is "quite high" for
#   2 cores (it warns above 2 * CPUs + 1). Sync iterators stream chunk by chunk;
#   async ones are buffered whole by Django's WSGI handler, as under gunicorn.
# - ASGI: "asginl", the interface without the lifespan protocol, which Django's
#   ASGI handler refuses ("asgi" works too, after logging a warning). ASGI allows
#   no --blocking-threads above 1 (a ConfigurationError): sync views and sync
#   iterators run in asgiref's executor, as under uvicorn, and Django's ASGI
#   handler buffers sync iterators whole. Each parked long-poll holds a thread
#   (asgiref's one-thread executor per request): 5,006 threads at 5,000.
# - --backpressure (requests served at once per worker) defaults to
#   backlog / workers = 1024; beyond it requests wait unread (with 1,500
#   polls parked, /waiting was never answered), so fan-out needs it raised,
#   and the listen backlog to 2048, as for Tornado here.
# - granian's HTTP layer is cheap: its WSGI row's sync JSON figure was level
#   with raw Tornado's in smoke runs, more than twice gunicorn's.
GRANIAN = ["granian", "--workers", "1", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
           "--backlog", "2048", "--backpressure", "16384"]
# name -> (command, extra environment, can park thousands of long-polls)
SERVERS = {
    "raw Tornado (ceiling)": ([PY, "servers.py", "raw", "{port}"], {}, True),
    "django_tornado": ([PY, "servers.py", "ours", "{port}", "1"], {}, True),
    "django_tornado, 2 processes": ([PY, "servers.py", "ours", "{port}", "2"], {}, True),
    "Tornado WSGIContainer": ([PY, "servers.py", "wsgicontainer", "{port}", "0"], {}, False),
    f"Tornado WSGIContainer, {THREADS} threads": ([PY, "servers.py", "wsgicontainer", "{port}", str(THREADS)], {}, False),
    "gunicorn sync": (["gunicorn", "-w", "1", "-b", "127.0.0.1:{port}", "app:wsgi"], {}, False),
    f"gunicorn gthread, {THREADS} threads": (
        ["gunicorn", "-w", "1", "-k", "gthread", "--threads", str(THREADS), "-b", "127.0.0.1:{port}", "app:wsgi"], {}, False),
    "uvicorn (uvloop, httptools) + Django ASGI": (
        ["uvicorn", "--port", "{port}", "--no-access-log", "--log-level", "warning", "app:asgi"], {"BENCH_POLL": "asgi"}, True),
    "daphne + Django ASGI": (["daphne", "-p", "{port}", "-b", "127.0.0.1", "-v", "0", "app:asgi"], {"BENCH_POLL": "asgi"}, True),
    f"granian WSGI, {THREADS} threads": (GRANIAN + ["--interface", "wsgi", "--blocking-threads", str(THREADS), "app:wsgi"], {}, False),
    "granian + Django ASGI": (GRANIAN + ["--interface", "asginl", "app:asgi"], {"BENCH_POLL": "asgi"}, True),
}
CEILING = "raw Tornado (ceiling)"
ONE_CORE = {name for name in SERVERS if "2 processes" not in name}


# -- Tools: installing peers, starting servers, wrk ---------------------------------


def ensure_tools() -> None:
    """Install the peers (setup.cfg's bench extra) and wrk if they are missing."""
    missing = [module for module in ("gunicorn", "uvicorn", "daphne", "granian", "uvloop", "httptools") if importlib.util.find_spec(module) is None]
    if missing:
        print(f"Installing the peers ({', '.join(missing)} missing)...", file=sys.stderr)
        subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True)
    if shutil.which("wrk") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit("bench/run.py needs wrk: apt-get install wrk (or your system's package)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def taskset(cpu: str) -> list[str]:
    """Pin to ``cpu`` where taskset works (it may not in every container)."""
    if shutil.which("taskset") and subprocess.run(["taskset", "-c", cpu, "true"], check=False, capture_output=True).returncode == 0:
        return ["taskset", "-c", cpu]
    return []


class Server:
    """One benchmarked server process on a free loopback port."""

    parks = True  # whether it can park requests (the WSGI servers can't: each would hold a thread)

    def __init__(self, name: str) -> None:
        command, environment, self.parks = SERVERS[name]
        self._launch(name, command, environment, pin=name in ONE_CORE, stderr=subprocess.PIPE)

    def _launch(self, name: str, command: list[str], environment: dict[str, str], *, pin: bool, stderr: Any) -> None:
        """Start ``command`` ({port} filled in) and return once it answers /sync."""
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*(taskset("0") if pin else []), *(part.format(port=self.port) for part in command)],
            cwd=BENCH,
            # The peers' commands (gunicorn, granian, ...) from this Python's bin first: the bench venv need not be activated.
            env={**os.environ, **environment, "PYTHONPATH": ROOT, "PATH": os.pathsep.join([os.path.dirname(PY), os.environ.get("PATH", os.defpath)])},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not self.answers("/sync"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self._stop_and_tell()}")
            time.sleep(0.1)

    def _stop_and_tell(self) -> str:
        """Stop a server that failed to start; what it wrote says why."""
        self.stop()
        return self.process.stderr.read().decode()[-2000:]

    def answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def get_json(self, path: str, timeout: float = 10) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.load(response)

    def pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def rss(self) -> int:
        """Resident memory of the server and its children, in bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()


class LoggedServer(Server):
    """A server of the live-update benchmarks, on CPU 0, its stderr kept in a file for the report."""

    def __init__(self, name: str, command: list[str], environment: dict[str, str]) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self._launch(name, command, environment, pin=True, stderr=self.log)

    def _stop_and_tell(self) -> str:
        lines = self.log_lines()[-20:]
        self.stop()
        return "\n".join(lines)

    def log_lines(self) -> list[str]:
        self.log.seek(0)
        return [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]

    def stop(self) -> None:
        super().stop()
        self.log.close()


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            direct = [int(child) for child in listing.read().split()]
    except OSError:
        return []
    return [*direct, *(grandchild for child in direct for grandchild in children(child))]


@contextlib.contextmanager
def redis_server():
    """A private redis-server on a free port, on CPU 1, keeping nothing on disk; yields its port."""
    if shutil.which("redis-server") is None:
        sys.exit(f"{os.path.basename(sys.argv[0])} needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([*taskset("1"), "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False).stdout.strip() != "PONG":
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def percentile_of(counts: dict, fraction: float):
    """The value below which ``fraction`` of the samples lie, from ``counts`` ({value: how many times})."""
    count, target = 0, fraction * sum(counts.values())
    for value in sorted(counts):
        count += counts[value]
        if count >= target:
            return value
    return None


def wrk(url: str, seconds: float, connections: int) -> dict:
    """Requests/s, p99 latency (ms), requests and error counts from wrk on CPU 1."""
    output = subprocess.run(
        [*taskset("1"), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,  # wrk stops itself; this is for a wedged wrk
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", output)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    scale = {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": rate, "p99_ms": float(p99.group(1)) * scale, "errors": bool(errors),
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "socket_errors": sum(int(count) for count in socket_errors.groups()) if socket_errors else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


# -- Scenarios -------------------------------------------------------------------------


def throughput_round(names: list[str], seconds: float) -> dict:
    """Scenarios 1-3 for every server, one after the other: req/s and p99."""
    results = {}
    for name in names:
        server = Server(name)
        try:
            wrk(server.url + "/sync", 1, 16)  # warm up
            results[name] = {
                "sync": wrk(server.url + "/sync", seconds, 32),
                "async": wrk(server.url + "/async", seconds, 32),
                "asynchronous": wrk(server.url + "/asynchronous", seconds, 32) if "django_tornado" in name else None,
                "block": wrk(server.url + "/block", seconds, 50) if name != CEILING else None,
            }
        finally:
            server.stop()
        print(f"  {name}: {results[name]['sync']['rps']:.0f} req/s sync", file=sys.stderr)
    return results


async def first_byte(url_host: str, port: int, path: str, timeout: float = 8) -> tuple[float, float]:
    """Seconds to the first body byte and to the end of a streamed response."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(url_host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        body = b""
        while b"chunk 0" not in body:
            piece = await asyncio.wait_for(reader.read(4096), timeout)
            if not piece:
                raise ConnectionError("closed before the first chunk")
            body += piece
        first = time.perf_counter() - started
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
        assert head.startswith(b"HTTP/1.1 200")
        return first, time.perf_counter() - started
    finally:
        writer.close()


async def streaming(server: Server) -> dict:
    """Scenario 4: time to first byte for both iterator kinds, and /sync latency meanwhile."""
    figures = {}
    for kind in ("sync", "async"):
        if server.name == CEILING and kind == "sync":
            continue  # Tornado handlers have no sync iterators
        streams = asyncio.gather(*(first_byte("127.0.0.1", server.port, f"/stream/{kind}") for _ in range(5)), return_exceptions=True)
        await asyncio.sleep(0.2)
        latencies = []
        for _ in range(10):  # other requests while five streams are open
            started = time.perf_counter()
            try:
                await asyncio.to_thread(server.get_json, "/sync", 5)
            except OSError:
                latencies.append(float("inf"))
                break
            latencies.append(time.perf_counter() - started)
        results = await streams
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            figures[kind] = {"failed": "timed out" if isinstance(failures[0], TimeoutError) else type(failures[0]).__name__}
        else:
            figures[kind] = {
                "first_byte_ms": 1000 * statistics.median(first for first, _ in results),
                "total_s": statistics.median(total for _, total in results),
            }
        figures[kind]["other_request_max_ms"] = 1000 * max(latencies)
    return figures


async def long_awaits(server: Server, count: int, seconds: float = 2.0) -> dict:
    """Scenario 3b: ``count`` async def views that each await ``seconds``, all at once; a plain request meanwhile.

    Until all have answered (ideally ``seconds``), how long the plain request
    took, and the server's memory per waiting request.
    """
    async def one(path: str) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 10)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()

    baseline = server.rss()
    started = time.perf_counter()
    naps = [asyncio.ensure_future(one(f"/nap?seconds={seconds}")) for _ in range(count)]
    await asyncio.sleep(seconds / 2)  # all of them are waiting by now
    waiting_rss = server.rss()
    plain_started = time.perf_counter()
    await one("/sync")
    plain_ms = 1000 * (time.perf_counter() - plain_started)
    answers = await asyncio.gather(*naps, return_exceptions=True)
    return {
        "all_answered_s": time.perf_counter() - started,
        "answered": sum(1 for answer in answers if isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200")),
        "plain_ms": plain_ms,
        "kb_per_waiting": (waiting_rss - baseline) / count / 1024,
    }


async def fan_out(server: Server, waiters: int) -> dict:
    """Scenario 5: park ``waiters`` long-polls, wake them with one publish, time it."""
    baseline = server.rss()
    request = b"GET /poll HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    connections = []
    for start in range(0, waiters, 500):  # connect in batches, inside the listen backlog
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", server.port) for _ in range(min(500, waiters - start))))
        for _, writer in batch:
            writer.write(request)
        connections.extend(batch)
    deadline = time.monotonic() + 60
    # /waiting may queue behind the flood of polls (granian + Django ASGI first answered it after
    # 16 s of 5,000): give it most of the minute, not get_json's 10 s.
    while (await asyncio.to_thread(server.get_json, "/waiting", 30))["waiting"] < waiters:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {(await asyncio.to_thread(server.get_json, '/waiting', 30))['waiting']} of {waiters} parked")
        await asyncio.sleep(0.1)
    parked_rss = server.rss()

    async def answered(reader: asyncio.StreamReader) -> float:
        await reader.readuntil(b"\r\n\r\n")
        return time.perf_counter()

    readers = [asyncio.ensure_future(answered(reader)) for reader, _ in connections]
    started = time.perf_counter()
    await asyncio.to_thread(server.get_json, "/publish", 60)
    published = time.perf_counter() - started
    done = await asyncio.wait_for(asyncio.gather(*readers), 120)
    for _, writer in connections:
        writer.close()
    times = sorted(moment - started for moment in done)
    return {
        "all_answered_ms": 1000 * times[-1],
        "p99_ms": 1000 * times[int(len(times) * 0.99) - 1],
        "publish_ms": 1000 * published,
        "kb_per_waiter": (parked_rss - baseline) / waiters / 1024,
    }


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, *,
                   form: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """One request on a kept-alive connection: GET ``path`` (POST ``form`` if given); return status and body."""
    body = b"" if form is None else form.encode()
    head = f"{'GET' if form is None else 'POST'} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if form is not None:
        head += f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length is None:
            raise ValueError(f"expected a Content-Length, not {head[:300]!r}")
        return int(head.split(b" ", 2)[1]), await reader.readexactly(int(length.group(1)))


def chat_end_to_end(receivers: int, seconds: float, rate: float, *, drain: float = 30) -> dict:
    """Scenario 6: chat_example.py with ``receivers`` long-polls and one sender at ``rate`` msg/s.

    The figures of chat_load, plus the server's log lines other than 2xx/3xx
    access lines (or 499: a receiver that left before its answer) while it ran (``server_log_problems``, the first few in
    ``server_log_sample``) and while it stopped (``shutdown_log_problems``).
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # every request is logged: too much for a pipe nobody reads meanwhile
        process = subprocess.Popen([*taskset("0"), PY, os.path.join(ROOT, "chat_example.py"), f"127.0.0.1:{port}"],
                                   stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(base + "/who", timeout=1).close()
                    break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, "chat_example.py did not start"
                    time.sleep(0.1)
            results = asyncio.run(chat_load(port, receivers, seconds, rate, drain=drain))
            results["server_alive"] = process.poll() is None
            deadline = time.monotonic() + 10
            with contextlib.suppress(OSError, ValueError):  # let the room see its receivers leave
                while time.monotonic() < deadline:
                    with urllib.request.urlopen(base + "/stats", timeout=5) as response:
                        if not json.load(response)["waiters"]:
                            break
                    time.sleep(0.1)
            running_log = os.fstat(log.fileno()).st_size
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines(keepends=True)
    problems: list[list[str]] = [[], []]  # while running, while stopping
    position = 0
    for line in lines:
        if not re.search(r'" ([23]\d\d|499) ', line):
            problems[position >= running_log].append(line.rstrip())
        position += len(line.encode())
    results["server_log_problems"] = len(problems[0])
    results["server_log_sample"] = problems[0][:5]
    results["shutdown_log_problems"] = len(problems[1])
    return results


class ChatTally:
    """What one receiver got of the messages m0 .. m<total - 1>: each once, in the room's order."""

    def __init__(self, total: int) -> None:
        self.seen = bytearray(total)  # 1 where message n has arrived
        self.received = self.duplicated = self.out_of_order = 0
        self.last_stamp = 0

    def take(self, number: int, stamp: int) -> None:
        if self.seen[number]:
            self.duplicated += 1
            return
        self.seen[number] = 1
        self.received += 1
        if stamp <= self.last_stamp:  # the room stamps messages in the order it posts them
            self.out_of_order += 1
        self.last_stamp = max(self.last_stamp, stamp)


async def chat_load(port: int, receivers: int, seconds: float, rate: float, *, drain: float = 30) -> dict:
    """Receivers join and long-poll as the chat page's script does; "m<n>" is posted at ``rate``/s for ``seconds``.

    Each receiver polls /recv?since=<last timestamp>&id=<session> on its own
    kept-alive connection (and /who after its first answer, as the page does).
    Messages are posted (POST /send, as the page does) on a fixed schedule,
    each on a free connection of one sender's session: one connection waiting
    for each answer could not keep up the rate while the room is busy. Once
    the last is sent, wait up to ``drain`` s for every receiver to have them
    all; then count what each receiver lost, got twice or got out of the
    room's order (its timestamps), and each delivery's send-to-receive latency.
    """
    sender_nick = "sender"
    total = round(seconds * rate)
    sent_at = [0.0] * total  # when message n was sent (monotonic)
    latency_ms: collections.Counter[int] = collections.Counter()  # milliseconds -> deliveries
    errors: collections.Counter[str] = collections.Counter()
    caught = (OSError, EOFError, TimeoutError, ValueError, KeyError, IndexError, asyncio.LimitOverrunError)
    Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

    async def connect() -> Connection:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)

    async def call(connection: Connection, path: str, form: str | None = None, timeout: float = 10) -> dict:
        status, body = await exchange(*connection, path, form=form, timeout=timeout)
        if status != 200:
            raise ValueError(f"{path.partition('?')[0]} answered {status}: {body[:200]!r}")
        return json.loads(body)

    async def join(nick: str) -> tuple[Connection, str]:
        connection = await connect()
        try:
            return connection, (await call(connection, f"/join?nick={nick}"))["id"]
        except BaseException:
            connection[1].close()
            raise

    async def receive(connection: Connection | None, session: str, tally: ChatTally) -> None:
        since, failures, first = 1, 0, True  # the page starts from since=1
        try:
            while True:
                try:
                    connection = connection or await connect()
                    # The room answers a quiet long-poll after 30 s (LONG_POLL_TIMEOUT).
                    answer = await call(connection, f"/recv?since={since}&id={session}", timeout=45)
                    now = time.monotonic()
                    for message in answer["messages"]:
                        since = max(since, message["timestamp"])
                        if message["type"] == "msg" and message["nick"] == sender_nick:
                            number = int(message["text"][1:])
                            tally.take(number, message["timestamp"])
                            latency_ms[round(1000 * (now - sent_at[number]))] += 1
                    failures = 0
                    if first:
                        first = False
                        await call(connection, "/who")
                except caught as error:
                    errors[f"receiver: {type(error).__name__}: {str(error)[:80]}"] += 1
                    if connection is not None:
                        connection[1].close()
                    connection = None
                    failures += 1
                    await asyncio.sleep(min(30.0, 0.5 * 2**failures))  # the page's back-off
        finally:
            if connection is not None:
                connection[1].close()

    idle: list[Connection] = []
    sending = [0, 0]  # sends in flight now, most at once

    async def send(number: int, session: str) -> None:
        connection = idle.pop() if idle else None
        sending[0] += 1
        sending[1] = max(sending)
        try:
            connection = connection or await connect()
            sent_at[number] = time.monotonic()
            await call(connection, "/send", form=f"id={session}&text=m{number}")
            idle.append(connection)
        except caught as error:
            errors[f"sender: {type(error).__name__}: {str(error)[:80]}"] += 1
            if connection is not None:
                connection[1].close()
        finally:
            sending[0] -= 1

    sender, session = await join(sender_nick)
    idle.append(sender)
    joined = []
    for start in range(0, receivers, 200):  # join in batches, inside the listen backlog
        joined += await asyncio.gather(*(join(f"r{number}") for number in range(start, min(start + 200, receivers))))
    tallies = [ChatTally(total) for _ in range(receivers)]
    tasks = [asyncio.ensure_future(receive(*receiver, tally)) for receiver, tally in zip(joined, tallies)]
    sends: set[asyncio.Task] = set()
    try:
        monitor = await connect()
        deadline = time.monotonic() + 60
        while (waiting := (await call(monitor, "/stats"))["waiters"]) < receivers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {waiting} of {receivers} receivers parked within 60 s")
            await asyncio.sleep(0.1)
        monitor[1].close()
        started = time.monotonic()
        for number in range(total):
            await asyncio.sleep(max(0.0, started + number / rate - time.monotonic()))
            task = asyncio.ensure_future(send(number, session))
            sends.add(task)
            task.add_done_callback(sends.discard)
        sending_s = time.monotonic() - started
        await asyncio.wait(sends, timeout=20)  # each send times out in 10 s anyway
        deadline = time.monotonic() + drain
        while any(tally.received < total for tally in tallies) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = time.monotonic()
    finally:
        for task in [*tasks, *sends]:
            task.cancel()
        await asyncio.gather(*tasks, *sends, return_exceptions=True)
        for connection in idle:
            connection[1].close()
    received = sum(tally.received for tally in tallies)

    def percentile(fraction: float) -> float | None:
        return percentile_of(latency_ms, fraction)

    return {
        "sent": total,
        "send_rate": (total - 1) / sending_s if total > 1 else None,
        "most_sends_in_flight": sending[1],
        "delivered": received,
        "expected": total * receivers,
        "lost": total * receivers - received,
        "duplicated": sum(tally.duplicated for tally in tallies),
        "out_of_order": sum(tally.out_of_order for tally in tallies),
        "receivers_complete": sum(1 for tally in tallies if tally.received == total and tally.duplicated == tally.out_of_order == 0),
        "errors": dict(errors),
        "drain_s": drained - started - sending_s,
        "delivered_per_s": received / (drained - started),
        "expected_per_s": total * receivers / seconds,
        "p50_latency_ms": percentile(0.50),
        "p99_latency_ms": percentile(0.99),
        "max_latency_ms": max(latency_ms, default=None),
    }


# -- Report ------------------------------------------------------------------------------


def median_of(rounds: list[dict], name: str, scenario: str, field: str) -> tuple[float | None, float | None]:
    """Median figure and median same-round ratio to the ceiling."""
    figures, ratios = [], []
    for round_results in rounds:
        entry = round_results.get(name, {}).get(scenario)
        ceiling = round_results.get(CEILING, {}).get("sync")
        if entry:
            figures.append(entry[field])
            if ceiling:
                ratios.append(entry[field] / ceiling[field])
    if not figures:
        return None, None
    return statistics.median(figures), statistics.median(ratios) if ratios else None


def report(data: dict) -> str:
    rounds = data["rounds"]
    lines = [f"Measured {data['date']} on {data['machine']}; {len(rounds)} interleaved rounds of {data['seconds']} s per figure, median.", ""]
    titles = {
        "sync": "1. Sync JSON view, 32 connections",
        "async": "2. async def JSON view, 32 connections",
        "asynchronous": "2b. @asynchronous view answering at once, 32 connections",
        "block": "3. Sync view blocking 20 ms, 50 connections",
    }
    for scenario, title in titles.items():
        lines += [f"**{title}** (ratio: to raw Tornado's sync JSON in the same round)", "",
                  "| server | req/s | ratio | p99 ms |", "|---|---:|---:|---:|"]
        for name in SERVERS:
            rps, ratio = median_of(rounds, name, scenario, "rps")
            if rps is None:
                continue
            p99, _ = median_of(rounds, name, scenario, "p99_ms")
            lines.append(f"| {name} | {rps:,.0f} | {ratio:.2f} | {p99:.1f} |")
        lines.append("")
    lines += ["**4. Streaming: 5 chunks 0.5 s apart, 5 streams at once**", "",
              "| server | sync iterator: first byte ms | async iterator: first byte ms | slowest other request meanwhile ms |",
              "|---|---:|---:|---:|"]
    for name, figures in data["streaming"].items():
        cells = []
        for kind in ("sync", "async"):
            entry = figures.get(kind, {})
            cells.append(f"{entry['first_byte_ms']:.0f} (end {entry['total_s']:.1f} s)" if "first_byte_ms" in entry else entry.get("failed", "n/a"))
        slowest = max((entry.get("other_request_max_ms", 0) for entry in figures.values()), default=0)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {'no answer' if slowest == float('inf') else f'{slowest:.0f}'} |")
    lines += ["", "**3b. async def views awaiting 2 s, 500 at once, and a plain request meanwhile**", "",
              "| server | all answered s | answered | plain request meanwhile ms | KB per waiting request |", "|---|---:|---:|---:|---:|"]
    for name, entry in data.get("long_awaits", {}).items():
        lines.append(f"| {name} | {entry['all_answered_s']:.2f} | {entry['answered']} | {entry['plain_ms']:.0f} | {entry['kb_per_waiting']:.1f} |")
    lines += ["", "**5. Long-poll fan-out: N parked requests woken by one publish**", "",
              "| server | N | all answered ms | ratio | p99 ms | publish answered ms | KB per waiter |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_size in data["fan_out"].items():
        for size, entry in by_size.items():
            if "failed" in entry:
                lines.append(f"| {name} | {size} | {entry['failed']} | | | | |")
                continue
            ceiling = data["fan_out"].get(CEILING, {}).get(size, {}).get("all_answered_ms")
            ratio = f"{entry['all_answered_ms'] / ceiling:.2f}" if ceiling else ""
            lines.append(f"| {name} | {size} | {entry['all_answered_ms']:,.0f} | {ratio} | {entry['p99_ms']:,.0f} | "
                         f"{entry['publish_ms']:,.0f} | {entry['kb_per_waiter']:.1f} |")
    lines += ["", "WSGI servers (gunicorn, WSGIContainer, granian WSGI) are left out of 5: each parked request would hold one of their threads.", ""]
    chat = data.get("chat")
    if chat:
        lines += ["**6. chat_example.py end to end**", "",
                  (f"{chat['receivers']} long-polling receivers, one sender at {chat['rate']} messages/s for {chat['seconds']} s: "
                   f"{chat['delivered_per_s']:,.0f} deliveries/s of {chat['expected_per_s']:,.0f} expected, "
                   f"p99 send-to-receive latency {chat['p99_latency_ms']:.0f} ms; "
                   f"{chat.get('lost', 'n/a')} lost, {chat.get('duplicated', 'n/a')} duplicated."), ""]
    return "\n".join(lines)


def chart(data: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    names = [name for name in SERVERS if median_of(data["rounds"], name, "sync", "rps")[0]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for axis, scenario, title in zip(axes, ("sync", "async", "block"), ("sync JSON view", "async def JSON view", "view blocking 20 ms, 50 clients")):
        values = [median_of(data["rounds"], name, scenario, "rps")[0] or 0 for name in names]
        colors = ["#c33" if name.startswith("django_tornado") else "#888" if name == CEILING else "#48a" for name in names]
        axis.barh(names, values, color=colors)
        axis.invert_yaxis()
        axis.set_title(f"{title}: requests/s")
        if axis is not axes[0]:
            axis.set_yticklabels([])
    figure.suptitle(f"django_tornado and its peers, one process each ({data['machine']})")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# -- Main ----------------------------------------------------------------------------------


def machine() -> str:
    """The machine and the versions measured, for the reports."""
    return (f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"Django {__import__('django').get_version()}, Tornado {__import__('tornado').version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer waiters (under 10 minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    ensure_tools()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 waiters need as many sockets (servers inherit it)
    seconds = 3 if options.quick else 5
    sizes = (1000, 5000) if options.quick else (1000, 5000, 10000)
    sizes = tuple(size for size in sizes if size + 200 < hard)  # client and server each hold one socket per waiter
    started = time.monotonic()
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "seconds": seconds, "rounds": [], "streaming": {}, "long_awaits": {}, "fan_out": {},
    }
    names = list(SERVERS)
    for number in range(options.rounds):
        print(f"Round {number + 1} of {options.rounds}", file=sys.stderr)
        data["rounds"].append(throughput_round(names, seconds))
    for name in names:
        server = Server(name)
        try:
            data["streaming"][name] = asyncio.run(streaming(server))
            if server.parks and name in ONE_CORE and name != CEILING:
                data["long_awaits"][name] = asyncio.run(long_awaits(server, 500))
            if server.parks and name in ONE_CORE:
                data["fan_out"][name] = {}
                for size in sizes:
                    try:
                        data["fan_out"][name][size] = asyncio.run(fan_out(server, size))
                    except (OSError, TimeoutError) as error:
                        data["fan_out"][name][size] = {"failed": f"{type(error).__name__} {error}"[:60]}
        finally:
            server.stop()
        print(f"  {name}: streaming and fan-out done", file=sys.stderr)
    data["chat"] = {"receivers": 1000, "rate": 50, "seconds": 10 if options.quick else 30}
    data["chat"].update(chat_end_to_end(1000, data["chat"]["seconds"], 50))
    data["elapsed_s"] = round(time.monotonic() - started)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(RESULTS, f"{stamp}{'-quick' if options.quick else ''}.json"), "w") as output:
        json.dump(data, output, indent=1)
    text = report(data) + f"\nThe whole run took {data['elapsed_s']} s.\n"
    with open(os.path.join(RESULTS, "latest.md"), "w") as output:
        output.write(text)
    chart(data, os.path.join(ROOT, "docs", "bench.png"))
    print(text)


if __name__ == "__main__":
    main()
