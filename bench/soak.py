#!/usr/bin/env python
"""Hold django_tornado to the hardening issue's promises for minutes, not seconds.

    python bench/soak.py [--minutes 5] [--chat-seconds 60]

1. "5,000 parked long-polls plus steady sync traffic for 5 minutes: zero
   errors, flat memory after warm-up." bench/app.py is served by django_tornado,
   ONE process pinned to CPU 0 (as in run.py). 5,000 clients long-poll /poll
   and poll again as soon as they are answered, as real long-poll clients do;
   /publish wakes them all every 5 s (or, if that takes longer, as soon as all
   of them have polled again), and each time every one of them must be
   answered. wrk keeps 8 connections busy on /sync from CPU 1 the whole time.
   The server's VmRSS is sampled every 10 s; flat means less than 20 MB of
   growth from the end of the warm-up (the first minute) to the end.
2. "The chat room under 1,000 receivers and 50 messages/s: zero lost, zero
   duplicated messages." chat_example.py (in-memory room) under run.py's chat
   scenario: receivers join and long-poll as the page's script does, messages
   are posted at 50/s for --chat-seconds, and every receiver must get every
   message once, in the room's order.

Prints a Markdown summary, writes the figures to bench/results/soak-<UTC
stamp>.json, and exits with status 1 if any promise fails. All traffic stays on
127.0.0.1, and every socket operation has a timeout, so the run ends even if a
server hangs (a watchdog interrupts it if it still does not).
"""

import _thread
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
import threading
import time

from run import RESULTS, ROOT, Server, chat_end_to_end, exchange, machine, taskset, wrk

WAITERS = 5000
PUBLISH_EVERY = 5.0  # seconds between publishes
SAMPLE_EVERY = 10.0  # seconds between memory samples
WARM_UP = 60.0  # seconds at the start whose memory growth does not count (a third of shorter runs)
FLAT_MB = 20.0  # growth from the end of the warm-up to the end that still counts as flat
SYNC_CONNECTIONS = 8  # wrk's: modest, so the long-polls keep a share of the core
WRK_SLICE = 10  # seconds per wrk run: one figure per slice shows a slowdown when it starts
PARKED_WITHIN = 30.0  # seconds every waiter gets to be answered, or to poll again, after a publish
POLL_TIMEOUT = 60.0  # seconds a parked /poll may wait before its client counts an error
RECEIVERS = 1000
MESSAGES_PER_S = 50
CLIENT_ERRORS = (OSError, EOFError, TimeoutError, ValueError, KeyError, asyncio.LimitOverrunError)


# -- 1. Parked long-polls under steady sync traffic ----------------------------------


def process_status(pid: int) -> dict:
    """Resident memory (MB), threads and open file descriptors of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def collect_lines(stream, lines: list[str]) -> None:
    """Read a server's stderr into ``lines`` from a thread, so that it never blocks on a full pipe."""

    def read() -> None:
        for line in stream:
            lines.append(line.decode(errors="replace").rstrip())

    threading.Thread(target=read, daemon=True).start()


def sync_traffic(url: str, seconds: float, connections: int) -> list[dict]:
    """wrk on ``url`` in WRK_SLICE-second runs, back to back, for ``seconds`` (none with no ``connections``)."""
    slices = []
    end = time.monotonic() + seconds
    while connections and (left := round(end - time.monotonic())) >= 1:
        try:
            slices.append(wrk(url, min(WRK_SLICE, left), connections))
        except (subprocess.SubprocessError, AttributeError) as error:  # AttributeError: wrk printed no figures
            slices.append({"failed": f"{type(error).__name__}: {error}"[:200]})
            time.sleep(1)
    return slices


async def long_polls_under_load(server: Server, waiters: int, seconds: float, connections: int) -> dict:
    """Park ``waiters`` long-polls, then publish every PUBLISH_EVERY s under wrk for ``seconds``."""
    pid = server.process.pid
    errors: collections.Counter[str] = collections.Counter()
    answered = [0]  # /poll answers so far, every waiter together

    async def get(path: str, timeout: float = 10) -> dict:
        return await asyncio.to_thread(server.get_json, path, timeout)

    async def poller() -> None:
        """One long-poll client: poll, and poll again once answered, on one kept-alive connection."""
        connection = None
        try:
            while True:
                try:
                    connection = connection or await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 10)
                    status, body = await exchange(*connection, "/poll", timeout=POLL_TIMEOUT)
                    if status != 200:
                        raise ValueError(f"answered {status}: {body[:100]!r}")
                    answered[0] += 1
                except CLIENT_ERRORS as error:
                    errors[f"/poll: {type(error).__name__}: {str(error)[:80]}"] += 1
                    if connection is not None:
                        connection[1].close()
                    connection = None
                    await asyncio.sleep(1)
        finally:
            if connection is not None:
                connection[1].close()

    async def parked(count: int, within: float) -> int:
        """Wait up to ``within`` s for the server to hold ``count`` parked polls; return how many it holds."""
        deadline = time.monotonic() + within
        while (waiting := (await get("/waiting"))["waiting"]) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return waiting

    async def publish_round() -> dict:
        """Publish once every waiter is parked; wait for every answer, then for every waiter to poll again."""
        entry: dict = {}
        try:
            entry["parked"] = await parked(waiters, PARKED_WITHIN)
            before, published = answered[0], time.monotonic()
            entry["at_s"] = round(published - started, 1)
            entry["woken"] = (await get("/publish", PARKED_WITHIN))["woken"]
            entry["publish_ms"] = 1000 * (time.monotonic() - published)
            while answered[0] - before < waiters and time.monotonic() < published + PARKED_WITHIN:
                await asyncio.sleep(0.005)
            entry["answered"] = answered[0] - before
            entry["all_answered_ms"] = 1000 * (time.monotonic() - published)
            entry["parked_again"] = await parked(waiters, PARKED_WITHIN)
            entry["all_parked_again_ms"] = 1000 * (time.monotonic() - published)
        except CLIENT_ERRORS as error:
            entry["failed"] = f"{type(error).__name__}: {error}"[:200]
            errors[f"/publish or /waiting: {type(error).__name__}"] += 1
        return entry

    async def sample_memory() -> None:
        while True:
            try:
                samples.append({"t_s": round(time.monotonic() - started, 1), **process_status(pid)})
            except OSError:
                return  # the server is gone: said below
            await asyncio.sleep(SAMPLE_EVERY - (time.monotonic() - started) % SAMPLE_EVERY)

    idle = process_status(pid)
    pollers: list[asyncio.Task] = []
    try:
        for start in range(0, waiters, 500):  # connect in batches, inside the listen backlog
            pollers += [asyncio.ensure_future(poller()) for _ in range(min(500, waiters - start))]
            if (waiting := await parked(len(pollers), 30)) < len(pollers):
                raise TimeoutError(f"only {waiting} of {len(pollers)} long-polls parked within 30 s")
        parked_status = process_status(pid)
        samples: list[dict] = []
        started = time.monotonic()
        traffic = asyncio.ensure_future(asyncio.to_thread(sync_traffic, server.url + "/sync", seconds, connections))
        sampler = asyncio.ensure_future(sample_memory())
        rounds = []
        end, moment = started + seconds, started + PUBLISH_EVERY
        # Every PUBLISH_EVERY s, or as soon as every waiter polls again if that takes longer.
        while moment <= end - PUBLISH_EVERY / 2:
            await asyncio.sleep(max(0.0, moment - time.monotonic()))
            rounds.append(await publish_round())
            moment = max(moment + PUBLISH_EVERY, time.monotonic())
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        sampler.cancel()
        if not samples or time.monotonic() - started - samples[-1]["t_s"] > 1:
            with contextlib.suppress(OSError):
                samples.append({"t_s": round(time.monotonic() - started, 1), **process_status(pid)})
        slices = await asyncio.wait_for(traffic, WRK_SLICE + 90)
    finally:
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
    return {
        "waiters": waiters,
        "seconds": seconds,
        "sync_connections": connections,
        "idle": idle,
        "parked": parked_status,
        "sync": slices,
        "polls_answered": answered[0],
        "rounds": rounds,
        "errors": dict(errors),
        "samples": samples,
    }


def soak_long_polls(waiters: int, seconds: float, connections: int) -> dict:
    """Part 1, with its server started and stopped around it, and its memory figures."""
    server = Server("django_tornado")
    log: list[str] = []
    collect_lines(server.process.stderr, log)
    try:
        result = asyncio.run(long_polls_under_load(server, waiters, seconds, connections))
        result["server_alive"] = server.process.poll() is None
        result["server_log"] = list(log)  # before stopping: shutdown is not the soak
    finally:
        server.stop()
    warm_up = min(WARM_UP, seconds / 3)
    settled = [sample for sample in result["samples"] if sample["t_s"] >= warm_up]
    if len(settled) >= 2:
        start, end = settled[0], result["samples"][-1]
        result["memory"] = {
            "warm_up_s": warm_up,
            "warm_up_mb": start["rss_mb"],
            "end_mb": end["rss_mb"],
            "growth_mb": end["rss_mb"] - start["rss_mb"],
            "peak_mb": max(sample["rss_mb"] for sample in result["samples"]),
            "slope_mb_per_min": statistics.linear_regression(
                [sample["t_s"] / 60 for sample in settled], [sample["rss_mb"] for sample in settled]).slope,
            "kb_per_waiter": 1024 * (result["parked"]["rss_mb"] - result["idle"]["rss_mb"]) / waiters,
        }
    return result


def long_poll_checks(result: dict) -> list[tuple[str, bool, str]]:
    """(promise, kept, evidence) for part 1."""
    waiters, slices, rounds = result["waiters"], result["sync"], result["rounds"]
    sync_requests = sum(entry.get("requests", 0) for entry in slices)
    wrk_errors = sum(entry.get("non_2xx", 0) + entry.get("socket_errors", 0) for entry in slices)
    failed_slices = sum(1 for entry in slices if "failed" in entry)
    client_errors = sum(result["errors"].values())
    log_lines = len(result["server_log"])
    errors = wrk_errors + failed_slices + client_errors + log_lines + (not result["server_alive"])
    errors_evidence = (
        f"{errors} errors in {sync_requests:,} sync requests and {result['polls_answered']:,} long-poll answers "
        f"(wrk non-2xx or socket errors {wrk_errors}, failed wrk runs {failed_slices}, long-poll clients {client_errors}, "
        f"server log lines {log_lines}, server {'alive' if result['server_alive'] else 'DIED'})"
    )
    full = [entry for entry in rounds if entry.get("woken") == waiters and entry.get("answered") == waiters]
    rounds_evidence = (
        f"{len(full)} of {len(rounds)} publishes woke and answered {waiters:,} "
        f"(woken {min_max(rounds, 'woken')}; answers that arrived {min_max(rounds, 'answered')})"
    )
    memory = result.get("memory")
    memory_evidence = (
        f"{memory['warm_up_mb']:.1f} MB at {memory['warm_up_s']:g} s, {memory['end_mb']:.1f} MB at the end: "
        f"{memory['growth_mb']:+.1f} MB; slope {memory['slope_mb_per_min']:+.2f} MB/min" if memory else "too few samples"
    )
    return [
        (f"1. {waiters:,} parked long-polls + sync traffic for {result['seconds'] / 60:g} min: zero errors",
         errors == 0, errors_evidence),
        ("1. every publish answers every parked waiter", bool(rounds) and len(full) == len(rounds), rounds_evidence),
        (f"1. flat memory after warm-up (growth < {FLAT_MB:g} MB)", bool(memory) and memory["growth_mb"] < FLAT_MB,
         memory_evidence),
    ]


def long_poll_report(result: dict) -> list[str]:
    slices = [entry for entry in result["sync"] if "failed" not in entry]
    rounds = [entry for entry in result["rounds"] if "failed" not in entry]
    memory = result.get("memory", {})
    moments = [entry["at_s"] for entry in rounds]
    cadence = (moments[-1] - moments[0]) / (len(moments) - 1) if len(moments) > 1 else 0
    log = result["server_log"]
    lines = [
        (f"**1. {result['waiters']:,} parked long-polls under sync traffic, {result['seconds']:g} s** "
         "(bench/app.py on django_tornado, one process on CPU 0; the clients and wrk on CPU 1)"),
        "",
        (f"- Sync traffic (wrk, {result['sync_connections']} connections, /sync): {sum(entry['requests'] for entry in slices):,} requests, "
         f"{statistics.mean(entry['rps'] for entry in slices) if slices else 0:,.0f} req/s "
         f"({min_max(slices, 'rps')} in each {WRK_SLICE} s run), p99 {min_max(slices, 'p99_ms', ',.0f')} ms."),
        (f"- Long-polls: {result['waiters']:,} parked (+{memory.get('kb_per_waiter', 0):.1f} KB of server memory each); "
         f"{len(result['rounds'])} publishes, one every {cadence:.1f} s on average (every {PUBLISH_EVERY:g} s, or once "
         f"every waiter had polled again if later); {result['polls_answered']:,} answers. After each publish: the publish "
         f"view answered in {min_max(rounds, 'publish_ms')} ms, every waiter had its answer in "
         f"{min_max(rounds, 'all_answered_ms')} ms (median {median_of(rounds, 'all_answered_ms')}) and had polled again "
         f"in {min_max(rounds, 'all_parked_again_ms')} ms (median {median_of(rounds, 'all_parked_again_ms')})."),
        (f"- Client errors: {format_counts(result['errors'])}. Server log: "
         + (f"{len(log)} lines, the first: `{log[0][:200]}`." if log else "nothing.")),
    ]
    short = [entry for entry in result["rounds"] if "failed" in entry or entry.get("woken") != result["waiters"]]
    if short:
        lines.append(f"- Publishes that fell short (first 5): `{json.dumps(short[:5])}`")
    if memory:
        lines.append(
            f"- Memory (VmRSS): {result['idle']['rss_mb']:.1f} MB idle, {result['parked']['rss_mb']:.1f} MB with every "
            f"waiter parked, {memory['warm_up_mb']:.1f} MB after the warm-up, {memory['end_mb']:.1f} MB at the end "
            f"(peak {memory['peak_mb']:.1f} MB); slope after the warm-up {memory['slope_mb_per_min']:+.2f} MB/min."
        )
    lines += ["", "| t (s) | RSS (MB) | threads | open fds |", "|---:|---:|---:|---:|"]
    lines += [f"| {sample['t_s']:g} | {sample['rss_mb']:.1f} | {sample['threads']} | {sample['fds']:,} |" for sample in result["samples"]]
    return [*lines, ""]


def min_max(entries: list[dict], field: str, spec: str = ",.0f") -> str:
    values = [entry[field] for entry in entries if field in entry]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return f"{low:{spec}}" if f"{low:{spec}}" == f"{high:{spec}}" else f"{low:{spec}}-{high:{spec}}"


def median_of(entries: list[dict], field: str) -> str:
    values = [entry[field] for entry in entries if field in entry]
    return f"{statistics.median(values):,.0f}" if values else "n/a"


def format_counts(counts: dict) -> str:
    return "none" if not counts else "; ".join(f"{count} x {kind}" for kind, count in counts.items())


# -- 2. The chat room ------------------------------------------------------------------------


def chat_checks(chat: dict) -> list[tuple[str, bool, str]]:
    """(promise, kept, evidence) for part 2."""
    client_errors = sum(chat["errors"].values())
    errors = client_errors + chat["server_log_problems"] + (not chat["server_alive"])
    rate_kept = chat["send_rate"] is not None and chat["send_rate"] >= 0.95 * chat["rate"]
    return [
        (f"2. chat, {chat['receivers']:,} receivers at {chat['rate']:g} messages/s: zero lost", chat["lost"] == 0,
         f"{chat['lost']:,} lost of {chat['expected']:,} deliveries ({chat['sent']:,} messages x {chat['receivers']:,} receivers)"),
        ("2. chat: zero duplicated, in order", chat["duplicated"] == chat["out_of_order"] == 0,
         (f"{chat['duplicated']:,} duplicated, {chat['out_of_order']:,} out of order; "
          f"{chat['receivers_complete']:,} of {chat['receivers']:,} receivers got every message once, in order")),
        (f"2. chat: {chat['rate']:g} messages/s posted, zero errors", rate_kept and errors == 0,
         (f"posted at {chat['send_rate'] or 0:.1f}/s; {errors} errors (clients {client_errors}, "
          f"server log lines {chat['server_log_problems']}, server {'alive' if chat['server_alive'] else 'DIED'})")),
    ]


def chat_report(chat: dict) -> list[str]:
    sample = chat["server_log_sample"]
    return [
        (f"**2. chat_example.py: {chat['receivers']:,} receivers, {chat['rate']:g} messages/s for {chat['seconds']:g} s** "
         "(in-memory room, one process on CPU 0; the clients on CPU 1)"),
        "",
        (f"- Posted {chat['sent']:,} messages at {chat['send_rate'] or 0:.1f}/s (POST /send on a fixed schedule, at most "
         f"{chat['most_sends_in_flight']} in flight); {chat['delivered']:,} of {chat['expected']:,} deliveries made, "
         f"{chat['delivered_per_s']:,.0f} a second; every receiver had every message {chat['drain_s']:.1f} s after the last "
         "was posted" + (" (or the wait for them timed out)." if chat["lost"] else ".")),
        "- Send-to-receive latency: " + ", ".join(
            f"{name} {'n/a' if chat[key] is None else format(chat[key], ',')} ms"
            for name, key in (("p50", "p50_latency_ms"), ("p99", "p99_latency_ms"), ("max", "max_latency_ms"))) + ".",
        f"- Lost {chat['lost']:,}, duplicated {chat['duplicated']:,}, out of order {chat['out_of_order']:,}.",
        (f"- Client errors: {format_counts(chat['errors'])}. Server log lines other than 2xx/3xx requests: "
         + (f"{chat['server_log_problems']}, the first: `{sample[0][:200]}`." if sample else "none")
         + f" ({chat['shutdown_log_problems']} more while it stopped)."),
        "",
    ]


# -- Main ----------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit served, noting uncommitted changes to the files the servers run."""

    def git(*arguments: str) -> list[str]:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.split()  # others share this index

    try:
        commit = git("rev-parse", "--short", "HEAD")[0]
        changed = git("status", "--porcelain", "--", "django_tornado.py", "chat_example.py", "bench/app.py", "bench/servers.py")
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"
    return commit + (f" with uncommitted changes to {', '.join(changed[1::2])}" if changed else "")


def watchdog(seconds: float) -> None:
    """Interrupt the run if it outlives ``seconds`` (its own timeouts should end it first); exit a minute later."""

    def expire() -> None:
        print(f"soak.py: still running after {seconds:.0f} s; interrupting", file=sys.stderr)
        _thread.interrupt_main()
        time.sleep(60)
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5, help="length of part 1 (default: 5)")
    parser.add_argument("--chat-seconds", type=float, default=60, help="length of part 2 (default: 60)")
    parser.add_argument("--waiters", type=int, default=WAITERS, help=f"parked long-polls in part 1 (default: {WAITERS})")
    parser.add_argument("--receivers", type=int, default=RECEIVERS, help=f"chat receivers in part 2 (default: {RECEIVERS})")
    parser.add_argument("--sync-connections", type=int, default=SYNC_CONNECTIONS,
                        help=f"wrk's connections in part 1, 0 for no sync traffic (default: {SYNC_CONNECTIONS})")
    parser.add_argument("--rate", type=float, default=MESSAGES_PER_S, help=f"chat messages/s (default: {MESSAGES_PER_S})")
    parser.add_argument("--only", choices=("long-polls", "chat"), help="run one part")
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per waiter, here and in the server (it inherits this)
    if max(options.waiters, options.receivers) + 200 > hard:
        sys.exit(f"soak.py needs {max(options.waiters, options.receivers) + 200} file descriptors; the limit is {hard}")
    if taskset("1") and taskset("0"):
        os.sched_setaffinity(0, {1})  # the clients share CPU 1 with wrk; the servers have CPU 0 (run.py pins them there)
    seconds = 60 * options.minutes
    watchdog(seconds + options.chat_seconds + 900)
    started = time.monotonic()
    data: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "options": vars(options),
        "code": {},  # part -> the code its server ran
    }
    checks: list[tuple[str, bool, str]] = []
    sections: list[str] = []
    if options.only != "chat":
        print(f"1. {options.waiters:,} long-polls under sync traffic for {seconds:g} s...", file=sys.stderr)
        data["code"]["1"] = code_version()
        try:
            data["long_polls"] = soak_long_polls(options.waiters, seconds, options.sync_connections)
            checks += long_poll_checks(data["long_polls"])
            sections += long_poll_report(data["long_polls"])
        except (OSError, TimeoutError, RuntimeError, ValueError) as error:
            data["long_polls"] = {"failed": f"{type(error).__name__}: {error}"}
            checks.append(("1. parked long-polls under sync traffic", False, f"could not run: {data['long_polls']['failed']}"))
    if options.only != "long-polls":
        print(f"2. chat_example.py, {options.receivers:,} receivers, {options.rate:g} messages/s "
              f"for {options.chat_seconds:g} s...", file=sys.stderr)
        data["code"]["2"] = code_version()
        try:
            chat = {"receivers": options.receivers, "rate": options.rate, "seconds": options.chat_seconds}
            chat.update(chat_end_to_end(options.receivers, options.chat_seconds, options.rate))
            data["chat"] = chat
            checks += chat_checks(chat)
            sections += chat_report(chat)
        except (OSError, TimeoutError, AssertionError, ValueError) as error:
            data["chat"] = {"failed": f"{type(error).__name__}: {error}"}
            checks.append(("2. chat room", False, f"could not run: {data['chat']['failed']}"))
    data["checks"] = [{"promise": promise, "kept": kept, "evidence": evidence} for promise, kept, evidence in checks]
    data["passed"] = all(kept for _, kept, _ in checks)
    data["elapsed_s"] = round(time.monotonic() - started)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS, f"soak-{stamp}.json")
    with open(path, "w") as output:
        json.dump(data, output, indent=1)
    parts = data["code"]
    code = next(iter(parts.values())) if len(set(parts.values())) == 1 else "; ".join(f"{version} (part {part})" for part, version in parts.items())
    lines = [f"## Soak test: {'every promise kept' if data['passed'] else 'PROMISES BROKEN'}", "",
             f"Measured {data['date']} on {data['machine']}; code: {code}.", "",
             "| promise | kept | evidence |", "|---|---|---|"]
    lines += [f"| {promise} | {'yes' if kept else '**NO**'} | {evidence} |" for promise, kept, evidence in checks]
    lines += ["", *sections, f"The whole run took {data['elapsed_s']} s; figures in bench/results/{os.path.basename(path)}.", ""]
    print("\n".join(lines))
    sys.exit(0 if data["passed"] else 1)


if __name__ == "__main__":
    main()
