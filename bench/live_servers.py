"""Start one server of bench/live.py: ``python live_servers.py NAME PORT [PROCESSES]``.

- ``raw-sse``: plain Tornado, no Django: a hand-written list of Server-Sent
  Events handlers that /publish writes ``data: ...`` to and flushes (the
  ceiling for event streams on Tornado). The long-poll ceiling is
  bench/servers.py ``raw``.
- ``ours``: bench/live_app.py served by django_tornado.serve() with PROCESSES
  workers (default 1); the channels' backend is BENCH_CHANNELS_URL.
- ``daphne``: bench/live_app.py with BENCH_LIVE=eventstream (django-eventstream)
  served by PROCESSES daphne processes (default 1) sharing one listening socket
  that this process binds and hands over with ``daphne --fd`` (daphne has no
  workers option; this is how its docs run several, under supervisord).
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))


def raw_sse(port: int) -> None:
    import tornado.web

    streams: set[tornado.web.RequestHandler] = set()
    answer = {"hello": "world", "served_by": "tornado"}
    last_id = [0]

    class Json(tornado.web.RequestHandler):
        def get(self):
            self.write(answer)

    class Live(tornado.web.RequestHandler):
        async def get(self):
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            self.write("retry: 2000\n\n")
            self.gone = asyncio.get_running_loop().create_future()
            streams.add(self)
            await self.flush()
            await self.gone

        def on_connection_close(self):
            streams.discard(self)
            if not self.gone.done():
                self.gone.set_result(None)

    class Publish(tornado.web.RequestHandler):
        def get(self):
            last_id[0] += 1
            frame = f"id: {last_id[0]}\ndata: {json.dumps(answer)}\n\n".encode()
            for stream in list(streams):
                stream.write(frame)
                stream.flush()
            self.write({"id": last_id[0], "woken": len(streams)})

    class Waiting(tornado.web.RequestHandler):
        def get(self):
            self.write({"waiting": len(streams)})

    async def main():
        routes = [("/sync", Json), ("/live", Live), ("/publish", Publish), ("/waiting", Waiting)]
        tornado.web.Application(routes).listen(port, "127.0.0.1", backlog=2048)
        await asyncio.Event().wait()

    asyncio.run(main())


def ours(port: int, processes: int) -> None:
    import live_app  # noqa: F401 (configures Django)

    import django_tornado

    django_tornado.serve([f"127.0.0.1:{port}"], processes=processes)


def daphne(port: int, processes: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(2048)
    listener.set_inheritable(True)
    command = [os.path.join(os.path.dirname(sys.executable), "daphne"), "--fd", str(listener.fileno()), "-v", "0", "live_app:asgi"]
    workers = [subprocess.Popen(command, pass_fds=[listener.fileno()], cwd=BENCH, env={**os.environ, "BENCH_LIVE": "eventstream"})
               for _ in range(processes)]

    def stop(*_):
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for worker in workers:
            if worker.poll() is not None:
                print(f"daphne worker {worker.pid} exited with {worker.returncode}", file=sys.stderr)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    name, port, *rest = sys.argv[1:]
    processes = int(rest[0]) if rest else 1
    if name == "raw-sse":
        raw_sse(int(port))
    elif name == "ours":
        ours(int(port), processes)
    elif name == "daphne":
        daphne(int(port), processes)
    else:
        sys.exit(f"unknown server {name!r}")
