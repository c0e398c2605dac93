#!/usr/bin/env python
"""How django_tornado's plain-view pool size (serve(threads=N)) moves its throughput.

    python bench/pool_sizes.py [--quick] [--seconds S] [--rounds N] [--threads 2,4,6]

For each N, django_tornado serves bench/app.py with serve(threads=N) from ONE
process pinned to CPU 0, with wrk pinned to CPU 1, all on 127.0.0.1 (run.py's
helpers: the same servers, pinning and wrk parsing). Two figures per N: the
sync JSON view (/sync, 32 connections) and the plain view that blocks 20 ms
(/block, 50 connections). uvicorn + Django ASGI is measured on /block in the
same rounds as a reference: it has no pool to size, as Django's ASGI handler
runs each request's sync code in a one-thread executor of its own (asgiref's
ThreadSensitiveContext), so its figure is the same for every N. Rounds
interleave the servers (every other round in reverse order, against drift);
figures are medians over rounds. Prints a Markdown table and writes the
figures to bench/results/pool-sizes-<UTC stamp>[-quick].json.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import run

THREADS = (2, 4, 6, 8, 12, 16, 24, 32, 50, 64)
DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)  # serve()'s default, as README.rst gives it
UVICORN = "uvicorn (uvloop, httptools) + Django ASGI"
BLOCK_S = 0.02  # bench/app.py's /block sleeps this long
BLOCK_CLIENTS = 50


def ours(threads: int) -> str:
    """The run.Server name of django_tornado with ``threads`` pool threads, registered with run.py."""
    name = f"django_tornado, threads={threads}"
    if name not in run.SERVERS:
        run.SERVERS[name] = ([run.PY, "servers.py", "ours", "{port}", "1", str(threads)], {}, True)
        run.ONE_CORE.add(name)  # pinned to CPU 0, as run.py's one-process rows
    return name


def measure(name: str, seconds: int, scenarios: tuple[str, ...]) -> dict:
    """Start ``name``, warm it up as run.py does, and run wrk on each of ``scenarios``."""
    connections = {"sync": 32, "block": BLOCK_CLIENTS}
    server = run.Server(name)
    try:
        run.wrk(server.url + "/sync", 1, 16)  # warm up
        return {scenario: run.wrk(f"{server.url}/{scenario}", seconds, connections[scenario]) for scenario in scenarios}
    finally:
        server.stop()


def median(rounds: list[dict], name: str, scenario: str, field: str) -> float | None:
    figures = [entry[scenario][field] for entry in (round_results.get(name) for round_results in rounds) if entry and scenario in entry]
    return statistics.median(figures) if figures else None


def had_errors(rounds: list[dict], name: str, scenario: str) -> bool:
    return any(round_results[name][scenario]["errors"] for round_results in rounds if scenario in round_results.get(name, {}))


def report(data: dict) -> str:
    rounds = data["rounds"]
    lines = [
        (f"Measured {data['date']} on {data['machine']}; {len(rounds)} interleaved rounds of {data['seconds']} s "
         "per figure, median. One server process on CPU 0, wrk on CPU 1."), "",
        (f"| server | pool threads | sync JSON, 32 conns: req/s | p99 ms | view blocking {BLOCK_S * 1000:.0f} ms, "
         f"{BLOCK_CLIENTS} conns: req/s | p99 ms | blocking bound: min(threads, {BLOCK_CLIENTS}) / {BLOCK_S * 1000:.0f} ms |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(name: str, scenario: str) -> list[str]:
        rps, p99 = median(rounds, name, scenario, "rps"), median(rounds, name, scenario, "p99_ms")
        if rps is None:
            return ["n/a", "n/a"]
        return [f"{rps:,.0f}{' (errors)' if had_errors(rounds, name, scenario) else ''}", f"{p99:,.1f}"]

    for threads in data["threads"]:
        name = ours(threads)
        label = f"{threads} (default)" if threads == data["default_threads"] else str(threads)
        bound = min(threads, BLOCK_CLIENTS) / BLOCK_S
        lines.append(f"| django_tornado | {label} | {' | '.join(cells(name, 'sync'))} | {' | '.join(cells(name, 'block'))} | {bound:,.0f} |")
    lines.append(f"| uvicorn + Django ASGI (reference) | one per request | n/a | n/a | {' | '.join(cells(UVICORN, 'block'))} | "
                 f"{BLOCK_CLIENTS / BLOCK_S:,.0f} |")
    lines += ["", (f"The bound is what the pool could answer if the {BLOCK_S * 1000:.0f} ms sleeps were all the work "
                   "(the CPU's own limit is the sync JSON figure).")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per figure, 1 round")
    parser.add_argument("--seconds", type=int, help="seconds per figure (default 5, --quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--threads", help=f"comma-separated pool sizes (default {','.join(map(str, THREADS))})")
    options = parser.parse_args()
    seconds = options.seconds or (2 if options.quick else 5)
    rounds = options.rounds or (1 if options.quick else 3)
    sizes = [int(size) for size in options.threads.split(",")] if options.threads else list(THREADS)
    run.ensure_tools()
    started = time.monotonic()
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": run.machine(),
        "seconds": seconds, "threads": sizes, "default_threads": DEFAULT_THREADS, "rounds": [],
    }
    order = [*((ours(threads), ("sync", "block")) for threads in sizes), (UVICORN, ("block",))]
    for number in range(rounds):
        print(f"Round {number + 1} of {rounds}", file=sys.stderr)
        round_results = {}
        for name, scenarios in (order if number % 2 == 0 else order[::-1]):
            round_results[name] = measure(name, seconds, scenarios)
            figures = ", ".join(f"/{scenario} {entry['rps']:,.0f} req/s" for scenario, entry in round_results[name].items())
            print(f"  {name}: {figures}", file=sys.stderr)
        data["rounds"].append(round_results)
    data["elapsed_s"] = round(time.monotonic() - started)
    os.makedirs(run.RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(run.RESULTS, f"pool-sizes-{stamp}{'-quick' if options.quick else ''}.json")
    with open(path, "w") as output:
        json.dump(data, output, indent=1)
    print(report(data) + f"\n\nThe whole run took {data['elapsed_s']} s; figures in {os.path.relpath(path, run.ROOT)}.")


if __name__ == "__main__":
    main()
