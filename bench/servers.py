"""Start one benchmarked server: ``python servers.py NAME PORT [N [THREADS]]``.

N is the number of processes for ``ours`` (django_tornado; THREADS, if given,
is its thread pool's size, else serve()'s default) and of threads for
``wsgicontainer`` (0: none).

The peers that have a command line of their own (gunicorn, uvicorn, daphne, granian)
are started by run.py directly; these are the ones that need a few lines.
"""

import asyncio
import concurrent.futures
import sys


def raw_tornado(port: int) -> None:
    """Plain Tornado handlers, no Django: the ceiling for anything built on Tornado."""
    import tornado.web

    answer = {"hello": "world", "served_by": "tornado"}
    waiters: list[tornado.web.RequestHandler] = []

    class Json(tornado.web.RequestHandler):
        def get(self):
            self.write(answer)

    class Stream(tornado.web.RequestHandler):
        async def get(self):
            for number in range(5):
                self.write(f"chunk {number}\n")
                await self.flush()
                if number < 4:
                    await asyncio.sleep(0.5)

    class Poll(tornado.web.RequestHandler):
        async def get(self):
            self.answered = asyncio.get_running_loop().create_future()
            waiters.append(self)
            await self.answered

        def on_connection_close(self):
            if self in waiters:
                waiters.remove(self)
                self.answered.cancel()

    class Publish(tornado.web.RequestHandler):
        def get(self):
            woken, waiters[:] = list(waiters), []
            for waiter in woken:
                waiter.finish(answer)
                waiter.answered.set_result(None)
            self.write({"woken": len(woken)})

    class Waiting(tornado.web.RequestHandler):
        def get(self):
            self.write({"waiting": len(waiters)})

    async def main():
        routes = [("/sync", Json), ("/async", Json), ("/asynchronous", Json), ("/stream/async", Stream),
                  ("/poll", Poll), ("/publish", Publish), ("/waiting", Waiting)]
        tornado.web.Application(routes).listen(port, "127.0.0.1", backlog=2048)
        await asyncio.Event().wait()

    asyncio.run(main())


def django_tornado_server(port: int, processes: int, threads: int | None = None) -> None:
    import app  # noqa: F401 (configures Django)

    import django_tornado

    django_tornado.serve([f"127.0.0.1:{port}"], processes=processes, threads=threads)


def wsgi_container(port: int, threads: int) -> None:
    """Tornado's own WSGIContainer around Django, with or without a thread pool (Tornado >= 6.3)."""
    import app
    import tornado.httpserver
    import tornado.wsgi

    async def main():
        executor = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
        container = tornado.wsgi.WSGIContainer(app.wsgi, executor=executor)
        server = tornado.httpserver.HTTPServer(container)
        server.listen(port, "127.0.0.1", backlog=2048)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    name, port, *rest = sys.argv[1:]
    if name == "raw":
        raw_tornado(int(port))
    elif name == "ours":
        django_tornado_server(int(port), int(rest[0]) if rest else 1, int(rest[1]) if len(rest) > 1 else None)
    elif name == "wsgicontainer":
        wsgi_container(int(port), int(rest[0]) if rest else 0)
    else:
        sys.exit(f"unknown server {name!r}")
