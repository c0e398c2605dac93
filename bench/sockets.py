#!/usr/bin/env python
"""Measure django_tornado's WebSockets against raw Tornado and Django Channels.

    nice -n 10 /work/bench-venv/bin/python bench/sockets.py [--quick] [--only memory,sustained,redis,handshakes] [--servers raw,django_tornado]

Each server is one process pinned to CPU 0 (taskset); the clients, the
publisher and Redis are pinned to CPU 1; all on 127.0.0.1. Every server serves
the same endpoints (bench/sockets_app.py; the ceiling, raw Tornado, in
bench/sockets_servers.py): a socket at /ws/feed that joins the channel or
group "news" and says {"hello": PID}, and POST /publish (seq=N&t=T) that
sends {"id", "data": {"seq", "t"}} to every socket, ``t`` being the client's
wall clock when it sent the request.

1. Memory: the server's RSS after a warm-up (100 sockets opened, one
   broadcast, closed), then with 5,000 sockets open and subscribed: KB per
   socket is the difference over 5,000.
2. Broadcast: one publish request whose event every socket must receive,
   timed from sending the request until the last socket has it, at 1,000
   and at 5,000 sockets (the same sockets as 1.); one un-counted warm-up
   broadcast, then 5 samples 1 s apart, median; every sample is printed,
   with a note when they split into a fast and a slow group, and the
   server's garbage collections of 20 ms or more during each sample.
3. Sustained: a fresh server, 1,000 sockets, 20 publishes/s for 20 s, each
   sent on schedule on a free kept-alive connection (one connection waiting
   for each answer could not keep the rate when a publish is slow). Per
   socket: lost, duplicated, out of order (against the events' ids: the
   server's own order); publish-to-delivery latency (t to the read) p50/p99;
   deliveries per second (from the first publish to the last delivery);
   the server's CPU use meanwhile.
4. The same load with Redis and 2 worker processes sharing the port: the
   sockets split over them as the kernel hands out connections (said per
   worker, from each socket's hello). django_tornado serve(processes=2)
   with TORNADO_CHANNELS_URL; beside it uvicorn --workers 2 with
   channels_redis' two layers (the ids then come from a Redis INCR in the
   publish view: each process's own counter would not order them).
5. Handshakes per second: 50 clients, each in a loop opening a socket (with
   a logged-in session's cookie; the session in SQLite, Django's database
   backend), waiting for its hello, sending a close frame and closing.
   django_tornado's ``login_required(Feed.as_view())`` against Channels'
   ``AuthMiddlewareStack`` with a consumer refusing anonymous users; raw
   Tornado (no auth, no Django) as the ceiling. An anonymous handshake is
   also tried once: it must be refused.

The client is a raw asyncio Protocol (uvloop when installed) that does the
handshake and reads frames itself: a few microseconds per message, so that on
its own CPU it keeps up with every server here. --quick: 2,000 sockets in 1.
and 2., 3 samples, 500 sockets for 5 s in 3. and 4., 2 s windows in 5.
Each measurement also notes how many CPUs other processes kept busy meanwhile
(the report names those above 0.1: the sustained loads fall behind when the
server, at nice 10, shares CPU 0). Writes Markdown to stdout and
bench/results/sockets-<stamp>[-quick].json.
Needs redis-server and setup.cfg's bench extra (channels, channels-redis,
uvicorn[standard], daphne).
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import (
    BENCH,
    PY,
    RESULTS,
    ROOT,
    LoggedServer,
    machine,
    redis_server,
    taskset,
)

CEILING = "raw Tornado (ceiling)"
REFERENCE = {"deliveries_per_s": 20021, "p99_ms": 91}  # raw Tornado's sustained figures measured earlier on this kind of machine (the brief's)
OURS = "django_tornado"
CHANNELS_MEMORY = "uvicorn + Channels, in-memory layer"
UVICORN = ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log", "--log-level", "warning", "sockets_app:asgi"]
DAPHNE = ["daphne", "-b", "127.0.0.1", "-p", "{port}", "-v", "0", "sockets_app:asgi"]
CHANNELS = {"BENCH_WS": "channels"}
# name -> (command, environment); {port} is filled in. One process each.
SERVERS = {
    CEILING: ([PY, "sockets_servers.py", "raw", "{port}"], {}),
    OURS: ([PY, "sockets_servers.py", "ours", "{port}", "1"], {}),
    CHANNELS_MEMORY: (UVICORN, {**CHANNELS, "BENCH_LAYER": "memory"}),
    "daphne + Channels, in-memory layer": (DAPHNE, {**CHANNELS, "BENCH_LAYER": "memory"}),
    "uvicorn + channels_redis RedisChannelLayer (max_connections=1000)": (UVICORN, {**CHANNELS, "BENCH_LAYER": "redis"}),
    "uvicorn + channels_redis RedisPubSubChannelLayer": (UVICORN, {**CHANNELS, "BENCH_LAYER": "pubsub"}),
}
OURS_REDIS = "django_tornado, 2 processes, Redis"
TWO_WORKERS = {
    OURS_REDIS: ([PY, "sockets_servers.py", "ours", "{port}", "2"], {"BENCH_CHANNELS_URL": "redis://127.0.0.1:{redis}/0"}),
    "uvicorn --workers 2 + RedisPubSubChannelLayer": (UVICORN + ["--workers", "2"], {**CHANNELS, "BENCH_LAYER": "pubsub", "BENCH_GLOBAL_IDS": "1"}),
    "uvicorn --workers 2 + RedisChannelLayer (max_connections=1000)": (
        UVICORN + ["--workers", "2"], {**CHANNELS, "BENCH_LAYER": "redis", "BENCH_GLOBAL_IDS": "1"}),
}
# name -> (server, socket path)
HANDSHAKES = {
    "raw Tornado, no auth (ceiling)": (CEILING, "/ws/feed"),
    "django_tornado, login_required": (OURS, "/ws/auth"),
    "uvicorn + Channels AuthMiddlewareStack": (CHANNELS_MEMORY, "/ws/auth"),
    "daphne + Channels AuthMiddlewareStack": ("daphne + Channels, in-memory layer", "/ws/auth"),
}
OPENING = 250  # handshakes in flight at once while opening sockets: inside every listen backlog here
EVENT = re.compile(rb'"id":(\d+),"data":\{"seq":(\d+),"t":([0-9.eE+-]+)\}')
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Full|Exit|Interrupt)\b")
PROBLEM = re.compile(r"Traceback|Error|Exception|WARNING|CRITICAL", re.IGNORECASE)


# -- Servers and Redis ---------------------------------------------------------------------


class Server(LoggedServer):
    """A server of this benchmark; ``common`` is the environment of every server in the run."""

    def __init__(self, name: str, command: list[str], environment: dict[str, str], common: dict[str, str]) -> None:
        redis = common.get("BENCH_REDIS_PORT", "")
        super().__init__(name, command, {**common, **{key: value.format(redis=redis) for key, value in environment.items()}})

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and its children so far."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def started(name: str, command: list[str], environment: dict[str, str], common: dict[str, str], figures: dict):
    """A server for one measurement; its log's problem lines go into ``figures`` when it stops."""
    server = Server(name, command, environment, common)
    try:
        yield server
    finally:
        lines = server.log_lines()
        server.stop()
        server.log.close()
        problems = [line for line in lines if PROBLEM.search(line)]
        figures["server_log_lines"] = len(lines)
        figures["server_log_problems"] = len(problems)
        figures["server_log_sample"] = lines[:12]
        # A traceback's last line names the exception: which ones, how often.
        exceptions = collections.Counter(line.strip()[:160] for line in lines if EXCEPTION_LINE.match(line))
        figures["server_log_exceptions"] = dict(exceptions.most_common(8))


def redis_cli(port: int, *command: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True, check=False).stdout.strip()


def machine_busy() -> float:
    """CPU seconds every process on the machine has used so far (from /proc/stat)."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = (int(field) for field in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherWork:
    """How busy the machine was with work that is not this benchmark's (other processes' CPU seconds per second)."""

    def __init__(self, server: "Server", redis_pid: int) -> None:
        self.server, self.redis_pid = server, redis_pid
        self.began, self.ours, self.all = time.monotonic(), self.our_cpu(), machine_busy()

    def our_cpu(self) -> float:
        mine = os.times()
        return mine.user + mine.system + self.server.cpu_seconds() + process_cpu(self.redis_pid)

    def cpus(self) -> float:
        elapsed = time.monotonic() - self.began
        return round(max(0.0, (machine_busy() - self.all) - (self.our_cpu() - self.ours)) / elapsed, 2) if elapsed > 0 else 0.0


def make_database(directory: str) -> tuple[str, str]:
    """The SQLite file the Django servers share, with one user logged in: (its path, the session key)."""
    database = os.path.join(directory, "sockets.sqlite3")
    session = subprocess.run([PY, "sockets_servers.py", "setup", database], cwd=BENCH, env={**os.environ, "PYTHONPATH": ROOT},
                             capture_output=True, text=True, check=True).stdout.split()[-1]
    return database, session


# -- The WebSocket client --------------------------------------------------------------------


class Refused(Exception):
    """The server answered the handshake with something else than 101."""


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A short frame from the client: masked, as RFC 6455 requires."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


CLOSE = client_frame(8, (1000).to_bytes(2, "big"))


class Socket(asyncio.Protocol):
    """One WebSocket client: sends the handshake, then parses the server's (unmasked) frames.

    ``opened`` resolves with the first message (the server's hello) or fails
    with Refused; every later text or binary message goes to ``sink(socket,
    payload)``. Pings are answered; a close frame is answered and the
    connection closed (``closed_by_server`` keeps its code).
    """

    def __init__(self, request: bytes, sink) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.sink = sink
        self.opened = loop.create_future()
        self.lost = loop.create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed_by_server: int | None = None
        self.hello = b""
        self.seen = bytearray()  # the sustained load's tally
        self.last_id = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the hello"))
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(buffer[9:12])
            if status != 101:
                self.opened.set_exception(Refused(status))
                self.transport.close()
                return
            del buffer[: end + 4]
            self.upgraded = True
        position, size = 0, len(buffer)
        while size - position >= 2:
            first, length = buffer[position], buffer[position + 1] & 0x7F
            masked = buffer[position + 1] & 0x80
            head = 2
            if length == 126:
                if size - position < 4:
                    break
                length, head = int.from_bytes(buffer[position + 2 : position + 4], "big"), 4
            elif length == 127:
                if size - position < 10:
                    break
                length, head = int.from_bytes(buffer[position + 2 : position + 10], "big"), 10
            if masked:
                head += 4
            end = position + head + length
            if end > size:
                break
            payload = bytes(buffer[position + head : end])
            if masked:  # servers must not mask; if one does, undo it
                mask = buffer[position + head - 4 : position + head]
                payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
            position = end
            opcode = first & 0x0F
            if opcode in (0, 1, 2):
                if not first & 0x80:  # a fragment: more follow
                    self.fragments = [*(self.fragments or []), payload]
                    continue
                if self.fragments is not None:
                    payload, self.fragments = b"".join([*self.fragments, payload]), None
                if self.opened.done():
                    self.sink(self, payload)
                else:
                    self.hello = payload
                    self.opened.set_result(payload)
            elif opcode == 9:
                self.transport.write(client_frame(10, payload))
            elif opcode == 8:
                self.closed_by_server = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.transport.write(CLOSE)
                self.transport.close()
                break
        del buffer[:position]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE)
            self.transport.close()


def handshake(port: int, path: str, cookie: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Origin: http://127.0.0.1:{port}"]
    if cookie:
        lines.append(f"Cookie: sessionid={cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connect(port: int, path: str, sink, cookie: str | None = None, timeout: float = 30) -> Socket:
    loop = asyncio.get_running_loop()
    _, socket = await asyncio.wait_for(loop.create_connection(lambda: Socket(handshake(port, path, cookie), sink), "127.0.0.1", port), timeout)
    try:
        await asyncio.wait_for(socket.opened, timeout)
    except BaseException:
        socket.transport.close()
        raise
    return socket


async def open_sockets(port: int, count: int, sink) -> tuple[list[Socket], dict]:
    """Open ``count`` sockets on /ws/feed, ``OPENING`` at a time, each until its hello; and how it went."""
    gate = asyncio.Semaphore(OPENING)

    async def one() -> Socket:
        async with gate:
            return await connect(port, "/ws/feed", sink)

    began = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sockets = [result for result in results if isinstance(result, Socket)]
    failures = collections.Counter(f"{type(result).__name__}: {result}"[:80] for result in results if not isinstance(result, Socket))
    return sockets, {"opened": len(sockets), "failed": dict(failures), "seconds": round(time.perf_counter() - began, 2)}


async def gc_objects(server: Server, collect: bool = False) -> int | None:
    """How many objects the server's garbage collector tracks (one process: the one that answers); ``collect``: after a full collection."""
    try:
        return (await asyncio.to_thread(server.get_json, f"/gc?objects=1{'&collect=1' if collect else ''}", 30))["tracked"]
    except (OSError, ValueError, KeyError):
        return None


async def gc_state(server: Server) -> dict | None:
    try:
        return await asyncio.to_thread(server.get_json, "/gc", 30)
    except (OSError, ValueError):
        return None


def alive(sockets: list[Socket]) -> list[Socket]:
    return [socket for socket in sockets if not socket.lost.done()]


class Sink:
    """Every event any socket gets: counted per ``seq``; tallied per socket while a sustained load runs."""

    def __init__(self) -> None:
        self.counts: collections.Counter[int] = collections.Counter()
        self.waiting: dict[int, tuple[int, asyncio.Future]] = {}  # seq -> (how many sockets must have it, resolved then)
        self.unparsed = 0
        self.load: Load | None = None

    def expect(self, seq: int, sockets: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiting[seq] = (sockets, future)
        return future

    def __call__(self, socket: Socket, payload: bytes) -> None:
        match = EVENT.search(payload)
        if match is None:
            self.unparsed += 1
            return
        seq = int(match[2])
        count = self.counts[seq] = self.counts[seq] + 1
        waiting = self.waiting.get(seq)
        if waiting is not None and count >= waiting[0] and not waiting[1].done():
            waiting[1].set_result(time.perf_counter())
        if self.load is not None:
            self.load.take(socket, int(match[1]), seq, time.time() - float(match[3]))


class Load:
    """What each socket got of the events ``first`` .. ``first + total - 1`` of a sustained load."""

    def __init__(self, first: int, total: int, sockets: list[Socket]) -> None:
        self.first, self.total = first, total
        for socket in sockets:
            socket.seen = bytearray(total)
            socket.last_id = 0
        self.received = self.duplicated = self.out_of_order = 0
        self.latency_ms: collections.Counter[int] = collections.Counter()
        self.last_delivery = 0.0

    def take(self, socket: Socket, event_id: int, seq: int, latency: float) -> None:
        index = seq - self.first
        if not 0 <= index < self.total:
            return
        if socket.seen[index]:
            self.duplicated += 1
            return
        socket.seen[index] = 1
        self.received += 1
        if event_id < socket.last_id:
            self.out_of_order += 1
        socket.last_id = max(socket.last_id, event_id)
        self.latency_ms[round(1000 * latency)] += 1
        self.last_delivery = time.perf_counter()

    def percentile(self, fraction: float) -> float | None:
        count, target = 0, fraction * sum(self.latency_ms.values())
        for milliseconds in sorted(self.latency_ms):
            count += self.latency_ms[milliseconds]
            if count >= target:
                return milliseconds
        return None


class Publisher:
    """POST /publish on kept-alive connections: a free one, or a new one when all are busy."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.in_flight = self.most_in_flight = 0
        self.errors: collections.Counter[str] = collections.Counter()

    async def publish(self, seq: int, timeout: float = 60) -> dict:
        try:
            while self.idle:
                connection = self.idle.pop()
                if connection[0].at_eof():  # closed by the server for being idle (uvicorn's keep-alive timeout is 5 s)
                    connection[1].close()
                    continue
                try:
                    return await self._publish(connection, seq, timeout)
                except asyncio.IncompleteReadError as error:
                    if error.partial:
                        raise
                    # Closed unanswered as the request went out: the server was closing it. Again on a new one.
            return await self._publish(await asyncio.open_connection("127.0.0.1", self.port), seq, timeout)
        except BaseException as error:
            self.errors[f"{type(error).__name__}: {error}"[:100]] += 1
            raise

    async def _publish(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], seq: int, timeout: float) -> dict:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        reader, writer = connection
        try:
            body = f"seq={seq}&t={time.time():.6f}".encode()
            writer.write(b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (self.port, len(body), body))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head[9:12])
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length:
                answer = await asyncio.wait_for(reader.readexactly(int(length[1])), timeout)
            elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                answer = b""
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    answer += (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")
            else:
                raise ValueError(f"an answer without a length: {head[:200]!r}")
            if status != 200:
                raise ValueError(f"/publish answered {status}: {answer[:200]!r}")
            self.idle.append(connection)
            return json.loads(answer)
        except BaseException:
            writer.close()
            raise
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# -- Scenarios ----------------------------------------------------------------------------------


def split(samples: list[float]) -> str | None:
    """Say so when the samples fall in a fast group and a slow one (1.5 times and 30 ms or more apart)."""
    ordered = sorted(samples)
    if len(ordered) < 2:
        return None
    gap, at = max((ordered[index + 1] / ordered[index], index) for index in range(len(ordered) - 1)) if ordered[0] > 0 else (0, 0)
    fast, slow = ordered[: at + 1], ordered[at + 1 :]
    if gap < 1.5 or min(slow) - max(fast) < 30:  # a jitter of a few ms is no second mode
        return None
    return (f"bimodal: {len(fast)} sample(s) at {statistics.median(fast):,.0f} ms, "
            f"{len(slow)} at {statistics.median(slow):,.0f} ms")


async def broadcasts(server: Server, sockets: list[Socket], sink: Sink, publisher: Publisher, next_seq, samples: int) -> dict:
    """One un-counted broadcast, then ``samples`` timed ones, 1 s apart."""
    figures: dict = {"sockets": len(alive(sockets)), "samples_ms": [], "publish_answered_ms": [], "windows": []}
    for number in range(samples + 1):
        live = alive(sockets)
        seq = next_seq()
        done = sink.expect(seq, len(live))
        wall = time.time()
        began = time.perf_counter()
        await publisher.publish(seq)
        answered = time.perf_counter()
        try:
            finished = await asyncio.wait_for(done, 120)
        except TimeoutError:
            figures.setdefault("timeouts", []).append({"seq": seq, "received": sink.counts[seq], "expected": len(live)})
            finished = float("nan")
        milliseconds = 1000 * (finished - began)
        if number == 0:
            figures["warm_up_ms"] = round(milliseconds, 1)
        else:
            figures["samples_ms"].append(round(milliseconds, 1))
            figures["publish_answered_ms"].append(round(1000 * (answered - began), 1))
            figures["windows"].append([wall, time.time()])
        await asyncio.sleep(1.0)
    valid = [sample for sample in figures["samples_ms"] if not math.isnan(sample)]
    figures["median_ms"] = statistics.median(valid) if valid else None
    figures["split"] = split(valid)
    try:  # the server's GC pauses of 20 ms or more during each sample (one process: all of them)
        pauses = (await asyncio.to_thread(server.get_json, "/gc"))["pauses"]
        figures["gc_pauses_in_samples"] = [
            [[generation, milliseconds] for moment, generation, milliseconds, _ in pauses if start <= moment <= end + 0.01]
            for start, end in figures["windows"]]
    except (OSError, ValueError, KeyError):
        figures["gc_pauses_in_samples"] = None
    del figures["windows"]
    return figures


async def memory_and_broadcasts(server: Server, sizes: tuple[int, int], samples: int) -> dict:
    """1. and 2. on one server: warm up, baseline RSS, open sizes[0] sockets, broadcast, grow to sizes[1], RSS, broadcast."""
    sink, publisher = Sink(), Publisher(server.port)
    seqs = iter(range(1, 1_000_000))

    def next_seq() -> int:
        return next(seqs)

    figures: dict = {}
    try:
        warm, _ = await open_sockets(server.port, 100, sink)
        await broadcasts(server, warm, sink, publisher, next_seq, 0)
        for socket in warm:
            socket.close()
        await asyncio.sleep(1.5)
        baseline = server.rss()
        baseline_objects = await gc_objects(server)
        sockets, figures["opening_small"] = await open_sockets(server.port, sizes[0], sink)
        await asyncio.sleep(0.5)
        figures[str(sizes[0])] = await broadcasts(server, sockets, sink, publisher, next_seq, samples)
        more, figures["opening_large"] = await open_sockets(server.port, sizes[1] - sizes[0], sink)
        sockets += more
        await asyncio.sleep(1.0)
        loaded = server.rss()
        loaded_objects = await gc_objects(server)
        count = max(1, len(alive(sockets)))
        figures["memory"] = {"sockets": len(alive(sockets)), "baseline_mb": round(baseline / 2**20, 1), "loaded_mb": round(loaded / 2**20, 1),
                             "kb_per_socket": round((loaded - baseline) / count / 1024, 1),
                             "gc_objects_per_socket": round((loaded_objects - baseline_objects) / count) if None not in (loaded_objects, baseline_objects) else None}
        figures[str(sizes[1])] = await broadcasts(server, sockets, sink, publisher, next_seq, samples)
        figures["memory"]["after_broadcasts_mb"] = round(server.rss() / 2**20, 1)
        figures["closed_by_server"] = sum(1 for socket in sockets if socket.lost.done())
        figures["unparsed_messages"] = sink.unparsed
        for socket in sockets:
            socket.close()
        await asyncio.wait_for(asyncio.gather(*(socket.lost for socket in sockets)), 30)
        await asyncio.sleep(3.0)  # the servers' on_close, group_discard and the like
        figures["memory"]["after_close_mb"] = round(server.rss() / 2**20, 1)
        closed_objects = await gc_objects(server)
        collected_objects = await gc_objects(server, collect=True)
        if None not in (closed_objects, collected_objects, baseline_objects):  # what the closed sockets left behind
            figures["memory"]["gc_objects_left_per_closed_socket"] = round((closed_objects - baseline_objects) / len(sockets), 1)
            figures["memory"]["gc_objects_left_after_collect"] = round((collected_objects - baseline_objects) / len(sockets), 1)
    finally:
        publisher.close()
    return figures


async def sustained(server: Server, sockets_wanted: int, rate: float, seconds: float, drain: float = 15) -> dict:
    """3. (and 4.): ``sockets_wanted`` sockets, ``rate`` publishes a second for ``seconds``, each on schedule."""
    sink, publisher = Sink(), Publisher(server.port)
    try:
        sockets, opening = await open_sockets(server.port, sockets_wanted, sink)
        per_worker = collections.Counter(json.loads(socket.hello).get("hello") for socket in sockets)
        await asyncio.sleep(1.0)
        await publisher.publish(0)  # warm-up, and a kept-alive connection
        await asyncio.sleep(0.5)
        total = round(rate * seconds)
        load = sink.load = Load(1, total, sockets)
        publishes: set[asyncio.Task] = set()
        failed = [0]

        async def publish(seq: int) -> None:
            try:
                await publisher.publish(seq, timeout=30)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                failed[0] += 1

        gc_before = await gc_state(server)
        cpu_before = server.cpu_seconds()
        wall = time.time()
        began = time.perf_counter()
        for number in range(total):
            await asyncio.sleep(max(0.0, began + number / rate - time.perf_counter()))
            task = asyncio.ensure_future(publish(number + 1))
            publishes.add(task)
            task.add_done_callback(publishes.discard)
        sending = time.perf_counter() - began
        if publishes:
            await asyncio.wait(publishes, timeout=40)
        deadline = time.perf_counter() + drain
        while load.received < total * len(alive(sockets)) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        cpu = server.cpu_seconds() - cpu_before
        gc_after = await gc_state(server)
        gc_figures = None
        if gc_before and gc_after and gc_before["pid"] == gc_after["pid"]:  # one process (or the same worker twice)
            gc_figures = {"pid": gc_after["pid"], "full_collections": gc_after["collections"][2] - gc_before["collections"][2],
                          "longest_ms": max((ms for moment, _, ms, _ in gc_after["pauses"] if moment >= wall), default=0)}
        elapsed = (load.last_delivery or time.perf_counter()) - began
        expected = total * len(sockets)
        figures = {
            "sockets": len(sockets), "opening": opening, "per_worker": dict(per_worker),
            "publishes": total, "publish_rate": round((total - 1) / sending, 2) if total > 1 else None,
            "publishes_failed": failed[0], "most_publishes_in_flight": publisher.most_in_flight,
            "delivered": load.received, "expected": expected, "lost": expected - load.received,
            "duplicated": load.duplicated, "out_of_order": load.out_of_order,
            "sockets_complete": sum(1 for socket in sockets if all(socket.seen)),
            "closed_by_server": sum(1 for socket in sockets if socket.lost.done()),
            "deliveries_per_s": round(load.received / elapsed) if elapsed > 0 else None,
            "expected_per_s": round(rate * len(sockets)),
            "p50_ms": load.percentile(0.50), "p99_ms": load.percentile(0.99), "max_ms": max(load.latency_ms, default=None),
            "server_cpu_pct": round(100 * cpu / elapsed) if elapsed > 0 else None,
            "publish_errors": dict(publisher.errors), "unparsed_messages": sink.unparsed, "gc": gc_figures,
        }
        for socket in sockets:
            socket.close()
    finally:
        publisher.close()
    return figures


async def handshake_rate(port: int, path: str, cookie: str | None, seconds: float, clients: int = 50, warm_up: float = 1.0) -> dict:
    """5. ``clients`` loops of open (until the hello) and close; handshakes completed in a ``seconds`` window after ``warm_up``."""
    figures: dict = {}
    try:
        await connect(port, path, lambda *_: None, timeout=10)
        figures["anonymous"] = "accepted (no auth)" if cookie is None else "ACCEPTED: not refused"
    except Refused as refusal:
        figures["anonymous"] = f"refused: {refusal.args[0]}"
    except (OSError, TimeoutError) as error:
        figures["anonymous"] = f"{type(error).__name__}"
    began = time.perf_counter()
    window = (began + warm_up, began + warm_up + seconds)
    done = [0]
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()

    async def client() -> None:
        while (now := time.perf_counter()) < window[1]:
            try:
                socket = await connect(port, path, lambda *_: None, cookie, timeout=10)
                finished = time.perf_counter()
                socket.close()
                if window[0] <= finished < window[1]:
                    done[0] += 1
                    latencies.append(finished - now)
            except (OSError, TimeoutError, Refused) as error:
                errors[f"{type(error).__name__}: {error}"[:80]] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client() for _ in range(clients)))
    latencies.sort()
    figures.update({
        "handshakes_per_s": round(done[0] / seconds), "clients": clients,
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99) - 1], 1) if latencies else None,
        "errors": dict(errors),
    })
    return figures


# -- Report -------------------------------------------------------------------------------------


def cell(value, pattern: str = "{:,.0f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def report(data: dict) -> str:
    small, large = data["sizes"]
    lines = [f"Measured {data['date']} on {data['machine']}{' (QUICK RUN: fewer sockets, samples and seconds)' if data['quick'] else ''}.",
             f"Server on CPU 0, clients on CPU 1, 127.0.0.1; load average at the start: {data['load_average']}."]
    busy = [f"{part} {name} ({figures['other_work_cpus']:.2f})"
            for part in ("memory", "sustained", "two_workers", "handshakes") for name, figures in data.get(part, {}).items()
            if figures.get("other_work_cpus", 0) >= 0.1]
    if busy:
        lines.append(f"**Other work shared the machine** (CPUs busy with other processes than this benchmark's, on average) during: {'; '.join(busy)}.")
    lines.append("")
    memory = data["memory"]
    ceiling = memory.get(CEILING, {})
    lines += [(f"**1-2. Memory with {large:,} sockets; one broadcast to {small:,} and to {large:,} sockets** "
               f"(ms until the last socket has it: median of {data['samples']}, ratio to raw Tornado)"), "",
              f"| server | KB per socket | GC-tracked objects per socket | {small:,}: ms | ratio | {large:,}: ms | ratio | sockets refused or closed | server log problems |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, figures in memory.items():
        if "error" in figures:
            lines.append(f"| {name} | {figures['error']} | | | | | | | |")
            continue
        cells = []
        for size in (small, large):
            entry, top = figures.get(str(size), {}), ceiling.get(str(size), {})
            ratio = entry["median_ms"] / top["median_ms"] if entry.get("median_ms") and top.get("median_ms") else None
            cells += [cell(entry.get("median_ms")), cell(ratio, "{:.2f}")]
        refused = sum(sum(figures[key]["failed"].values()) for key in ("opening_small", "opening_large")) + figures.get("closed_by_server", 0)
        lines.append(f"| {name} | {cell(figures['memory']['kb_per_socket'], '{:.1f}')} | {cell(figures['memory'].get('gc_objects_per_socket'))} | "
                     f"{' | '.join(cells)} | {refused} | {figures['server_log_problems']} |")
    lines += ["", ("Every sample (ms), the un-counted warm-up first in brackets, and the server's garbage collections of 20 ms or more "
                   "during each sample (generation:ms):"), ""]
    for name, figures in memory.items():
        for size in (small, large):
            entry = figures.get(str(size))
            if not entry:
                continue
            gcs = entry.get("gc_pauses_in_samples") or []
            noted = "; ".join(f"#{index + 1}: " + ", ".join(f"gen{g}:{ms:.0f}" for g, ms in pauses) for index, pauses in enumerate(gcs) if pauses)
            lines.append(f"- {name}, {size:,}: [{entry.get('warm_up_ms')}] {', '.join(f'{s:,.0f}' for s in entry['samples_ms'])}"
                         f"{' — ' + entry['split'] if entry.get('split') else ''}{' — GC ' + noted if noted else ''}"
                         f"{' — TIMEOUTS ' + json.dumps(entry['timeouts']) if entry.get('timeouts') else ''}")
    lines += ["", ("RSS (MB) after the warm-up, with all the sockets, after their broadcasts, and 3 s after closing them; "
                   "GC-tracked objects left per closed socket, compared with after the warm-up (then after a gc.collect()):"), ""]
    for name, figures in memory.items():
        entry = figures.get("memory")
        if entry:
            lines.append(f"- {name}: {entry['baseline_mb']} → {entry['loaded_mb']} → {entry.get('after_broadcasts_mb')} → {entry.get('after_close_mb')}; "
                         f"{cell(entry.get('gc_objects_left_per_closed_socket'), '{:.1f}')} objects left per closed socket "
                         f"({cell(entry.get('gc_objects_left_after_collect'), '{:.1f}')} after gc.collect())")
    for title, key in ((f"**3. Sustained: {data['load']['sockets']:,} sockets, {data['load']['rate']} publishes/s for {data['load']['seconds']} s, one process**", "sustained"),
                       ("**4. The same with Redis and 2 worker processes (both on CPU 0)**", "two_workers")):
        runs = data.get(key, {})
        if not runs:
            continue
        top = data.get("sustained", {}).get(CEILING, {})
        lines += ["", title, "",
                  ("| server | deliveries/s | of raw | lost | duplicated | out of order | p50 ms | p99 ms | p99 vs raw | max ms | server CPU "
                   "| full GCs (longest ms) | sockets per worker | server log problems |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for name, figures in runs.items():
            if "error" in figures:
                lines.append(f"| {name} | {figures['error']} |" + " |" * 12)
                continue
            of_raw = figures["deliveries_per_s"] / top["deliveries_per_s"] if top.get("deliveries_per_s") and figures.get("deliveries_per_s") else None
            p99_ratio = figures["p99_ms"] / top["p99_ms"] if top.get("p99_ms") and figures.get("p99_ms") is not None else None
            gc = figures.get("gc")
            gcs = f"{gc['full_collections']} ({gc['longest_ms']:.0f})" if gc and len(figures.get("per_worker") or ()) <= 1 else "n/a"
            workers = " / ".join(str(count) for count in figures["per_worker"].values()) if len(figures.get("per_worker") or ()) > 1 else "1 process"
            lines.append(f"| {name} | {cell(figures['deliveries_per_s'])} | {cell(of_raw, '{:.0%}')} | {figures['lost']:,} | {figures['duplicated']:,} | "
                         f"{figures['out_of_order']:,} | {cell(figures['p50_ms'])} | {cell(figures['p99_ms'])} | {cell(p99_ratio, '{:.2f}')} | "
                         f"{cell(figures['max_ms'])} | {cell(figures['server_cpu_pct'], '{}%')} | {gcs} | {workers} | {figures['server_log_problems']} |")
        lines.append(f"\nExpected {data['load']['rate'] * data['load']['sockets']:,} deliveries/s. Publishes failed / most in flight at once: "
                     + "; ".join(f"{name}: {f.get('publishes_failed')}/{f.get('most_publishes_in_flight')}" for name, f in runs.items() if "error" not in f))
    hands = data.get("handshakes", {})
    if hands:
        lines += ["", (f"**5. Handshakes per second: {next(iter(hands.values())).get('clients', 50)} clients opening and closing sockets "
                       "with a logged-in session (SQLite, database sessions)**"), "",
                  "| server | handshakes/s | ratio to django_tornado | p50 ms | p99 ms | anonymous handshake | errors | server log problems |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        ours = hands.get("django_tornado, login_required", {}).get("handshakes_per_s")
        for name, figures in hands.items():
            if "error" in figures:
                lines.append(f"| {name} | {figures['error']} | | | | | | |")
                continue
            ratio = figures["handshakes_per_s"] / ours if ours else None
            lines.append(f"| {name} | {figures['handshakes_per_s']:,} | {cell(ratio, '{:.2f}')} | {cell(figures['p50_ms'], '{:.1f}')} | "
                         f"{cell(figures['p99_ms'], '{:.1f}')} | {figures['anonymous']} | {sum(figures['errors'].values())} | {figures['server_log_problems']} |")
    noted = [(part, name, figures["server_log_exceptions"]) for part in ("memory", "sustained", "two_workers", "handshakes")
             for name, figures in data.get(part, {}).items() if figures.get("server_log_exceptions")]
    if noted:
        lines += ["", "**Exceptions in the servers' logs** (each traceback's last line, how many times)", ""]
        lines += [f"- {part}, {name}: " + "; ".join(f"{count} × `{line}`" for line, count in exceptions.items()) for part, name, exceptions in noted]
    lines += ["", "**Goals for django_tornado**", ""]
    lines += [f"- {'MET' if verdict else 'NOT MET' if verdict is False else 'NOT MEASURED'}: {text}" for text, verdict in goals(data)]
    return "\n".join(lines)


def goals(data: dict) -> list[tuple[str, bool | None]]:
    small, large = data["sizes"]
    memory = data["memory"]

    def figure(name: str, *keys):
        value = memory.get(name, {})
        for key in keys:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return value if isinstance(value, (int, float)) else None

    results = []
    kb = figure(OURS, "memory", "kb_per_socket")
    results.append((f"≤ 22 KB per socket at {large:,} sockets: {cell(kb, '{:.1f}')} KB", None if kb is None else kb <= 22))
    def full_gcs(name: str, size: int) -> str:
        """How many of the samples a full collection (of 20 ms or more) fell in, and the median of the others."""
        entry = memory.get(name, {}).get(str(size), {})
        hit = [any(generation == 2 for generation, _ in pauses) for pauses in entry.get("gc_pauses_in_samples") or []]
        if not hit:
            return "n/a"
        others = [sample for sample, was_hit in zip(entry["samples_ms"], hit) if not was_hit]
        return f"{sum(hit)}/{len(hit)} samples with a full GC, the others' median {cell(statistics.median(others) if others else None)} ms"

    for size in (small, large):
        ours, raw, channels = (figure(name, str(size), "median_ms") for name in (OURS, CEILING, CHANNELS_MEMORY))
        ok = None if None in (ours, raw) else ours <= 1.5 * raw
        results.append(((f"broadcast to {size:,} within 1.5x raw Tornado: {cell(ours)} ms vs {cell(raw)} ms "
                         f"({cell(ours / raw if ours and raw else None, '{:.2f}')}x; django_tornado {full_gcs(OURS, size)}; raw {full_gcs(CEILING, size)})"), ok))
        ok = None if None in (ours, channels) else channels >= 5 * ours
        results.append(((f"broadcast to {size:,} ≥ 5x faster than uvicorn + Channels in-memory: {cell(channels)} ms vs {cell(ours)} ms "
                         f"({cell(channels / ours if ours and channels else None, '{:.1f}')}x)"), ok))
    load = data.get("sustained", {})
    ours, raw = load.get(OURS, {}), load.get(CEILING, {})
    if raw.get("most_publishes_in_flight", 0) > 10:
        results.append(((f"(raw Tornado's sustained run fell behind: {raw['most_publishes_in_flight']} publishes in flight at once, p99 "
                         f"{raw['p99_ms']} ms; on an idle machine it keeps up with 1-2: the comparisons below are unreliable. "
                         f"Reference figures for raw Tornado, 1,000 sockets: {REFERENCE['deliveries_per_s']:,}/s, p99 {REFERENCE['p99_ms']} ms; "
                         f"django_tornado's here: {cell(ours.get('deliveries_per_s'))}/s, p99 {cell(ours.get('p99_ms'))} ms)"), None))
    if ours.get("deliveries_per_s") and raw.get("deliveries_per_s"):
        share = ours["deliveries_per_s"] / raw["deliveries_per_s"]
        results.append((f"sustained ≥ 95% of raw's deliveries/s: {share:.1%}", share >= 0.95))
        results.append(((f"sustained 0 lost, 0 duplicated: {ours['lost']} lost, {ours['duplicated']} duplicated "
                         f"({ours['out_of_order']} out of order)"), ours["lost"] == 0 and ours["duplicated"] == 0))
        ok = None if ours["p99_ms"] is None or raw["p99_ms"] is None else ours["p99_ms"] <= 2 * max(raw["p99_ms"], 1)
        results.append((f"sustained p99 within 2x raw's: {ours['p99_ms']} ms vs {raw['p99_ms']} ms", ok))
    else:
        results.append(("sustained load", None))
    redis = data.get("two_workers", {}).get(OURS_REDIS, {})
    if "lost" in redis:
        results.append((f"Redis, 2 workers: 0 lost: {redis['lost']} lost, {redis['duplicated']} duplicated, {redis['out_of_order']} out of order",
                        redis["lost"] == 0))
    else:
        results.append(("Redis, 2 workers: 0 lost", None))
    return results


# -- Main -----------------------------------------------------------------------------------------


def run_client(coroutine):
    """Run the clients' coroutine on CPU 1's loop: uvloop when there is one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sockets and samples, shorter loads (a smoke run)")
    parser.add_argument("--only", default="memory,sustained,redis,handshakes", help="comma-separated parts to run")
    parser.add_argument("--servers", default="", help="comma-separated substrings: run only the servers whose names contain one")
    options = parser.parse_args()
    parts = set(options.only.split(","))
    wanted = [part for part in options.servers.split(",") if part]

    def chosen(names):
        return [name for name in names if not wanted or any(part in name for part in wanted)]

    missing = [module for module in ("channels", "channels_redis", "uvicorn", "daphne", "redis") if __import__("importlib").util.find_spec(module) is None]
    if missing:
        print(f"Installing setup.cfg's bench extra ({', '.join(missing)} missing)...", file=sys.stderr)
        subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 sockets and more (servers inherit it)
    pin = taskset("1")
    if pin:
        os.sched_setaffinity(0, {1})  # the clients on CPU 1; the servers get CPU 0 by taskset
    quick = options.quick
    sizes = (1000, 2000) if quick else (1000, 5000)
    samples = 3 if quick else 5
    load = {"sockets": 500, "rate": 20, "seconds": 5} if quick else {"sockets": 1000, "rate": 20, "seconds": 20}
    window = 2 if quick else 5
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "quick": quick,
        "load_average": " ".join(f"{value:.2f}" for value in os.getloadavg()), "sizes": sizes, "samples": samples, "load": load,
        "uvicorn_websockets": "uvicorn's 'auto' WebSocket protocol (websockets-sansio with websockets installed), uvloop, httptools",
        "memory": {}, "sustained": {}, "two_workers": {}, "handshakes": {},
    }
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as directory, redis_server() as redis_port:
        database, session = make_database(directory)
        common = {"BENCH_DB": database, "BENCH_REDIS_PORT": str(redis_port)}
        redis_pid = int(re.search(r"process_id:(\d+)", redis_cli(redis_port, "info", "server"))[1])

        def measure(part: str, name: str, command, environment, job) -> None:
            redis_cli(redis_port, "flushall")
            figures: dict = {"load_1min_before": round(os.getloadavg()[0], 2)}
            try:
                with started(name, command, environment, common, figures) as server:
                    other_work = OtherWork(server, redis_pid)
                    figures.update(run_client(job(server)))
                    figures["other_work_cpus"] = other_work.cpus()
            except Exception as error:  # noqa: BLE001 (one server failing is a row of the report, not the end of the run)
                figures["error"] = f"{type(error).__name__}: {error}"[:120]
            figures["load_1min_after"] = round(os.getloadavg()[0], 2)
            data[part][name] = figures
            print(f"  {part}: {name} done ({round(time.monotonic() - began)} s)", file=sys.stderr)

        if "memory" in parts:
            for name in chosen(SERVERS):
                measure("memory", name, *SERVERS[name], lambda server: memory_and_broadcasts(server, sizes, samples))
        if "sustained" in parts:
            for name in chosen(SERVERS):
                measure("sustained", name, *SERVERS[name], lambda server: sustained(server, load["sockets"], load["rate"], load["seconds"]))
        if "redis" in parts:
            for name in chosen(TWO_WORKERS):
                measure("two_workers", name, *TWO_WORKERS[name], lambda server: sustained(server, load["sockets"], load["rate"], load["seconds"]))
        if "handshakes" in parts:
            for name, (server_name, path) in HANDSHAKES.items():
                if name in chosen(HANDSHAKES) or server_name in chosen(SERVERS):
                    cookie = None if server_name == CEILING else session
                    measure("handshakes", name, *SERVERS[server_name],
                            lambda server, path=path, cookie=cookie: handshake_rate(server.port, path, cookie, window))
    data["elapsed_s"] = round(time.monotonic() - began)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(RESULTS, f"sockets-{stamp}{'-quick' if quick else ''}.json"), "w") as output:
        json.dump(data, output, indent=1)
    print(report(data) + f"\n\nThe whole run took {data['elapsed_s']} s.")


if __name__ == "__main__":
    main()
