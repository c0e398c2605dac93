#!/usr/bin/env python
"""Where a server of bench/sockets.py spends its time during broadcasts: py-spy on it, summed up.

    nice -n 10 /work/bench-venv/bin/python bench/sockets_profile.py [--server NAME] [--sockets 5000] [--broadcasts 10] [--native]

Starts one server of bench/sockets.py (default django_tornado) on CPU 0,
opens the sockets from CPU 1, then records the server with py-spy (only the
threads holding the GIL: the CPU it uses) while it serves ``--broadcasts``
broadcasts 1 s apart, each timed as in bench/sockets.py. Prints the
broadcasts' times, the garbage collections the server noted, and the
functions with the most samples, by themselves (self) and with what they
call (inclusive). ``--native`` adds C frames (gc_collect_main, for one);
the raw stacks are kept at ``--keep PATH``. ``--handshakes /ws/auth`` profiles
the handshakes of bench/sockets.py's part 5 instead. py-spy comes from PATH or
/work/venv/bin (``pip install py-spy``).
"""

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sockets
from run import redis_server, taskset


def py_spy() -> str:
    found = shutil.which("py-spy") or next((path for path in ("/work/venv/bin/py-spy",) if os.path.exists(path)), None)
    if found is None:
        sys.exit("bench/sockets_profile.py needs py-spy: pip install py-spy")
    return found


@contextlib.asynccontextmanager
async def spying(server: sockets.Server, raw_path: str | None, native: bool, figures: dict):
    """py-spy on the server's worker (the only process of one-process servers) from CPU 1, unless ``raw_path`` is None."""
    if raw_path is None:
        yield
        return
    command = [*taskset("1"), py_spy(), "record", "-p", str(server.pids()[-1]), "-f", "raw", "-o", raw_path, "-r", "250", "-g"]
    spy = await asyncio.create_subprocess_exec(*command, *(["-n"] if native else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.sleep(2.0)  # py-spy attaches
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        figures["py_spy"] = (await asyncio.wait_for(spy.stderr.read(), 30)).decode(errors="replace")[-500:]
        await asyncio.wait_for(spy.wait(), 30)


async def profile_broadcasts(server: sockets.Server, count: int, broadcasts: int, native: bool, raw_path: str | None) -> dict:
    sink, publisher = sockets.Sink(), sockets.Publisher(server.port)
    opened, figures, spied = [], {}, {}
    try:
        for start in range(0, count, 1000):
            more, _ = await sockets.open_sockets(server.port, min(1000, count - start), sink)
            opened += more
        await asyncio.sleep(1.0)
        seqs = iter(range(1, 1_000_000))
        await sockets.broadcasts(server, opened, sink, publisher, lambda: next(seqs), 0)  # warm-up
        async with spying(server, raw_path, native, spied):
            figures = await sockets.broadcasts(server, opened, sink, publisher, lambda: next(seqs), broadcasts)
        figures["gc_objects"] = await sockets.gc_objects(server)
        for socket in opened:
            socket.close()
    finally:
        publisher.close()
    return {**figures, **spied}


async def profile_handshakes(server: sockets.Server, path: str, cookie: str | None, seconds: float, native: bool, raw_path: str | None) -> dict:
    spied: dict = {}
    async with spying(server, raw_path, native, spied):
        figures = await sockets.handshake_rate(server.port, path, cookie, seconds)
    return {**figures, **spied}


def summary(raw_path: str, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw_path) as stacks:
        for line in stacks:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            frames = [frame.rsplit(":", 1)[0] if frame.count(":") > 1 else frame for frame in stack.split(";")]
            total += samples
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    lines = [f"{total} samples at 250/s with the GIL held ({total / 250:.1f} s of CPU)", "", "Self:"]
    lines += [f"  {100 * samples / total:5.1f}%  {frame}" for frame, samples in own.most_common(top)]
    lines += ["", "Inclusive:"]
    lines += [f"  {100 * samples / total:5.1f}%  {frame}" for frame, samples in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=sockets.OURS, choices=list(sockets.SERVERS))
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--broadcasts", type=int, default=10)
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--keep", help="where to keep py-spy's raw stacks")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (BENCH_GC_FREEZE=1: gc.freeze() before serving)")
    parser.add_argument("--no-spy", action="store_true", help="time the broadcasts without py-spy")
    parser.add_argument("--handshakes", metavar="PATH", help="profile 5.'s handshakes on PATH (/ws/auth: with the logged-in session) instead")
    parser.add_argument("--seconds", type=float, default=10, help="how long --handshakes runs")
    options = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if taskset("1"):
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as directory, redis_server() as redis_port:
        database, session = sockets.make_database(directory)
        raw_path = options.keep or os.path.join(directory, "stacks.txt")
        common = {"BENCH_DB": database, "BENCH_REDIS_PORT": str(redis_port)}
        log: dict = {}
        command, environment = sockets.SERVERS[options.server]
        environment = {**environment, **dict(pair.split("=", 1) for pair in options.env)}
        with sockets.started(options.server, command, environment, common, log) as server:
            began = time.monotonic()
            spied = None if options.no_spy else raw_path
            if options.handshakes:
                cookie = None if options.server == sockets.CEILING else session
                figures = sockets.run_client(profile_handshakes(server, options.handshakes, cookie, options.seconds, options.native, spied))
            else:
                figures = sockets.run_client(profile_broadcasts(server, options.sockets, options.broadcasts, options.native, spied))
        if options.handshakes:
            print(f"{options.server}, handshakes on {options.handshakes} for {options.seconds} s: {figures}")
            if not options.no_spy:
                print()
                print(summary(raw_path, options.top))
            return
        print(f"{options.server}, {options.sockets:,} sockets, {options.broadcasts} broadcasts ({time.monotonic() - began:.0f} s)")
        print(f"broadcast ms: {figures['samples_ms']} (median {figures['median_ms']}); {figures.get('split') or 'not bimodal'}")
        print(f"publish answered ms: {figures['publish_answered_ms']}")
        print(f"GC pauses >= 20 ms per broadcast (generation, ms): {figures.get('gc_pauses_in_samples')}")
        print(f"server log: {log['server_log_problems']} problem lines {log['server_log_sample'][:3]}")
        print(f"objects the server's GC tracks: {figures['gc_objects']:,}" if figures.get("gc_objects") else "")
        if not options.no_spy:
            print()
            print(summary(raw_path, options.top))


if __name__ == "__main__":
    main()
