#!/usr/bin/env python
"""Measure django_tornado's live updates (Channel, EventStream) under load.

    nice -n 10 /work/bench-venv/bin/python bench/live.py [--quick] [--rounds N] [--only fanout|redis]

1. Fan-out, one process, memory backend: N = 5,000 clients wait on the channel;
   one publish (GET /publish, a plain view calling Channel.publish) must reach
   them all. Timed from sending /publish until the last client has the event,
   for N long-polls (an @asynchronous view calling Channel.query) and for N
   EventStream clients, beside raw Tornado in the same round (bench/servers.py
   ``raw``: a hand-written list of parked long-polls; bench/live_servers.py
   ``raw-sse``: a hand-written list of SSE handlers writing ``data: ...`` and
   flushing). Also the server's RSS before and after parking the N clients,
   per client. Rounds interleave the servers; each server is started fresh per
   measurement and warmed with a 100-client fan-out first; figures are medians.
2. Delivery across processes, Redis: django_tornado with 2 worker processes
   (serve(processes=2)) and TORNADO_CHANNELS_URL=redis://..., 2,000 EventStream
   clients (--quick: 1,000), 50 events/s for 60 s (--quick: 15 s) published by
   a separate plain Python process (Channel("news").publish), each event
   carrying its sequence number and publish time (time.time()). Per client:
   lost, duplicated, out of order; publish-to-delivery latency p50/p99/max.
   Beside django-eventstream (EVENTSTREAM_REDIS; also with its RedisStorage)
   served by daphne, its docs' server, 2 processes sharing one socket (daphne
   --fd), with the same clients and the same publisher (send_event from a
   plain process). Clients reconnect as EventSource does (after the stream's
   ``retry``, with Last-Event-ID) and each reconnection is counted.

Servers are pinned to CPU 0 (taskset; on 2 cores the 2 workers of part 2
share it), this process (the clients), the publisher and Redis to CPU 1, all
on 127.0.0.1. The clients are asyncio Protocols (uvloop when installed) that
parse chunked SSE themselves. Writes Markdown to stdout and
bench/results/live-<stamp>[-quick].json. Needs redis-server (a private one on
a free port, no persistence) and setup.cfg's bench extra (pip install -e '.[bench]').
"""

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run
from run import (
    PY,
    RESULTS,
    ROOT,
    ChatTally,
    LoggedServer,
    children,
    fan_out,
    percentile_of,
    redis_server,
    taskset,
)

CHANNEL = "news"
IGNORED_EVENTS = {b"stream-open", b"keep-alive"}  # django-eventstream's own
RESET_EVENTS = {b"reset", b"stream-reset"}  # django_tornado's, django-eventstream's
QUIET = 20.0  # part 2: seconds without any delivery after which what has not come counts as lost (a busy server may pause that long)
DRAIN = 60.0  # part 2: the longest wait for stragglers after the last publish
BATCH = 500  # connections opened at once: inside every server's listen backlog (2048)

# name -> (command, environment); {port} and {redis} are filled in.
FAN_OUT_SERVERS = {
    "raw Tornado, long-poll (ceiling)": ([PY, "servers.py", "raw", "{port}"], {}),
    "django_tornado, Channel.query long-poll": ([PY, "live_servers.py", "ours", "{port}", "1"], {}),
    "raw Tornado, SSE (ceiling)": ([PY, "live_servers.py", "raw-sse", "{port}"], {}),
    "django_tornado, EventStream": ([PY, "live_servers.py", "ours", "{port}", "1"], {}),
}
CEILINGS = {"long-poll": "raw Tornado, long-poll (ceiling)", "sse": "raw Tornado, SSE (ceiling)"}
REDIS_SERVERS = {
    "django_tornado, 2 processes": ([PY, "live_servers.py", "ours", "{port}", "2"], {"BENCH_CHANNELS_URL": "redis://127.0.0.1:{redis}/0"}, "ours"),
    "django-eventstream, daphne x2 (EVENTSTREAM_REDIS)": ([PY, "live_servers.py", "daphne", "{port}", "2"], {}, "eventstream"),
    "django-eventstream, daphne x2 (EVENTSTREAM_REDIS + RedisStorage)": (
        [PY, "live_servers.py", "daphne", "{port}", "2"], {"BENCH_ES_STORAGE": "redis"}, "eventstream"),
}


# -- Processes: servers with a log file, Redis -------------------------------------------


class LiveServer(LoggedServer):
    """A server of this benchmark, and the processes of it that serve requests."""

    def workers(self) -> list[int]:
        """The leaves of the process tree."""
        return [pid for pid in self.pids() if not children(pid)]


def threads_of(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def connections_per_worker(server: LiveServer) -> list[int]:
    """Established connections to the server's port that each worker holds (from /proc)."""
    port = f":{server.port:04X}"
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(port) and fields[3] == "01":  # local address is the server's; ESTABLISHED
                inodes.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in server.workers():
        count = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    count += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        counts.append(count)
    return counts


# -- The SSE client ------------------------------------------------------------------------


class SSEStream(asyncio.Protocol):
    """One Server-Sent Events client on one connection: GET ``path``, undo the chunked encoding, parse events.

    ``on_events(stream, events, now)`` gets the events of each read as
    (id, name, data) tuples of bytes (None where absent), ``now`` the wall clock
    at the read. ``opened`` resolves at the first block (field or comment) of
    the stream, ``lost`` when the connection ends.
    """

    def __init__(self, path: str, on_events, last_event_id: bytes | None = None) -> None:
        loop = asyncio.get_running_loop()
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        if last_event_id is not None:
            head += f"Last-Event-ID: {last_event_id.decode()}\r\n"
        self.request = (head + "\r\n").encode()
        self.on_events = on_events
        self.opened = loop.create_future()
        self.lost = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()  # what came and is not decoded yet
        self.body = bytearray()  # the decoded stream, after the last complete block
        self.chunked: bool | None = None  # None until the head has come
        self.last_id: bytes | None = last_event_id
        self.retry_ms: int | None = None
        self.first_event_at: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the stream opened ({exc})"))
        if not self.lost.done():
            self.lost.set_result(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(reason))
        self.close()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        if self.chunked is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            del buffer[: end + 4]
            if not head.startswith(b"http/1.1 200"):
                self._fail(f"answered {head[:60]!r}")
                return
            self.chunked = b"\r\ntransfer-encoding: chunked" in head
        if self.chunked:
            position = 0
            while True:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                size = int(buffer[position:line_end].split(b";", 1)[0], 16)
                if size == 0:  # the last chunk: the server ended the stream
                    self.close()
                    break
                if len(buffer) < line_end + 4 + size:
                    break
                self.body += buffer[line_end + 2 : line_end + 2 + size]
                position = line_end + 4 + size
            del buffer[:position]
        else:
            self.body += buffer
            buffer.clear()
        end = self.body.rfind(b"\n\n")
        if end < 0:
            return
        blocks = bytes(self.body[:end]).split(b"\n\n")
        del self.body[: end + 2]
        events = []
        for block in blocks:
            event_id = name = data = None
            for line in block.split(b"\n"):
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    data = value if data is None else data + b"\n" + value
                elif field == b"id":
                    event_id = value
                elif field == b"event":
                    name = value
                elif field == b"retry" and value.isdigit():
                    self.retry_ms = int(value)
            if event_id is not None:
                self.last_id = event_id
            if data is not None:
                events.append((event_id, name, data))
        if not self.opened.done():
            self.opened.set_result(None)
        if events:
            self.on_events(self, events, now)


async def open_streams(port: int, count: int, on_events, path: str = "/live") -> list[SSEStream]:
    """``count`` streams, connected ``BATCH`` at a time; each opened (the server holds its reader)."""
    loop = asyncio.get_running_loop()
    streams: list[SSEStream] = []
    for start in range(0, count, BATCH):
        batch = await asyncio.gather(*(loop.create_connection(lambda: SSEStream(path, on_events), "127.0.0.1", port)
                                       for _ in range(min(BATCH, count - start))))
        streams += [stream for _, stream in batch]
    await asyncio.wait_for(asyncio.gather(*(stream.opened for stream in streams)), 120)
    return streams


# -- 1. Fan-out, one process ----------------------------------------------------------------


async def sse_fan_out(server: LiveServer, count: int) -> dict:
    """Park ``count`` event streams, publish once, time until every one has the event."""
    loop = asyncio.get_running_loop()
    baseline = server.rss()
    everyone = loop.create_future()
    remaining = [count]

    def on_events(stream: SSEStream, events: list, now: float) -> None:
        if stream.first_event_at is None and any(name not in IGNORED_EVENTS for _, name, _ in events):
            stream.first_event_at = time.perf_counter()
            remaining[0] -= 1
            if not remaining[0] and not everyone.done():
                everyone.set_result(None)

    streams = await open_streams(server.port, count, on_events)
    try:
        deadline = time.monotonic() + 60
        while (await asyncio.to_thread(server.get_json, "/waiting", 30))["waiting"] < count:
            if time.monotonic() > deadline:
                raise TimeoutError("the server does not hold every stream")
            await asyncio.sleep(0.1)
        parked_rss = server.rss()
        started = time.perf_counter()
        await asyncio.to_thread(server.get_json, "/publish", 60)
        published = time.perf_counter() - started
        await asyncio.wait_for(everyone, 120)
    finally:
        for stream in streams:
            stream.close()
    times = sorted(stream.first_event_at - started for stream in streams)
    deadline = time.monotonic() + 10
    while (left := (await asyncio.to_thread(server.get_json, "/waiting", 30))["waiting"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return {
        "all_answered_ms": 1000 * times[-1],
        "p99_ms": 1000 * times[int(len(times) * 0.99) - 1],
        "publish_ms": 1000 * published,
        "kb_per_waiter": (parked_rss - baseline) / count / 1024,
        "readers_left_after_close": left,  # the server still holding streams 10 s after every client left (a leak)
    }


def fan_out_round(size: int) -> dict:
    results = {}
    for name, (command, environment) in FAN_OUT_SERVERS.items():
        measure = sse_fan_out if ("SSE" in name or "EventStream" in name) else fan_out
        server = LiveServer(name, command, environment)
        try:
            asyncio.run(measure(server, 100))  # warm up: the first requests, the channel's hub
            results[name] = asyncio.run(measure(server, size))
        except (OSError, TimeoutError, RuntimeError) as error:
            results[name] = {"failed": f"{type(error).__name__}: {error}"[:120]}
        finally:
            results.setdefault(name, {"failed": "interrupted"})["server_log"] = server.log_lines()[:10]
            server.stop()
        entry = results[name]
        print(f"  {name}: " + (entry["failed"] if "failed" in entry else
                                f"{entry['all_answered_ms']:.0f} ms, {entry['kb_per_waiter']:.1f} KB per client"), file=sys.stderr)
    return results


# -- 2. Delivery across processes, Redis -------------------------------------------------------


class Receiver:
    """What one client got: run.ChatTally over the sequence numbers, plus resets and reconnections."""

    __slots__ = ("reconnects", "resets", "stream", "tally", "unparsed")

    def __init__(self, total: int) -> None:
        self.tally = ChatTally(total)
        self.resets = self.reconnects = self.unparsed = 0
        self.stream: SSEStream | None = None


async def delivery(port: int, clients: int, publish_command: list[str], total: int, server: LiveServer, *, drain: float) -> dict:
    """``clients`` streams stay connected while ``publish_command`` publishes events 0 .. total - 1."""
    loop = asyncio.get_running_loop()
    latency_ms: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    receivers = [Receiver(total) for _ in range(clients)]
    stopping = [False]
    by_second: collections.Counter[int] = collections.Counter()  # deliveries, by second since publishing began
    publishing_began = [time.time()]

    def on_events_of(receiver: Receiver):
        tally = receiver.tally

        def on_events(stream: SSEStream, events: list, now: float) -> None:
            for _, name, data in events:
                if name in IGNORED_EVENTS:
                    continue
                if name in RESET_EVENTS:
                    receiver.resets += 1
                    continue
                try:
                    event = json.loads(data)
                    number, sent = event["seq"], event["t"]
                except (ValueError, KeyError, TypeError):
                    receiver.unparsed += 1
                    continue
                tally.take(number, number + 1)  # out of order: a number not above the last one taken (it starts at 0)
                latency_ms[round(1000 * (now - sent))] += 1
                by_second[int(now - publishing_began[0])] += 1

        return on_events

    async def client(receiver: Receiver, stream: SSEStream) -> None:
        """Hold the stream; reconnect as EventSource does when the server closes it."""
        on_events = stream.on_events
        while True:
            await stream.lost
            if stopping[0]:
                return
            receiver.reconnects += 1
            await asyncio.sleep((stream.retry_ms or 3000) / 1000)
            while not stopping[0]:
                last_id = stream.last_id
                try:
                    _, stream = await loop.create_connection(lambda: SSEStream("/live", on_events, last_id), "127.0.0.1", port)  # noqa: B023
                    receiver.stream = stream
                    await stream.opened
                    break
                except (OSError, ConnectionError) as error:
                    errors[f"reconnect: {type(error).__name__}: {str(error)[:60]}"] += 1
                    await asyncio.sleep(3)

    streams: list[SSEStream] = []
    for start in range(0, clients, BATCH):
        chunk = receivers[start : start + BATCH]
        batch = await asyncio.gather(*(loop.create_connection(lambda receiver=receiver: SSEStream("/live", on_events_of(receiver)), "127.0.0.1", port)
                                       for receiver in chunk))
        for receiver, (_, stream) in zip(chunk, batch):
            receiver.stream = stream
            streams.append(stream)
    opened = await asyncio.gather(*(asyncio.wait_for(stream.opened, 120) for stream in streams), return_exceptions=True)
    failed = [result for result in opened if isinstance(result, BaseException)]
    for failure in failed:
        errors[f"open: {type(failure).__name__}: {str(failure)[:60]}"] += 1
    tasks = [asyncio.ensure_future(client(receiver, receiver.stream)) for receiver in receivers]
    await asyncio.sleep(1)  # every worker has subscribed
    per_worker = connections_per_worker(server)
    threads = [threads_of(pid) for pid in server.workers()]
    parked_rss = server.rss()
    publishing_began[0] = time.time()
    publisher = await asyncio.create_subprocess_exec(*publish_command, stdout=subprocess.PIPE)
    try:
        output, _ = await publisher.communicate()
        published = json.loads(output)
        # Wait for stragglers: until every client has every event, or none came for QUIET s, or ``drain`` s have passed.
        ended = time.monotonic()
        progress, delivered = ended, -1
        while time.monotonic() < ended + drain:
            now_delivered = sum(receiver.tally.received for receiver in receivers)
            if now_delivered == published["sent"] * clients:
                break
            if now_delivered != delivered:
                progress, delivered = time.monotonic(), now_delivered
            elif time.monotonic() - progress > QUIET:
                break
            await asyncio.sleep(0.1)
        drained = time.monotonic() - ended
    finally:
        stopping[0] = True
        for receiver in receivers:
            if receiver.stream is not None:
                receiver.stream.close()
        if publisher.returncode is None:
            publisher.kill()
        await asyncio.gather(*tasks, return_exceptions=True)
    tallies = [receiver.tally for receiver in receivers]
    received = sum(tally.received for tally in tallies)
    expected = published["sent"] * clients

    def percentile(fraction: float) -> int | None:
        return percentile_of(latency_ms, fraction)

    return {
        "clients": clients, "opened": clients - len(failed),
        "publisher": published,
        "delivered": received, "expected": expected,
        "lost": expected - received,
        "duplicated": sum(tally.duplicated for tally in tallies),
        "out_of_order": sum(tally.out_of_order for tally in tallies),
        "clients_complete": sum(1 for tally in tallies if tally.received == published["sent"] and not tally.duplicated and not tally.out_of_order),
        "clients_with_losses": sum(1 for tally in tallies if tally.received < published["sent"]),
        "resets": sum(receiver.resets for receiver in receivers),
        "reconnects": sum(receiver.reconnects for receiver in receivers),
        "unparsed": sum(receiver.unparsed for receiver in receivers),
        "errors": dict(errors),
        "p50_latency_ms": percentile(0.50), "p99_latency_ms": percentile(0.99), "max_latency_ms": max(latency_ms, default=None),
        "streams_per_worker": per_worker,
        "threads_per_worker": threads,
        "server_rss_mb": parked_rss / 2**20,
        "delivered_by_second": dict(sorted(by_second.items())),
        "waited_after_publishing_s": round(drained, 1),
    }


def redis_run(name: str, clients: int, seconds: float, rate: float) -> dict:
    command, environment, peer = REDIS_SERVERS[name]
    with redis_server() as redis_port:
        environment = {key: value.format(redis=redis_port) for key, value in environment.items()}
        environment["BENCH_REDIS_PORT"] = str(redis_port)
        server = LiveServer(name, command, environment)
        try:
            time.sleep(2)  # every worker is up (daphne's load Django each on their own)
            publish = [PY, os.path.abspath(__file__), "publish", "--peer", peer, "--redis-port", str(redis_port),
                       "--rate", str(rate), "--seconds", str(seconds)]
            if environment.get("BENCH_ES_STORAGE"):
                publish += ["--es-storage", environment["BENCH_ES_STORAGE"]]
            result = asyncio.run(delivery(server.port, clients, publish, round(rate * seconds), server, drain=DRAIN))
            result["server_alive"] = server.process.poll() is None
        finally:
            lines = server.log_lines()
            server.stop()
    result["server_log_lines"] = len(lines)
    result["server_log_sample"] = lines[:8]
    return result


def publisher_main(options: argparse.Namespace) -> None:
    """``live.py publish``: a plain Python process publishing ``{"seq": n, "t": time.time()}`` on a fixed schedule."""
    os.environ["BENCH_LIVE"] = options.peer
    os.environ["BENCH_REDIS_PORT"] = str(options.redis_port)
    os.environ["BENCH_CHANNELS_URL"] = f"redis://127.0.0.1:{options.redis_port}/0"
    if options.es_storage:
        os.environ["BENCH_ES_STORAGE"] = options.es_storage
    import live_app

    if options.peer == "eventstream":
        from django_eventstream import send_event

        def publish(data: dict) -> None:
            send_event(CHANNEL, "message", data)
    else:
        publish = live_app.news.publish
    total = round(options.rate * options.seconds)
    calls, errors = [], collections.Counter()
    sent = 0
    started = time.monotonic()
    for number in range(total):
        time.sleep(max(0.0, started + number / options.rate - time.monotonic()))
        began = time.monotonic()
        try:
            publish({"seq": number, "t": time.time()})
            sent += 1
        except Exception as error:  # noqa: BLE001 (counted and reported)
            errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
        calls.append(time.monotonic() - began)
    elapsed = time.monotonic() - started
    print(json.dumps({
        "sent": sent, "rate": (total - 1) / elapsed if total > 1 else None, "errors": dict(errors),
        "publish_call_p50_ms": 1000 * statistics.median(calls) if calls else None,
        "publish_call_max_ms": 1000 * max(calls, default=0),
    }))


# -- Report --------------------------------------------------------------------------------------


def median_entry(rounds: list[dict], name: str) -> dict | None:
    entries = [round_results[name] for round_results in rounds if "failed" not in round_results.get(name, {"failed": 1})]
    if not entries:
        return None
    figures = {field: statistics.median(entry[field] for entry in entries) for field in ("all_answered_ms", "p99_ms", "publish_ms", "kb_per_waiter")}
    figures["fastest_ms"], figures["slowest_ms"] = min(entry["all_answered_ms"] for entry in entries), max(entry["all_answered_ms"] for entry in entries)
    figures["readers_left"] = max(entry.get("readers_left_after_close", 0) for entry in entries)
    return figures


def report(data: dict) -> str:
    lines = [f"Measured {data['date']} on {data['machine']}{' (--quick)' if data['quick'] else ''}.", ""]
    if data.get("fan_out"):
        size, rounds = data["fan_out"]["size"], data["fan_out"]["rounds"]
        lines += [(f"**1. Fan-out, one process, memory backend: {size:,} clients, one publish** "
                  f"(median of {len(rounds)} interleaved rounds; ratio: to raw Tornado's same transport in the same round, median)"), "",
                  "| server | all received ms | ratio | fastest / slowest round ms | p99 ms | publish answered ms | KB per client |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name in FAN_OUT_SERVERS:
            entry = median_entry(rounds, name)
            if entry is None:
                failures = [round_results.get(name, {}).get("failed") for round_results in rounds]
                lines.append(f"| {name} | failed: {failures[0]} | | | | | |")
                continue
            ceiling = CEILINGS["sse" if ("SSE" in name or "EventStream" in name) else "long-poll"]
            ratios = [round_results[name]["all_answered_ms"] / round_results[ceiling]["all_answered_ms"] for round_results in rounds
                      if "failed" not in round_results[name] and "failed" not in round_results[ceiling]]
            ratio = f"{statistics.median(ratios):.2f}" if ratios else ""
            lines.append(f"| {name} | {entry['all_answered_ms']:,.0f} | {ratio} | {entry['fastest_ms']:,.0f} / {entry['slowest_ms']:,.0f} | "
                         f"{entry['p99_ms']:,.0f} | {entry['publish_ms']:,.0f} | {entry['kb_per_waiter']:.1f} |")
            if entry["readers_left"]:
                lines.append(f"| ^ LEAK: {entry['readers_left']} readers still held 10 s after every client left | | | | | | |")
        lines.append("")
        problems = {name: entry["server_log"] for round_results in rounds for name, entry in round_results.items() if entry.get("server_log")}
        if problems:
            lines += ["Server log lines (first of each server):", ""] + [f"- {name}: `{log[0][:200]}` ({len(log)} lines)" for name, log in problems.items()] + [""]
    if data.get("redis"):
        redis = data["redis"]
        lines += [(f"**2. Redis, 2 worker processes: {redis['clients']:,} EventStream clients, {redis['rate']} events/s for {redis['seconds']} s "
                  "from a separate plain process** (workers share CPU 0; clients, publisher and Redis on CPU 1). "
                  f"Lost: not received once every client had every event, or after {QUIET:g} s without any delivery, "
                  f"or {DRAIN:g} s after the last publish (the wait is in the notes)."), "",
                  ("| server | events sent (rate/s) | delivered of expected | lost | duplicated | out of order | clients missing some | "
                  "reconnects | resets | p50 ms | p99 ms | max ms | streams per worker | threads per worker | RSS MB | server log lines |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
        for name, entry in redis["runs"].items():
            if "failed" in entry:
                lines.append(f"| {name} | failed: {entry['failed']} |" + " |" * 14)
                continue
            publisher = entry["publisher"]
            lines.append(
                f"| {name} | {publisher['sent']:,} ({publisher['rate']:.1f}) | {entry['delivered']:,} / {entry['expected']:,} | {entry['lost']:,} | "
                f"{entry['duplicated']:,} | {entry['out_of_order']:,} | {entry['clients_with_losses']:,} | {entry['reconnects']:,} | {entry['resets']:,} | "
                f"{entry['p50_latency_ms']} | {entry['p99_latency_ms']} | {entry['max_latency_ms']} | "
                f"{' / '.join(str(count) for count in entry['streams_per_worker'])} | {' / '.join(str(count) for count in entry['threads_per_worker'])} | "
                f"{entry['server_rss_mb']:.0f} | {entry['server_log_lines']} |")
        lines.append("")
        for name, entry in redis["runs"].items():
            notes = []
            if entry.get("opened", entry.get("clients")) != entry.get("clients"):
                notes.append(f"only {entry['opened']} of {entry['clients']} streams opened")
            if entry.get("errors"):
                notes.append(f"client errors {entry['errors']}")
            if entry.get("publisher", {}).get("errors"):
                notes.append(f"publisher errors {entry['publisher']['errors']}")
            if entry.get("lost"):
                notes.append(f"waited {entry['waited_after_publishing_s']} s after the last publish; "
                             f"deliveries by second since publishing began {entry['delivered_by_second']}")
            if entry.get("server_log_sample"):
                notes.append("server log: " + " / ".join(f"`{line[:160]}`" for line in entry["server_log_sample"][:3]))
            if notes:
                lines.append(f"- {name}: " + "; ".join(notes))
        lines.append("")
    return "\n".join(lines)


# -- Main ------------------------------------------------------------------------------------------


def raise_limits() -> None:
    """Open files up to the hard limit, this process on CPU 1, uvloop for the clients if it is there."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of streams (the servers inherit it)
    if taskset("1"):
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, {1})  # the clients (and the publisher, its child) on CPU 1; servers ask for CPU 0
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="part 2 with 1,000 clients for 15 s")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of part 1")
    parser.add_argument("--size", type=int, default=5000, help="clients of part 1")
    parser.add_argument("--clients", type=int, help="clients of part 2 (default 2,000; --quick 1,000)")
    parser.add_argument("--seconds", type=float, help="publishing time of part 2 (default 60; --quick 15)")
    parser.add_argument("--rate", type=float, default=50, help="events/s of part 2")
    parser.add_argument("--only", choices=("fanout", "redis"))
    parser.add_argument("--servers", help="part 2: only the servers whose name contains this")
    if sys.argv[1:2] == ["publish"]:
        publish_parser = argparse.ArgumentParser(prog="live.py publish")
        publish_parser.add_argument("--peer", choices=("ours", "eventstream"), required=True)
        publish_parser.add_argument("--redis-port", type=int, required=True)
        publish_parser.add_argument("--rate", type=float, required=True)
        publish_parser.add_argument("--seconds", type=float, required=True)
        publish_parser.add_argument("--es-storage")
        publisher_main(publish_parser.parse_args(sys.argv[2:]))
        return
    options = parser.parse_args()
    raise_limits()
    clients = options.clients or (1000 if options.quick else 2000)
    seconds = options.seconds or (15 if options.quick else 60)
    started = time.monotonic()
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": run.machine(),
        "quick": options.quick, "load_before": os.getloadavg(),
        "client_loop": type(asyncio.get_event_loop_policy()).__module__,
    }
    if options.only != "redis":
        data["fan_out"] = {"size": options.size, "rounds": []}
        for number in range(options.rounds):
            print(f"Fan-out round {number + 1} of {options.rounds}", file=sys.stderr)
            data["fan_out"]["rounds"].append(fan_out_round(options.size))
    if options.only != "fanout":
        data["redis"] = {"clients": clients, "seconds": seconds, "rate": options.rate, "runs": {}}
        for name in REDIS_SERVERS:
            if options.servers and options.servers not in name:
                continue
            print(f"Redis: {name}", file=sys.stderr)
            try:
                data["redis"]["runs"][name] = redis_run(name, clients, seconds, options.rate)
            except (OSError, TimeoutError, RuntimeError, ValueError) as error:
                data["redis"]["runs"][name] = {"failed": f"{type(error).__name__}: {error}"[:200]}
            entry = data["redis"]["runs"][name]
            print("  " + (entry["failed"] if "failed" in entry else f"lost {entry['lost']}, p99 {entry['p99_latency_ms']} ms"), file=sys.stderr)
    data["elapsed_s"] = round(time.monotonic() - started)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS, f"live-{stamp}{'-quick' if options.quick else ''}.json")
    with open(path, "w") as output:
        json.dump(data, output, indent=1)
    print(report(data) + f"\nThe whole run took {data['elapsed_s']} s; raw figures in {os.path.relpath(path, ROOT)}.\n")


if __name__ == "__main__":
    main()
