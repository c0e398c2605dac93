"""Reproductions of two things bench/live.py measures, with the detail the benchmark leaves out.

    nice -n 10 /work/bench-venv/bin/python bench/live_probe.py gc [--size 5000] [--rounds 3]
    nice -n 10 /work/bench-venv/bin/python bench/live_probe.py overflow [--server eventstream] [--clients 1000] [--seconds 5]

``gc``: raw Tornado's SSE list and django_tornado's EventStream (one process,
memory backend; bench/live_servers.py), each run with a gc.callbacks hook that
times every collection. Prints the GC-tracked objects each parked stream adds,
then, per fan-out (bench/live.py's: park ``size`` streams, publish once, time
until all have it), the full (generation 2) collections that ran while the
streams were opened and woken and the longest one: a full collection stops
the IOLoop, and its length grows with the objects the parked streams hold.

``overflow``: bench/live.py's Redis scenario on one server of its table
(``--server``: a part of its name), printing per second how many events the
clients got, the last sequence number each client holds at the end, and
whether one more event, published 3 s after the run, reaches them.
"""

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import live
from run import PY, redis_server


def gc_serve(output: str, name: str, port: int) -> None:
    """``live_probe.py _gcserve OUT raw|ours PORT``: a live_servers.py server, its GC timed, figures in OUT twice a second."""
    figures = {"runs": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "longest": [0.0, 0.0, 0.0]}
    began = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        generation, took = info["generation"], time.perf_counter() - began[0]
        figures["runs"][generation] += 1
        figures["seconds"][generation] += took
        figures["longest"][generation] = max(figures["longest"][generation], took)

    def write() -> None:
        while True:
            time.sleep(0.5)
            with open(output + ".tmp", "w") as stream:
                json.dump({**figures, "tracked": sum(len(gc.get_objects(generation)) for generation in range(3))}, stream)
            os.replace(output + ".tmp", output)

    gc.callbacks.append(timer)
    threading.Thread(target=write, daemon=True).start()
    import live_servers

    if name == "raw":
        live_servers.raw_sse(port)
    else:
        live_servers.ours(port, 1)


async def gc_measure(server: live.LiveServer, output: str, size: int, rounds: int) -> None:
    def figures() -> dict:
        time.sleep(1.1)  # two writes of the file: figures from after the last step
        with open(output) as stream:
            return json.load(stream)

    await live.sse_fan_out(server, 100)  # warm up, as bench/live.py does
    base = figures()
    streams = await live.open_streams(server.port, size, lambda *_: None)
    held = figures()
    for stream in streams:
        stream.close()
    print(f"{server.name}: {(held['tracked'] - base['tracked']) / size:.0f} GC-tracked objects per parked stream "
          f"({held['tracked']:,} in all with {size:,} streams)")
    for _ in range(rounds):
        before = figures()
        result = await live.sse_fan_out(server, size)
        after = figures()
        runs = after["runs"][2] - before["runs"][2]
        print(f"  fan-out to {size:,}: all received in {result['all_answered_ms']:,.0f} ms; {runs} full collections while "
              f"opening and waking them ({after['seconds'][2] - before['seconds'][2]:.2f} s), the longest of this server so far "
              f"{1000 * after['longest'][2]:,.0f} ms")


def gc_probe(size: int, rounds: int) -> None:
    for name, title in (("raw", "raw Tornado, SSE"), ("ours", "django_tornado, EventStream")):
        output = f"/tmp/live-probe-gc-{os.getpid()}-{name}.json"
        server = live.LiveServer(title, [PY, os.path.abspath(__file__), "_gcserve", output, name, "{port}"], {})
        try:
            asyncio.run(gc_measure(server, output, size, rounds))
        finally:
            lines = server.log_lines()
            server.stop()
            with contextlib.suppress(OSError):
                os.remove(output)
        if lines:
            print(f"  server log: {lines[:5]}")


def overflow_probe(server_part: str, clients: int, seconds: float, rate: float) -> None:
    name = next(name for name in live.REDIS_SERVERS if server_part in name)
    command, environment, peer = live.REDIS_SERVERS[name]
    print(f"{name}: {clients:,} clients, {rate:g} events/s for {seconds:g} s from a plain process")
    with redis_server() as redis_port:
        environment = {key: value.format(redis=redis_port) for key, value in environment.items()}
        environment["BENCH_REDIS_PORT"] = str(redis_port)
        server = live.LiveServer(name, command, environment)
        publish = [PY, os.path.join(os.path.dirname(os.path.abspath(__file__)), "live.py"), "publish", "--peer", peer, "--redis-port", str(redis_port)]
        if environment.get("BENCH_ES_STORAGE"):
            publish += ["--es-storage", environment["BENCH_ES_STORAGE"]]

        async def measure() -> None:
            per_second: collections.Counter[int] = collections.Counter()
            last: dict[int, int] = {}
            started = [time.time()]

            def on_events(stream: live.SSEStream, events: list, now: float) -> None:
                for _, event_name, data in events:
                    if event_name in live.IGNORED_EVENTS or event_name in live.RESET_EVENTS:
                        continue
                    per_second[int(now - started[0])] += 1
                    last[id(stream)] = json.loads(data)["seq"]

            streams = await live.open_streams(server.port, clients, on_events)
            await asyncio.sleep(2)
            started[0] = time.time()
            run = await asyncio.create_subprocess_exec(*publish, "--rate", str(rate), "--seconds", str(seconds), stdout=subprocess.PIPE)
            print(f"  publisher: {(await run.communicate())[0].decode().strip()}")
            await asyncio.sleep(3)
            print(f"  events received, by second since publishing began: {dict(sorted(per_second.items()))}")
            print(f"  last sequence number each client holds (number -> clients): {dict(sorted(collections.Counter(last.values()).items()))}")
            before = sum(per_second.values())
            late = await asyncio.create_subprocess_exec(*publish, "--rate", "1", "--seconds", "1", stdout=subprocess.DEVNULL)
            await late.wait()
            await asyncio.sleep(3)
            print(f"  one more event, published 3 s after the run: received by {sum(per_second.values()) - before:,} of {clients:,} clients; "
                  f"streams closed by the server: {sum(stream.lost.done() for stream in streams)}")
            for stream in streams:
                stream.close()

        try:
            time.sleep(2)
            asyncio.run(measure())
        finally:
            lines = server.log_lines()
            server.stop()
        print(f"  server log: {len(lines)} lines{': ' + str(lines[:5]) if lines else ''}")


def main() -> None:
    if sys.argv[1:2] == ["_gcserve"]:
        gc_serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("gc", "overflow"))
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default="EVENTSTREAM_REDIS)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rate", type=float, default=50)
    options = parser.parse_args()
    live.raise_limits()
    if options.probe == "gc":
        gc_probe(options.size, options.rounds)
    else:
        overflow_probe(options.server, options.clients, options.seconds, options.rate)


if __name__ == "__main__":
    main()
