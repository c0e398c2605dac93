"""Start one server of bench/sockets.py: ``python sockets_servers.py NAME PORT [PROCESSES]``.

- ``raw``: plain Tornado, no Django: a WebSocketHandler that a set holds, and
  a /publish handler writing each event's JSON text to every one of them (the
  ceiling for WebSockets on Tornado).
- ``ours``: bench/sockets_app.py served by django_tornado.serve() with
  PROCESSES workers (default 1); the channels' backend is BENCH_CHANNELS_URL.

``python sockets_servers.py setup DB`` makes the SQLite database DB (migrated,
one user) and prints the session key of a real login of that user, for the
handshakes with ``login_required``.

Both servers note their garbage collections of 20 ms or more (``gc_log``),
answered at GET /gc (with ``?objects=1``, the number of objects the GC
tracks too; with ``&collect=1``, after a full collection), as does sockets_app for uvicorn and daphne.
"""

import asyncio
import collections
import gc
import json
import os
import sys
import time

GC_NOTED_MS = 20.0


def gc_log() -> collections.deque:
    """Note every garbage collection of ``GC_NOTED_MS`` or more: [wall clock at its end, generation, ms, objects collected]."""
    pauses: collections.deque = collections.deque(maxlen=1000)
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            milliseconds = 1000 * (time.perf_counter() - started[0])
            if milliseconds >= GC_NOTED_MS:
                pauses.append([time.time(), info["generation"], round(milliseconds, 1), info["collected"]])

    gc.callbacks.append(callback)
    return pauses


def gc_info(pauses: collections.deque, count_objects: bool, collect: bool = False) -> dict:
    """What GET /gc answers: the pauses noted, collections so far per generation, and (if asked) the objects the GC tracks
    (after a full collection, if asked: then garbage in reference cycles is not counted)."""
    if collect:
        gc.collect()
    return {"pid": os.getpid(), "pauses": list(pauses), "collections": [stats["collections"] for stats in gc.get_stats()],
            "tracked": len(gc.get_objects()) if count_objects else None}


def raw_tornado(port: int) -> None:
    import tornado.web
    import tornado.websocket

    sockets: set[tornado.websocket.WebSocketHandler] = set()
    hello = json.dumps({"hello": os.getpid()})
    published = [0]
    pauses = gc_log()
    # An experiment (sockets_profile.py --env BENCH_RAW_FRAMES=1): the event's frame made once (the server's frames
    # are unmasked, so the same bytes for every socket) and written to each stream, without write_message's coroutine.
    frames = bool(os.environ.get("BENCH_RAW_FRAMES"))

    class Json(tornado.web.RequestHandler):
        def get(self):
            self.write({"hello": "world", "served_by": "tornado"})

    class Feed(tornado.websocket.WebSocketHandler):
        def check_origin(self, origin):
            return True

        def open(self):
            sockets.add(self)
            self.write_message(hello)

        def on_close(self):
            sockets.discard(self)

    class Publish(tornado.web.RequestHandler):
        def check_xsrf_cookie(self):
            pass

        def post(self):
            published[0] += 1
            data = {"seq": int(self.get_body_argument("seq")), "t": float(self.get_body_argument("t"))}
            text = json.dumps({"id": published[0], "data": data}, separators=(",", ":"))
            if frames:  # the experiment: one frame for all
                payload = text.encode()
                frame = bytes([0x81, len(payload)]) if len(payload) < 126 else bytes([0x81, 126]) + len(payload).to_bytes(2, "big")
                frame += payload
                for socket in list(sockets):
                    connection = socket.ws_connection
                    if connection is None or connection.is_closing():
                        sockets.discard(socket)
                    else:
                        connection.stream.write(frame)
                self.write({"id": published[0]})
                return
            for socket in list(sockets):
                try:
                    socket.write_message(text)
                except tornado.websocket.WebSocketClosedError:
                    sockets.discard(socket)
            self.write({"id": published[0]})

    class Gc(tornado.web.RequestHandler):
        def get(self):
            self.write(gc_info(pauses, bool(self.get_argument("objects", "")), bool(self.get_argument("collect", ""))))

    async def main():
        routes = [("/sync", Json), ("/ws/feed", Feed), ("/ws/auth", Feed), ("/publish", Publish), ("/gc", Gc)]
        tornado.web.Application(routes).listen(port, "127.0.0.1", backlog=2048)
        await asyncio.Event().wait()

    asyncio.run(main())


def ours(port: int, processes: int) -> None:
    import sockets_app  # noqa: F401 (configures Django)

    import django_tornado

    if os.environ.get("BENCH_GC_FREEZE"):  # an experiment (sockets_profile.py --env BENCH_GC_FREEZE=1): full collections skip what the imports made
        gc.collect()
        gc.freeze()
    django_tornado.serve([f"127.0.0.1:{port}"], processes=processes)


def setup(database: str) -> None:
    os.environ["BENCH_DB"] = database
    import sockets_app  # noqa: F401 (configures Django)
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0, interactive=False)
    user = User.objects.create_user("bench", password="bench")
    client = Client()
    client.force_login(user)  # a real login: the session row names the user and its auth hash
    print(client.cookies["sessionid"].value)


if __name__ == "__main__":
    name, argument, *rest = sys.argv[1:]
    if name == "raw":
        raw_tornado(int(argument))
    elif name == "ours":
        ours(int(argument), int(rest[0]) if rest else 1)
    elif name == "setup":
        setup(argument)
    else:
        sys.exit(f"unknown server {name!r}")
