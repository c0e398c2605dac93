"""Serve a Django project on Tornado: plain views in a thread pool, long-polls and live updates on the IOLoop.

Every ordinary Django view keeps working unchanged (middleware, sessions, auth,
CSRF, admin, uploads, error pages) and never blocks the IOLoop. Views that want
Tornado's powers get them: an ``@asynchronous`` view receives the Tornado
handler as an extra argument and may answer later, and an ``async def`` view
runs on the IOLoop and can ``await`` anything asyncio or Tornado offers::

    from django.http import JsonResponse
    from django_tornado import Channel, EventStream, WebSocket, asynchronous, serve

    def hello(request):                      # a plain view: runs in the pool
        return JsonResponse({"hello": request.GET.get("name", "world")})

    @asynchronous
    def wait(request, handler):              # the body runs on the IOLoop
        waiter = handler.async_callback(handler.finish)  # callable from any thread
        waiters.add(waiter)                  # someone calls waiter({"news": ...}) later
        handler.add_disconnect_callback(lambda: waiters.discard(waiter))
        # returns None: the answer comes later

    async def pause(request):                # runs on the IOLoop too
        await asyncio.sleep(1)
        return JsonResponse({"slept": 1})

    news = Channel("news")                   # publish from any view, thread or process
    def live(request):                       # Server-Sent Events, replaying what a client missed
        return EventStream(news, request)

    class Feed(WebSocket):                   # a WebSocket that is a Django view: path("ws/", Feed.as_view())
        def open(self):                      # self.request is the handshake's (user, session, ...)
            self.subscribe(news)

    # Tornado routes first, Django for the rest; one process on both ports:
    serve(["8000", "8001"], handlers=[(r"/ws", MyWebSocketHandler)])

``python manage.py runtornado 8000 8001`` does the same with "django_tornado" in
INSTALLED_APPS, and ``make_app()`` returns the ``tornado.web.Application`` for
code that runs its own IOLoop.

Concurrency: plain views run in a bounded thread pool (``threads``), so state
they share with ``@asynchronous`` views needs a lock. ``@asynchronous`` view
bodies, their ``async_callback`` callbacks and ``async def`` views run on the
IOLoop thread and must not block it. An ``@asynchronous`` view that returns
``None`` owns the response until it calls ``handler.finish()`` (from any thread
through ``handler.async_callback``). With ``threads=0`` everything runs on the
IOLoop thread, as the original django_tornado did. ``Channel.publish`` is safe
from any thread; channel readers (``query`` callbacks, event streams,
``listen()``) run on the IOLoop. Channels live in this process's memory, or in
Redis with ``settings.TORNADO_CHANNELS_URL``. A WebSocket's plain methods run in
the pool, one at a time per socket; its ``async def`` ones and ``on_event`` run
on the IOLoop.

Not supported: HTTP/2, and response middleware that rewrites the late body of
an ``@asynchronous`` view (GZip, ETags): middleware sees a placeholder, and only
its headers reach the late answer.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import datetime
import errno
import functools
import gc
import hashlib
import inspect
import io
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from typing import Any, TextIO

import django
import tornado.autoreload
import tornado.concurrent
import tornado.escape
import tornado.gen
import tornado.http1connection
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.routing
import tornado.util
import tornado.web
import tornado.websocket
from asgiref.sync import SyncToAsync, iscoroutinefunction
from django.apps import apps
from django.conf import ENVIRONMENT_VARIABLE, settings
from django.core import signals
from django.core.exceptions import DisallowedHost, ImproperlyConfigured
from django.core.handlers.wsgi import (
    WSGIHandler,
    get_path_info,
)
from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    handle_default_options,
)
from django.db import connections
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    QueryDict,
    StreamingHttpResponse,
)
from django.http.request import split_domain_port, validate_host
from django.urls import Resolver404, get_resolver
from django.utils.cache import add_never_cache_headers
from django.utils.http import is_same_domain
from django.utils.module_loading import import_string

__version__ = "0.1.0"
__all__ = ["Channel", "ChannelUnavailable", "Command", "DjangoHandler", "EventStream", "WebSocket", "asynchronous", "main", "make_app", "serve"]

_logger = logging.getLogger(__name__)

# Code written for the original project imports ``django_tornado.decorator``;
# the single-file module answers to that name too.
sys.modules[f"{__name__}.decorator"] = sys.modules[__name__]

# Threads for plain views, per process. Measured (bench/pool_sizes.py, one core): a sync
# JSON view answers as fast with 16 as with 6 (more contend for the GIL: -5% at 32, -11%
# at 64), and a view blocking 20 ms on I/O gets 770 req/s from 16 where 6 give 287 and
# uvicorn's thread per request 488. More cores: more processes, each with its own pool.
_DEFAULT_THREADS = 16
# Threads for the synchronous part (middleware) of @asynchronous views, so
# long-polls keep being accepted while slow plain views fill the main pool.
_RESERVED_THREADS = 4
# Threads in which the middleware around async def views waits while their coroutines
# run on the IOLoop: a waiting thread costs memory, not CPU, so there may be many.
_WAITING_THREADS = 1000
_HANDLER_ENVIRON_KEY = "tornado.handler"  # PEP 3333 lets servers add keys of their own

_FILE_BLOCK_SIZE = 64 * 1024  # FileResponse reads 4 KiB by default; Django's ASGI handler raises it too
_ROUTE_CACHE_SIZE = 1024  # distinct paths whose view kind is remembered
_CALLS_PER_TURN = 100  # async_callback calls from other threads run per IOLoop turn (~10 ms of finish())

# How a request's view runs, decided once per path (see _DjangoBridge.route).
_PLAIN = "plain"  # whole Django cycle in the main pool
_DEFERRING = "asynchronous"  # middleware in the reserved pool, view body on the IOLoop
_COROUTINE = "async def"  # Django's sync cycle in the waiting pool, the view's coroutine on the IOLoop

_END = object()  # sentinel for next() on a streaming iterator
_BODYLESS_STATUS_CODES = frozenset((*range(100, 200), 204, 304))  # RFC 9110 section 6.4.1
# Headers that describe the placeholder's empty body, not the late answer.
_PLACEHOLDER_ONLY_HEADERS = frozenset(
    ("content-type", "content-length", "content-encoding", "etag", "last-modified")
)


# -- The bridge: Tornado request -> WSGI environ -> Django -> Tornado response ------


def _wsgi_environ(tornado_request: tornado.httputil.HTTPServerRequest, body: io.IOBase, handler: DjangoHandler) -> dict[str, Any]:
    """Build the PEP 3333 environ Django's WSGIRequest reads.

    ``protocol`` and ``remote_ip`` already honour X-Forwarded-Proto / X-Real-IP
    when, and only when, the HTTPServer runs with ``xheaders=True``.
    """
    path, authority = tornado_request.path, None
    if not path.startswith("/") and "://" in path:
        # Absolute-form request target (RFC 9112 section 3.2.2): its authority is the
        # host (the Host header is ignored) and the path is what follows it.
        authority, _, path = path.split("://", 1)[1].partition("/")
        path = "/" + path
    host, port = tornado.httputil.split_host_and_port(authority or tornado_request.host)
    environ = {
        "REQUEST_METHOD": tornado_request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: the percent-decoded bytes, carried as a latin-1 string.
        "PATH_INFO": tornado.escape.url_unescape(path, encoding=None, plus=False).decode("latin-1"),
        "QUERY_STRING": tornado_request.query,
        "REMOTE_ADDR": tornado_request.remote_ip,
        "SERVER_NAME": host,
        "SERVER_PORT": str(port or (443 if tornado_request.protocol == "https" else 80)),
        "SERVER_PROTOCOL": tornado_request.version,
        "CONTENT_LENGTH": str(body.seek(0, io.SEEK_END)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": tornado_request.protocol,
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        _HANDLER_ENVIRON_KEY: handler,
    }
    body.seek(0)
    for name, value in tornado_request.headers.get_all():
        if "_" in name:
            # X_Forwarded_For and X-Forwarded-For would both become HTTP_X_FORWARDED_FOR;
            # drop the underscore spelling, as runserver and gunicorn do.
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    if authority is not None:
        environ["HTTP_HOST"] = authority
    environ.pop("HTTP_CONTENT_LENGTH", None)  # the body length above is the truth (chunked uploads have none)
    if "HTTP_CONTENT_TYPE" in environ:
        environ["CONTENT_TYPE"] = environ.pop("HTTP_CONTENT_TYPE")
    return environ


def _response_headers(response: HttpResponseBase) -> list[tuple[str, str]]:
    """Return a Django response's headers, one ``Set-Cookie`` per cookie, as WSGIHandler does."""
    return [
        *response.items(),
        *(("Set-Cookie", cookie.output(header="").strip()) for cookie in response.cookies.values()),
    ]


def _call_outside_event_loop(function: Callable[..., Any], *args: Any) -> Any:
    """Call a blocking function on the IOLoop thread as if no event loop were running.

    Django (>= 3.0) raises SynchronousOnlyOperation for ORM calls from a thread
    whose event loop is running. With ``threads=0`` plain views run on the IOLoop
    thread on purpose, so the running loop is hidden for the call, through the
    hook event-loop implementations themselves use (uvloop calls it too).
    """
    loop = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    try:
        return function(*args)
    finally:
        asyncio.events._set_running_loop(loop)


class _DeferredResponse(HttpResponse):
    """Stand-in an ``@asynchronous`` view returns through Django's middleware when it answers later.

    Middleware adds its headers (cookies, Vary, security headers) to this
    placeholder; the bridge copies them onto the late answer. It is marked
    uncacheable so cache middleware never stores the empty stand-in.
    """

    def __init__(self, timeout: float | None) -> None:
        super().__init__()
        self.timeout = timeout
        add_never_cache_headers(self)


class _CallsFromThreads:
    """Calls from other threads to the IOLoop, run in batches.

    One wake-up of the loop per batch instead of one per call, and at most
    _CALLS_PER_TURN per turn of the loop: a plain view that wakes thousands of
    long-polls must not hold up everything else (its own answer included)
    until the last of them is written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._scheduled = False

    def call_soon(self, loop: tornado.ioloop.IOLoop, function: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._calls.append(functools.partial(function, *args, **kwargs))
            if self._scheduled:
                return
            self._scheduled = True
        loop.add_callback(self._run_some, loop)

    def _run_some(self, loop: tornado.ioloop.IOLoop) -> None:
        with self._lock:
            batch = [self._calls.popleft() for _ in range(min(len(self._calls), _CALLS_PER_TURN))]
            self._scheduled = bool(self._calls)
        for call in batch:
            call()
        if self._scheduled:
            loop.add_callback(self._run_some, loop)


class _GrowingPool(concurrent.futures.Executor):
    """Up to ``limit`` threads, which the pool starts itself: ``submit()`` never waits for a thread to start.

    ThreadPoolExecutor starts a thread inside ``submit()``, and ``Thread.start()``
    waits until the new thread gets the GIL, a few milliseconds when other threads
    hold it: 500 ``async def`` requests arriving while a CPU-bound view ran held
    the IOLoop 2.8 s. Here a starter thread adds threads while tasks outnumber
    idle ones, and each new thread that takes a task while that is still so
    starts one more. Like ThreadPoolExecutor, a pool that has started threads
    does not survive a fork.
    """

    def __init__(self, limit: int, name: str, initializer: Callable[[], None]) -> None:
        self._limit, self._name, self._initializer = limit, name, initializer
        self._tasks: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()  # (future, function, args, kwargs); None: stop
        self._lock = threading.Lock()
        self._queued = self._idle = 0
        self._threads: list[threading.Thread] = []
        self._starter: threading.Thread | None = None  # started at the first task
        self._short = threading.Semaphore(0)  # released for the starter to look
        self._closed = False

    def submit(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        starter = None
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queued += 1
            short = self._is_short()
            if short and self._starter is None:
                self._starter = starter = threading.Thread(target=self._start_threads, name=f"{self._name}-starter", daemon=True)
        self._tasks.put((future, function, args, kwargs))
        if short:
            self._short.release()
            if starter is not None:
                starter.start()
        return future

    def _is_short(self) -> bool:
        """Whether tasks outnumber idle threads and there is room for one more (under the lock)."""
        return self._queued > self._idle and len(self._threads) < self._limit and not self._closed

    def _add_thread(self) -> bool:
        with self._lock:
            if not self._is_short():
                return False
            thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            self._idle += 1  # it is about to wait for a task
        thread.start()
        return True

    def _start_threads(self) -> None:
        while True:
            self._short.acquire()
            if self._closed:
                return
            while self._add_thread():
                pass

    def _work(self) -> None:
        self._initializer()
        while (task := self._tasks.get()) is not None:
            with self._lock:
                self._queued -= 1
                self._idle -= 1
            self._add_thread()
            future, function, args, kwargs = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args, **kwargs))
                except BaseException as error:  # noqa: BLE001 (handed to whoever holds the future)
                    future.set_exception(error)
            del task, future, function, args, kwargs  # a thread waiting for its next task keeps nothing of the last alive
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        self._short.release()
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while task := self._tasks.get_nowait():
                    task[0].cancel()
        for _ in threads:
            self._tasks.put(None)
        if wait:
            for thread in threads:
                thread.join()


class _DjangoBridge:
    """What every DjangoHandler of one application shares: Django's handlers and the pools."""

    def __init__(self, threads: int, static: bool) -> None:
        self.wsgi_handler = WSGIHandler()
        if static:
            from django.contrib.staticfiles.handlers import StaticFilesHandler

            self.wsgi_handler = StaticFilesHandler(self.wsgi_handler)
        self.calls_from_threads = _CallsFromThreads()
        self.application: tornado.web.Application | None = None  # make_app's, whose log_request logs each request
        self.loop: asyncio.AbstractEventLoop | None = None  # the IOLoop serving, known from the first request
        self.ioloop: tornado.ioloop.IOLoop | None = None  # the same, as Tornado's
        self.executor = self._pool(threads, "django")
        self.reserved_executor = self._pool(min(threads, _RESERVED_THREADS), "django-asynchronous")
        self.waiting_executor = _GrowingPool(_WAITING_THREADS, "django-async", self._know_loop)
        self.active_handlers: set[DjangoHandler] = set()  # requests in progress, for a graceful shutdown
        self.deferred_handlers: set[DjangoHandler] = set()  # those parked until the view answers
        self.sockets: set[WebSocket] = set()  # open WebSockets
        self._tasks: set[asyncio.Task[Any]] = set()  # spawned, running
        self._sockets_by_session: dict[str, set[WebSocket]] = {}  # by their session's hash, for logouts
        self._logouts: _Reader | None = None
        self.stopping = False
        self._idle: asyncio.Future[None] | None = None
        self._resolver = None
        self._routes: dict[str, str] = {}

    def _pool(self, threads: int, name: str) -> concurrent.futures.ThreadPoolExecutor | None:
        """A pool of ``threads`` threads that know their IOLoop (see _know_loop); None for 0 threads."""
        return concurrent.futures.ThreadPoolExecutor(threads, name, initializer=self._know_loop) if threads else None

    def _know_loop(self) -> None:
        """Tell a new pool thread its IOLoop (it starts at its first task, sent from the IOLoop).

        A channel read in the thread reads on it. And asgiref's async_to_sync,
        which Django's handler wraps an async def view (or async-only
        middleware) in, runs the coroutine on the event loop SyncToAsync left in
        this thread-local (asgiref 3.6-3.11) instead of on a new loop per call,
        while sync_to_async calls inside it come back to this thread.
        """
        _thread_state.loop = self.loop
        SyncToAsync.threadlocal.main_event_loop = self.loop
        SyncToAsync.threadlocal.main_event_loop_pid = os.getpid()

    def route(self, environ: dict[str, Any]) -> str:
        """Return how the view for this request runs: _PLAIN, _DEFERRING or _COROUTINE.

        Only the pool choice depends on this guess: a view reached through a
        per-request urlconf or an i18n prefix that the default resolver does not
        see still works, since ``@asynchronous`` dispatches to the IOLoop itself.
        """
        resolver = get_resolver()
        if resolver is not self._resolver:  # ROOT_URLCONF changed (override_settings in tests)
            self._resolver, self._routes = resolver, {}
        path = environ["PATH_INFO"]
        kind = self._routes.get(path)
        if kind is None:
            try:
                view = resolver.resolve(get_path_info(environ)).func
            except Resolver404:
                kind = _PLAIN
            except Exception:  # noqa: BLE001
                return _PLAIN  # a broken urlconf: let Django report it, and look again next time
            else:
                if iscoroutinefunction(view):
                    kind = _COROUTINE
                elif getattr(view, "tornado_asynchronous", False):
                    kind = _DEFERRING
                else:
                    kind = _PLAIN
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[path] = kind
        return kind

    def get_response(self, environ: dict[str, Any]) -> HttpResponseBase:
        """Run the whole WSGI cycle of Django (signals, middleware, view) for one request.

        Runs in a pool thread (or on the IOLoop thread with ``threads=0``). A
        buffered response is closed here, on the thread whose database
        connections ``request_finished`` tidies; a streaming one when it ends.
        """
        response = self.wsgi_handler(environ, _ignore_start_response)
        if not response.streaming:
            response.close()
        return response

    def get_response_awaiting(self, environ: dict[str, Any], view_tasks: _ViewTasks) -> HttpResponseBase | None:
        """Run Django's WSGI cycle around an ``async def`` view, whose coroutine runs on the IOLoop.

        As under any WSGI server: middleware, signals and the database run in
        this thread, and Django's async_to_sync awaits the view, here on the
        IOLoop (see _know_loop). The view's task is put in ``view_tasks`` (asgiref
        3.8+), for the client leaving to cancel; then None is returned, once
        ``request_finished`` has closed what ``request_started`` opened.
        """
        SyncToAsync.threadlocal.task_context = view_tasks
        try:
            return self.get_response(environ)
        except asyncio.CancelledError:
            signals.request_finished.send(sender=WSGIHandler)
            return None
        finally:
            SyncToAsync.threadlocal.task_context = None

    async def run_blocking(self, executor: concurrent.futures.Executor | None, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking Django code in ``executor``, or right here when there is no pool (the result comes back as _run_then says)."""
        if executor is None:
            return _call_outside_event_loop(function, *args)
        result = self.loop.create_future()
        executor.submit(self._run_then, _settle, result, function, args)
        return await result

    def run_for(self, origin: _DjangoRequest, executor: concurrent.futures.Executor | None, function: Callable[..., Any], *args: Any) -> None:
        """Run Django for ``origin`` in ``executor`` (or now, with no pool); it hears the answer on the IOLoop.

        With no coroutine or future between: a plain request costs a callback.
        """
        if executor is None:
            try:
                response, error = _call_outside_event_loop(function, *args), None
            except Exception as failure:  # noqa: BLE001 (answered with a 500 and logged)
                response, error = None, failure
            _answer_for(origin, response, error)
        else:
            executor.submit(self._run_then, _answer_for, origin, function, args)

    def _run_then(self, then: Callable[[Any, Any, BaseException | None], None], receiver: Any, function: Callable[..., Any], args: tuple) -> None:
        """In a pool thread: run ``function``, then ``then(receiver, value, error)`` on the IOLoop.

        The answers come back with the other calls from threads, in batches (one
        wake-up of the IOLoop for many), not through run_in_executor's chained
        futures, one wake-up each.
        """
        try:
            value = function(*args)
        except BaseException as error:  # noqa: BLE001 (handed over, raised again where awaited)
            self.calls_from_threads.call_soon(self.ioloop, then, receiver, None, error)
        else:
            self.calls_from_threads.call_soon(self.ioloop, then, receiver, value, None)

    def close_response(self, response: HttpResponseBase) -> Awaitable[None]:
        """Close a finished streaming response (sends ``request_finished``) off the IOLoop."""
        return self.run_blocking(self.executor, response.close)

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Run ``coroutine`` on the IOLoop with nobody awaiting it; its failure is logged."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _logger.error("A task the IOLoop ran for a request failed", exc_info=task.exception())

    def handler_finished(self, handler: DjangoHandler) -> None:
        """Note that ``handler``'s response has been written out (or a WebSocket has the connection)."""
        self.active_handlers.discard(handler)
        self._note_if_idle()

    def socket_opened(self, websocket: WebSocket) -> None:
        self.sockets.add(websocket)
        if websocket._session_hash is not None:
            self._sockets_by_session.setdefault(websocket._session_hash, set()).add(websocket)
            if self._logouts is None:  # from now on, a logout in any process closes its sockets here
                self._logouts = _Reader(Channel(_LOGOUTS), None, self._close_logged_out, _nothing)
                self._logouts.start()

    def socket_closed(self, websocket: WebSocket) -> None:
        self.sockets.discard(websocket)
        same_session = self._sockets_by_session.get(websocket._session_hash, set())
        same_session.discard(websocket)
        if not same_session:
            self._sockets_by_session.pop(websocket._session_hash, None)
        self._note_if_idle()

    def _close_logged_out(self, events: list[_Event]) -> None:
        for event in events:
            for websocket in list(self._sockets_by_session.get(event["data"], ())):
                websocket.close(_LOGGED_OUT, "logged out")

    def _note_if_idle(self) -> None:
        if not (self.active_handlers or self.sockets) and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def drain(self, grace_period: float) -> bool:
        """Answer parked requests now, then wait up to ``grace_period`` s for the rest.

        Return True if every request finished in time.
        """
        self.stopping = True
        loop = asyncio.get_running_loop()
        _stop_channel_readers(loop)  # long-polls on channels get no events, event streams end
        for handler in list(self.deferred_handlers):
            handler.answer_for_shutdown()
        for websocket in list(self.sockets):
            websocket.close(1001, "the server is stopping")  # after what was sent to it
        deadline = loop.time() + grace_period
        while self.active_handlers or self.sockets:
            self._idle = loop.create_future()
            finished, _ = await asyncio.wait({self._idle}, timeout=max(0.0, deadline - loop.time()))
            if not finished:
                return False
        return True

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the pools; with ``wait``, once the requests in them are done."""
        for executor in (self.executor, self.reserved_executor, self.waiting_executor):
            if executor is not None:
                executor.shutdown(wait=wait, cancel_futures=not wait)


class _ViewTasks(list):
    """Where asgiref's async_to_sync puts the task of an async def view it runs: a task list that cancels.

    Cancelled first (the client left before the view began), it cancels the
    task as soon as asgiref puts it in.
    """

    cancelled = False

    def append(self, task: asyncio.Task[Any]) -> None:
        super().append(task)
        if self.cancelled:
            task.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        for task in self:
            task.cancel()


def _answer_for(origin: _DjangoRequest, response: HttpResponseBase | None, error: BaseException | None) -> None:
    if error is not None:  # not Django's errors, which are 500 pages: the bridge's own
        _logger.error("%s %s: serving the request failed", origin.request.method, origin.request.uri, exc_info=error)
        response = _plain_response(500, "the server could not answer this request")
    origin.answered(response)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # its awaiter was cancelled meanwhile
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _ignore_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    """WSGI ``start_response``: the bridge reads status and headers from the response itself."""


class _DjangoRequest(tornado.httputil.HTTPMessageDelegate):
    """One request for Django: its body, Django's answer, and that answer written out.

    Tornado's RequestHandler machinery costs as much per request as the whole
    of Django's default middleware, and most answers need none of it: a plain
    response is written here, straight to the connection. A DjangoHandler takes
    the request over where its API is needed: an ``@asynchronous`` view (its
    ``handler``), and answers that are streamed, deferred or upgraded.
    """

    __slots__ = ("_body", "_client_left", "_handler", "_status", "_view_tasks", "bridge", "request")

    def __init__(self, bridge: _DjangoBridge, request: tornado.httputil.HTTPServerRequest) -> None:
        self.bridge = bridge
        self.request = request
        self._body: io.IOBase | None = None
        self._handler: DjangoHandler | None = None
        self._view_tasks: _ViewTasks | None = None  # an async def view's coroutine, which the client leaving cancels
        self._client_left = False  # before any of the answer went out (the access log's 499)
        self._status = 200

    # Request body: collected here so Tornado does not parse forms Django will parse.

    def data_received(self, chunk: bytes) -> None:
        if self._body is None:
            self._body = io.BytesIO()
        if isinstance(self._body, io.BytesIO) and self._body.tell() + len(chunk) > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            # Large uploads spill to disk, as with Django's ASGI handler.
            spooled = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE)  # noqa: SIM115 (closed once Django is done)
            spooled.write(self._body.getvalue())
            self._body = spooled
        self._body.write(chunk)

    def finish(self) -> None:
        """The whole request is here: hand it to Django, in the pool its view's kind calls for."""
        bridge = self.bridge
        if bridge.loop is None:
            bridge.ioloop = tornado.ioloop.IOLoop.current()
            bridge.loop = bridge.ioloop.asyncio_loop
        bridge.active_handlers.add(self)
        connection = self.request.connection
        if connection.stream.closed():
            # The client left as it sent the request: Tornado (6.3 to 6.5) calls no close callback then.
            self._client_left = True
        else:
            connection.set_close_callback(self.on_connection_close)
        if self.request.method not in _METHODS:
            # Django answers 405 for the methods a view refuses; one no view could take is 501 (RFC 9110 15.6.2).
            self._answer(_plain_response(501, f"{self.request.method[:20]} is not a method this server knows"), allow=True)
            return
        if self._body is None:
            self._body = io.BytesIO()
        environ = _wsgi_environ(self.request, self._body, self)
        kind = bridge.route(environ)
        if kind is _COROUTINE:
            self._view_tasks = _ViewTasks()
            if self._client_left:
                self._view_tasks.cancel()
            bridge.run_for(self, bridge.waiting_executor, bridge.get_response_awaiting, environ, self._view_tasks)
        else:
            bridge.run_for(self, bridge.reserved_executor if kind is _DEFERRING else bridge.executor, bridge.get_response, environ)

    def answered(self, response: HttpResponseBase | None) -> None:
        """Django's answer is here (on the IOLoop): write it, or have a handler write it; None if cancelled."""
        self._body.close()  # Django has read it; a spilled upload leaves the disk now
        if response is None:  # the client left and the view was cancelled
            self._end()
        elif self._handler is not None and self._handler._step_aside(response):
            self._handler = None
            self._answer(response)  # an @asynchronous view that answered at once, as a plain one does
        elif self._handler is not None or response.streaming or isinstance(response, (_DeferredResponse, _SocketUpgrade)):
            unfinished = self.handler().respond(response)
            if unfinished is not None:
                self.bridge.spawn(unfinished)
        elif self._client_left:
            self._end()
        else:
            self._answer(response)

    def _answer(self, response: HttpResponseBase, allow: bool = False) -> None:
        """Write a whole response, headers and body at once (what RequestHandler.finish() would send)."""
        status = self._status = response.status_code
        headers = tornado.httputil.HTTPHeaders({"Server": _SERVER, "Date": _http_date()})
        for name, value in _response_headers(response):
            headers.add(name, value)
        if allow:
            headers["Allow"] = ", ".join(sorted(_METHODS))
        body = b"" if self.request.method == "HEAD" else response.content
        if status in _BODYLESS_STATUS_CODES:
            headers.pop("Content-Length", None)  # CommonMiddleware counts the content HTTP forbids here
            body = b""
        elif "Content-Length" not in headers:
            headers["Content-Length"] = str(len(response.content))
        start_line = tornado.httputil.ResponseStartLine("", status, response.reason_phrase)
        connection = self.request.connection
        written = connection.write_headers(start_line, headers, body)
        connection.finish()
        written.add_done_callback(self._written)

    def _written(self, write: asyncio.Future[None]) -> None:
        """Over once the last byte has left (or the client has: no error here)."""
        if not write.cancelled():
            write.exception()
        self._end()

    def _end(self) -> None:
        self.bridge.application.log_request(self)
        self.bridge.handler_finished(self)

    def on_connection_close(self) -> None:
        """The client left before its answer went out: cancel an async def view that awaits."""
        self._client_left = True
        if self._view_tasks is not None:
            self._view_tasks.cancel()

    # For Tornado's access log (Application.log_request), as a RequestHandler would.

    def get_status(self) -> int:
        return self._status

    def _request_summary(self) -> str:
        return f"{self.request.method} {self.request.uri} ({self.request.remote_ip})"

    # The RequestHandler, when one is needed.

    def handler(self) -> DjangoHandler:
        """The DjangoHandler that takes this request over, made the first time (on the IOLoop)."""
        if self._handler is None:
            self._handler = DjangoHandler(self.bridge.application, self.request, bridge=self.bridge, origin=self)
        return self._handler

    def call_on_loop_and_wait(self, function: Callable[[], Any]) -> Any:
        """Call ``function`` on the IOLoop and wait for its result (from a pool thread; at once on the IOLoop)."""
        if asyncio.events._get_running_loop() is self.bridge.loop:
            return function()
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function())
            except BaseException as error:  # noqa: BLE001 (raised again in the waiting thread)
                result.set_exception(error)

        self.bridge.calls_from_threads.call_soon(self.bridge.ioloop, run)
        return result.result()


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))  # RequestHandler's, but TRACE and CONNECT
_SERVER = f"TornadoServer/{tornado.version}"  # the Server header RequestHandler sends
_http_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """Now, as an HTTP Date header: formatted once a second, not once a request."""
    now = int(time.time())
    if _http_date_cache[0] != now:
        _http_date_cache[:] = [now, tornado.httputil.format_timestamp(now)]
    return _http_date_cache[1]


def _outside_execute(handler: tornado.web.RequestHandler) -> None:
    """Ready a RequestHandler that Tornado's Application does not execute to write through its API.

    RequestHandler._execute sets the output transforms (Tornado 6.3-6.6); the
    handlers the bridge makes, and a WebSocket's, never pass through it.
    """
    handler._transforms = []


class _DjangoRouter(tornado.routing.Router):
    """The Application's last rule: every request its handlers don't take goes to Django."""

    def __init__(self, bridge: _DjangoBridge) -> None:
        self.bridge = bridge

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> _DjangoRequest:
        return _DjangoRequest(self.bridge, request)


# A request's life in DjangoHandler, one state at a time; DjangoHandler._move_to
# makes every move, and _NEXT_STATES says which it may make.
_IN_DJANGO = "in Django"  # middleware and the view run: nothing of the answer may go out yet
_PROMISED = "promised"  # an @asynchronous view returned None; middleware still runs
_DEFERRED = "deferred"  # that view answers later, through the handler
_RESPONDING = "responding"  # an answer is going out: Django's, or the server's own (500, 503, 504)
_ABANDONED = "abandoned"  # the view's answer will never come: its client left, it timed out, the server stops
_ANSWERED = "answered"  # over: the answer went out
_GONE = "gone"  # over: the client left
_UPGRADED = "upgraded"  # over here: a WebSocket has the connection
_NEXT_STATES = {
    _IN_DJANGO: {_PROMISED, _RESPONDING, _UPGRADED, _ABANDONED},
    _PROMISED: {_DEFERRED, _ABANDONED},
    _DEFERRED: {_ABANDONED, _ANSWERED},
    _RESPONDING: {_ANSWERED, _GONE},
    _ABANDONED: {_RESPONDING, _ANSWERED, _GONE},  # answered: a disconnect callback did it
    _ANSWERED: set(),
    _GONE: set(),
    _UPGRADED: set(),
}
_DJANGO_RUNNING = frozenset((_IN_DJANGO, _PROMISED))
_OVER = frozenset((_ANSWERED, _GONE, _UPGRADED))


class DjangoHandler(tornado.web.RequestHandler):
    """A request Django is serving, as ``@asynchronous`` views receive it: ``handler``.

    All of Tornado's RequestHandler API is there (``write``, ``flush``,
    ``finish``, ``set_header``, ``set_status``, ``request``, ...), plus
    ``async_callback`` and ``add_disconnect_callback``. The bridge makes one
    when a request needs it (see _DjangoRequest), while Django runs or once it
    has answered; Tornado does not execute it as it does other handlers.
    """

    # Slots keep these out of the instance's dict (Tornado's own attributes fill it):
    # a parked request's size counts, thousands at a time.
    __slots__ = (
        "_client_left",
        "_disconnect_callbacks",
        "_expiry",
        "_finish_waiting",
        "_finishing",
        "_headers_sent",
        "_headers_set_meanwhile",
        "_loop_thread",
        "_origin",
        "_over_callbacks",
        "_state",
        "_task",
        "_touched",
        "_view_tasks",
        "_waiting_for_django",
        "_wrote_lately",
        "bridge",
        "loop",
    )

    def initialize(self, bridge: _DjangoBridge, origin: _DjangoRequest) -> None:
        _outside_execute(self)
        self.bridge = bridge
        self.loop = bridge.ioloop
        self._loop_thread = threading.get_ident()
        self._origin = origin  # the request as the bridge keeps it (its accounting, its body)
        self._state = _IN_DJANGO
        # Made when first needed (most requests need none of them):
        self._waiting_for_django: list[Callable[[], None]] | None = None  # flush/finish asked for while Django runs
        self._headers_set_meanwhile: set[str] | None = None
        self._disconnect_callbacks: list[Callable[[], None]] | None = None
        self._over_callbacks: list[Callable[[], None]] | None = None  # run when the request is over, however it ends
        self._finish_waiting: asyncio.Future[None] | None = None
        self._finishing = False
        self._task: asyncio.Task[Any] | None = None  # an async iterator streaming, which the client leaving cancels
        self._view_tasks = origin._view_tasks  # an async def view's coroutine, likewise
        self._expiry: object | None = None  # the deferred request's timeout, or the event stream's keepalive
        self._headers_sent = False
        self._client_left = origin._client_left  # before any of the answer went out (the access log's 499)
        self._wrote_lately = False  # an event stream wrote since its last keepalive tick
        self._touched = False  # the view wrote, set a header or asked for a flush through it while Django ran
        if self._client_left:  # gone before this handler was made
            self._move_to(_ABANDONED)
            self._move_to(_GONE)

    def _move_to(self, state: str) -> bool:
        """Make the request's one move to ``state``, doing what entering it does; False once it is over.

        Entering "abandoned" runs the disconnect callbacks (the view's answer
        will not come); entering an end runs the callbacks of ``_when_over``.
        """
        if self._state in _OVER:
            return False
        if state not in _NEXT_STATES[self._state]:
            raise RuntimeError(f"{self.request.method} {self.request.uri}: a request can't go from {self._state} to {state}")
        self._state = state
        if state is _ABANDONED:
            callbacks, self._disconnect_callbacks = self._disconnect_callbacks or (), None
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    _logger.exception("Error in disconnect callback for %s %s", self.request.method, self.request.uri)
        elif state in _OVER:
            self._disconnect_callbacks = None
            if self._expiry is not None:
                self.loop.remove_timeout(self._expiry)
                self._expiry = None
            self.bridge.deferred_handlers.discard(self)
            callbacks, self._over_callbacks = self._over_callbacks or (), None
            for callback in callbacks:
                callback()
        return True

    def check_xsrf_cookie(self) -> None:
        """Leave CSRF to Django's CsrfViewMiddleware, even if the app sets ``xsrf_cookies``."""

    def compute_etag(self) -> None:
        """Send no automatic ETag: Django's ConditionalGetMiddleware decides that."""

    # The request's journey, once Django has answered.

    def respond(self, response: HttpResponseBase) -> Awaitable[None] | None:
        """Write what Django answered: a response, a stream, an upgrade, or (a placeholder) nothing yet.

        Return what must still be awaited (a stream being written, a response
        closing), or None when all is done.
        """
        if self._state in _OVER:  # the client left while Django worked
            self._end_gone()
            return self.bridge.close_response(response) if response.streaming else None
        if isinstance(response, _SocketUpgrade):
            self._upgrade(response)
        elif isinstance(response, _DeferredResponse):
            timeout, parks = response.timeout, self._take_placeholder(response)
            del response  # a parked request keeps nothing of Django's response: memory per waiter counts
            if parks:
                self._answer_later(timeout)
        else:
            return self._write_response(response)
        return None

    def _step_aside(self, response: HttpResponseBase) -> bool:
        """End here, without writing, if ``response`` is a whole one and the view wrote nothing through this handler.

        An ``@asynchronous`` view that returned a response at once needed the
        handler only as an argument: the request writes the response itself,
        as for a plain view, at a third of the cost. What waits for the end of
        the request (a query the view made) ends now.
        """
        if self._state is not _IN_DJANGO or self._touched or response.streaming or isinstance(response, (_DeferredResponse, _SocketUpgrade)):
            return False
        self._finishing = True  # nothing of this handler is to be written
        self._move_to(_RESPONDING)
        self._move_to(_ANSWERED)
        self.ui = None  # as RequestHandler.finish() does: no cycle keeps this handler for the collector
        return True

    def _upgrade(self, upgrade: _SocketUpgrade) -> None:
        """Hand the connection to the WebSocket the view made, unless the server is stopping."""
        if self.bridge.stopping:
            self._fail(503)
            return
        self._move_to(_UPGRADED)
        upgrade.websocket._start(self, upgrade)
        self.bridge.handler_finished(self._origin)
        self.ui = None  # as RequestHandler.finish() does: no cycle keeps this handler for the collector

    def _write_response(self, response: HttpResponseBase) -> Awaitable[None] | None:
        """Write Django's response: headers, then the body at once or chunk by chunk (returned to await)."""
        if self._state is _PROMISED:
            # Middleware replaced the view's placeholder (an error in process_response,
            # say): the view's answer will never go out, so let it drop its waiter.
            _logger.warning("%s %s: middleware replaced the placeholder of an @asynchronous view", self.request.method, self.request.uri)
            self._waiting_for_django = None
            self._move_to(_ABANDONED)
        self._move_to(_RESPONDING)
        self.set_status(response.status_code, response.reason_phrase)
        self.clear_header("Content-Type")  # Tornado's default; Django's own headers are complete
        for name, value in _response_headers(response):
            if name == "Set-Cookie":
                self.add_header(name, value)
            else:
                self.set_header(name, value)
        if response.status_code in _BODYLESS_STATUS_CODES:
            self.clear_header("Content-Length")  # CommonMiddleware counts the content HTTP forbids here
            self.finish()
            return self.bridge.close_response(response) if response.streaming else None
        if isinstance(response, EventStream):
            self._stream_events(response)
        elif response.streaming:
            return self._stream(response)
        else:
            self.finish(response.content)
        return None

    async def _stream(self, response: HttpResponseBase) -> None:
        """Write each chunk as the iterator produces it; stop when the client goes away.

        A sync iterator runs in the pool one chunk at a time, so it holds a
        thread only while producing; an async one runs on the IOLoop and is
        cancelled as soon as the client leaves. If the iterator raises, the
        connection is closed without the final chunk, so the client sees a
        truncated response rather than a complete one.
        """
        if isinstance(response, FileResponse):
            response.block_size = _FILE_BLOCK_SIZE
        try:
            await self.flush()  # headers at once: an EventSource opens before the first event
            if self.request.method == "HEAD":
                pass
            elif getattr(response, "is_async", False):
                await self._cancel_on_disconnect(self._write_async_chunks(response))
            else:
                chunks = iter(response)
                while (chunk := await self.bridge.run_blocking(self.bridge.executor, next, chunks, _END)) is not _END:
                    await self._write_chunk(chunk)
        except tornado.iostream.StreamClosedError:
            pass  # the client left; closing the response below stops the iterator
        except Exception:
            _logger.exception("%s %s: the streaming response failed mid-stream", self.request.method, self.request.uri)
            self.request.connection.stream.close()  # no final chunk: the client sees it truncated
        finally:
            await self.bridge.close_response(response)
        if not self._finishing:
            self.finish()  # the final chunk (nothing, if the client is gone)

    def _stream_events(self, stream: EventStream) -> None:
        """Write a channel's events as the hub hands them over, until the client leaves or the server stops.

        Nothing waits per client, not even a coroutine: the channel's reader
        writes to the connection, whose write buffer is bounded, so a client that
        stops reading is closed rather than left to grow the server's memory.
        """
        self.clear_header("Content-Encoding")  # the events go out as written, whatever GZipMiddleware said
        _forget_the_urls_tried(stream.request)
        self.request.connection.stream.max_write_buffer_size = _EVENT_STREAM_MAX_QUEUED
        self._send_frame(f"retry: {round(stream.retry * 1000)}\n\n".encode())
        self.clear()  # the headers are written: the stream need not keep them (a list per header)
        reader = _Reader(stream.channel, stream.since, self._send_events, self._end_stream)

        def stop() -> None:  # the keepalive timer stops with the request (it is its _expiry)
            reader.cancel()
            self.bridge.spawn(self.bridge.close_response(stream))  # request_finished, in the pool

        self._when_over(stop)
        if self.request.method == "HEAD":
            self._end_stream()
        else:
            reader.start()
            self._expiry = self.loop.call_later(stream.keepalive, self._keep_alive, stream.keepalive)

    def _send_events(self, events: list[_Event]) -> None:
        self._send_frame(b"".join(event.sse_frame() for event in events))

    def _keep_alive(self, every: float) -> None:
        if not self._wrote_lately:
            self._send_frame(b":\n\n")  # a comment: proxies see the stream is alive
        self._wrote_lately = False
        if self._state is _RESPONDING:
            self._expiry = self.loop.call_later(every, self._keep_alive, every)

    def _send_frame(self, frame: bytes) -> None:
        if self._state is not _RESPONDING:
            return
        self._wrote_lately = True
        self.write(frame)
        try:
            self.flush().add_done_callback(_written)
        except tornado.iostream.StreamBufferFullError:
            _logger.warning("%s %s: the client left %d bytes of events unread; closed (it reconnects and catches up)",
                            self.request.method, self.request.uri, _EVENT_STREAM_MAX_QUEUED)
            # The stream, not the HTTP connection: HTTP1Connection.close() (Tornado 6.3-6.6)
            # forgets the write a flush() awaits.
            self.request.connection.stream.close()

    def _end_stream(self) -> None:
        """The server stops: the stream ends with its final chunk, and the browser reconnects (elsewhere)."""
        if self._state is _RESPONDING:
            self.finish()

    async def _write_async_chunks(self, response: HttpResponseBase) -> None:
        async with contextlib.aclosing(aiter(response)) as chunks:
            async for chunk in chunks:
                await self._write_chunk(chunk)

    async def _write_chunk(self, chunk: bytes) -> None:
        if self._state in _OVER:
            raise tornado.iostream.StreamClosedError  # the client is gone: the stream stops
        if chunk:
            self.write(chunk)
            await self.flush()

    async def _cancel_on_disconnect(self, coroutine: Awaitable[Any]) -> Any:
        """Await ``coroutine`` in a task that the client leaving cancels; None if it did."""
        self._task = asyncio.ensure_future(coroutine)
        if self._state in _OVER:  # gone already
            self._task.cancel()
        try:
            await asyncio.wait([self._task])
            return None if self._task.cancelled() else self._task.result()
        finally:
            self._task = None

    # Answering later: the @asynchronous contract.

    def _promise(self, response: HttpResponseBase | None, timeout: float | None) -> HttpResponseBase:
        """What an ``@asynchronous`` view's return value becomes (on the IOLoop): the placeholder for None."""
        if response is not None:
            return response
        self._move_to(_PROMISED)
        return _DeferredResponse(timeout)

    def _take_placeholder(self, placeholder: _DeferredResponse) -> bool:
        """Put the headers middleware set on the placeholder on the late answer; False if it is over already."""
        for name, value in _response_headers(placeholder):
            lower_name = name.lower()
            if lower_name in _PLACEHOLDER_ONLY_HEADERS or lower_name in (self._headers_set_meanwhile or ()):
                continue  # the view's own choice wins
            if name == "Set-Cookie":
                super().add_header(name, value)
            else:
                super().set_header(name, value)
        self._move_to(_DEFERRED)
        waiting, self._waiting_for_django = self._waiting_for_django or (), None
        for operation in waiting:
            operation()
        if self._state is _DEFERRED and self.bridge.stopping:
            self.answer_for_shutdown()
        return self._state is _DEFERRED

    def _answer_later(self, timeout: float | None) -> None:
        """Keep the connection open until the view calls ``finish()``, the client leaves or time runs out.

        Nothing waits for it, not even a coroutine: memory per parked request counts.
        """
        self.bridge.deferred_handlers.add(self)
        if timeout is not None:
            self._expiry = self.loop.call_later(timeout, self._expire, timeout)

    def _expire(self, timeout: float) -> None:
        """End a deferred request whose view did not answer in time with 504."""
        _logger.warning("%s %s: the view did not answer within %s s", self.request.method, self.request.uri, timeout)
        self._expiry = None
        self._move_to(_ABANDONED)
        self._fail(504)

    def async_callback(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., None]:
        """Return a function that runs ``callback(*args, *more_args)`` on the IOLoop.

        The returned function may be called from any thread (plain views run in
        pool threads). If ``callback`` raises, the error is logged and the
        request ends with a 500 (or is cut off if the answer had started). Once
        the request is over (answered, timed out, client gone) the callback is
        dropped.
        """

        def run(*more_args: Any, **more_kwargs: Any) -> None:
            if self._state in _OVER:
                return
            try:
                callback(*args, *more_args, **kwargs, **more_kwargs)
            except Exception:
                _logger.exception("Error in callback for %s %s", self.request.method, self.request.uri)
                if self._state in _DJANGO_RUNNING:  # the 500 waits for middleware, as an answer would
                    self._wait_for_django(lambda: self._fail(500))
                else:
                    self._fail(500)

        @functools.wraps(callback)
        def call_on_loop(*more_args: Any, **more_kwargs: Any) -> None:
            if self._on_loop_thread():
                run(*more_args, **more_kwargs)
            else:
                self.bridge.calls_from_threads.call_soon(self.loop, run, *more_args, **more_kwargs)

        call_on_loop.tornado_handler = self  # Channel.query forgets its callback when this request ends
        return call_on_loop

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the IOLoop if the request ends without the view's answer.

        That is: the client went away, the view's timeout struck, or the server
        is shutting down. Use it to drop a waiter at once. If that has already
        happened (the client left while middleware ran), ``callback`` runs soon.
        """
        if self._state in (_ABANDONED, _GONE):
            self.loop.add_callback(callback)
        elif self._state not in _OVER:
            self._disconnect_callbacks = self._disconnect_callbacks or []
            self._disconnect_callbacks.append(callback)

    def _when_over(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the IOLoop once the request is over, however it ends (from any thread)."""
        if not self._on_loop_thread():
            self.loop.add_callback(self._when_over, callback)
        elif self._state in _OVER:
            callback()
        else:
            self._over_callbacks = self._over_callbacks or []
            self._over_callbacks.append(callback)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._client_left = self._state not in _OVER and not self._headers_sent
        django_running = self._state in _DJANGO_RUNNING
        if self._task is not None:
            self._task.cancel()
        if self._view_tasks is not None:
            self._view_tasks.cancel()
        if self._state in (_IN_DJANGO, _PROMISED, _DEFERRED):
            self._move_to(_ABANDONED)
        self._move_to(_GONE)
        if not django_running:  # (respond() ends one Django was still serving)
            self._end_gone()

    def _end_gone(self) -> None:
        """The client is gone: still log the request and count it over, once, as finish() does."""
        if not self._finishing:
            self.finish()

    def on_finish(self) -> None:
        self._move_to(_ANSWERED)

    def answer_for_shutdown(self) -> None:
        """Answer a parked request because the server stops: 503 and Retry-After, unless
        a disconnect callback answers it first (a long-poll may prefer an empty answer)."""
        self._move_to(_ABANDONED)
        self._fail(503)

    def _fail(self, status_code: int) -> None:
        """End the request with a short error, or cut it off if the answer had started."""
        if self._state in (_PROMISED, _DEFERRED):
            self._move_to(_ABANDONED)  # the view's answer won't come: its waiters may go
        if self._state in _OVER:  # (a disconnect callback may have answered)
            return
        if self._headers_sent:
            self.request.connection.stream.close()  # cut off; on_connection_close ends the request
            return
        if self._state is not _RESPONDING:
            self._move_to(_RESPONDING)
        self.clear()
        self.set_status(status_code)
        if status_code == 503:
            self.set_header("Retry-After", "1")  # the server is stopping: try again (another worker, or after the restart)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {tornado.httputil.responses[status_code]}\n")

    # While Django's middleware still holds the placeholder, a late answer waits for its headers.

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        if self._state in _DJANGO_RUNNING:
            return self._after_django(lambda: self.flush(include_footers))
        self._headers_sent = True
        return super().flush(include_footers)

    def finish(self, chunk: str | bytes | dict | None = None) -> asyncio.Future[None]:
        if self._state is _UPGRADED:  # Tornado finishing the request after get(): the WebSocket has answered
            answered = self.loop.asyncio_loop.create_future()
            answered.set_result(None)
            return answered
        if self._state in _DJANGO_RUNNING:
            if self._finish_waiting is None:  # send_error() may ask twice; finish once
                self._finish_waiting = self._after_django(lambda: self.finish(chunk))
            return self._finish_waiting
        self._finishing = True
        written = super().finish(chunk)
        written.add_done_callback(self._response_written)
        return written

    def _response_written(self, written: asyncio.Future[None]) -> None:
        """Count the request as over once its last byte has left (or the client has)."""
        if not written.cancelled():
            written.exception()  # a client that left is no error here
        self._origin._handler = None  # no cycle between the two outlives the request
        self.bridge.handler_finished(self._origin)

    def set_header(self, name: str, value: Any) -> None:
        self._note_header(name)
        super().set_header(name, value)

    def add_header(self, name: str, value: Any) -> None:
        self._note_header(name)
        super().add_header(name, value)

    def clear_header(self, name: str) -> None:
        self._note_header(name)
        super().clear_header(name)

    def _note_header(self, name: str) -> None:
        """A header the view set while Django still runs wins over the placeholder's."""
        if self._state in _DJANGO_RUNNING:
            self._touched = True
            self._headers_set_meanwhile = self._headers_set_meanwhile or set()
            self._headers_set_meanwhile.add(name.lower())

    def write(self, chunk: str | bytes | dict) -> None:
        if self._state in _DJANGO_RUNNING:
            self._touched = True
        super().write(chunk)

    def _after_django(self, operation: Callable[[], asyncio.Future[None]]) -> asyncio.Future[None]:
        result = self.loop.asyncio_loop.create_future()

        def run() -> None:
            try:
                tornado.concurrent.chain_future(operation(), result)
            except Exception as error:  # noqa: BLE001 (handed to whoever awaits the result)
                result.set_exception(error)

        self._wait_for_django(run)
        return result

    def _wait_for_django(self, operation: Callable[[], Any]) -> None:
        self._touched = True
        self._waiting_for_django = self._waiting_for_django or []
        self._waiting_for_django.append(operation)


# -- The asynchronous decorator ------------------------------------------------


def asynchronous(view: Callable[..., Any] | None = None, *, timeout: float | None = None) -> Any:
    """Give a view the Tornado handler as an extra argument, and let it answer later.

    ``@asynchronous`` (or ``@asynchronous(timeout=60)``) decorates
    ``def view(request, handler, *args, **kwargs)`` or its ``async def``
    twin. Django's middleware runs as usual; the view body runs on the IOLoop.
    A returned value is the response. Returning ``None`` means the view answers
    later with ``handler.finish(...)`` (a dict becomes JSON); the headers
    middleware set (cookies, Vary, security headers) go out with that answer.
    With ``timeout`` (seconds) an unanswered request ends with 504.
    """
    if view is None:
        return functools.partial(asynchronous, timeout=timeout)

    if iscoroutinefunction(view):

        @functools.wraps(view)
        async def deferring_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            handler = _origin_of(request, view).handler()  # on the IOLoop
            return handler._promise(await view(request, handler, *args, **kwargs), timeout)

    else:

        @functools.wraps(view)
        def deferring_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            origin = _origin_of(request, view)

            def run() -> HttpResponseBase:
                handler = origin.handler()
                return handler._promise(view(request, handler, *args, **kwargs), timeout)

            return origin.call_on_loop_and_wait(run)

    deferring_view.tornado_asynchronous = True
    return deferring_view


def _origin_of(request: HttpRequest, view: Callable[..., Any]) -> _DjangoRequest:
    try:
        return request.META[_HANDLER_ENVIRON_KEY]
    except KeyError:
        raise RuntimeError(
            f"The view {view.__module__}.{view.__qualname__} is @asynchronous and needs the Tornado "
            "handler: serve it with django_tornado (make_app, serve or runtornado)."
        ) from None


# -- Live updates: channels of events, and the streams that read them ---------------
# A Channel is a handle: its events live in a backend (this process's memory, or
# Redis with TORNADO_CHANNELS_URL), and its readers (long-polls, event streams,
# listen()) in a hub, one per IOLoop, that follows each channel they read.

_CHANNEL_NAME = re.compile(r"[A-Za-z0-9._:-]{1,200}")
_EVENT_NAME = re.compile(r"[^\r\n]{1,200}")  # one line: it becomes SSE's "event:" field
_EVENT_ID = re.compile(r"[0-9]{1,19}")  # fits in 64 bits
_RESET = "reset"  # the event readers get first when events after their ``since`` are gone
_WATCH_LINGER = 30.0  # seconds a hub keeps following a channel nobody reads (its long-polls come back)
_SWEEP_EVERY = 10.0  # seconds between looks for memory channels past their retention
_EVENT_STREAM_MAX_QUEUED = 1024 * 1024  # bytes an event stream may leave waiting for a reader who doesn't read
_REDIS_TIMEOUT = 2.0  # seconds a Redis command may take before its caller hears that it failed
_REDIS_PING_EVERY = 10.0  # a quiet subscription is pinged, so that a dead connection is noticed
_REDIS_RETRY_EVERY = 1.0  # seconds between attempts to reach a Redis that is down
_REDIS_PREFIX = "django_tornado:"

_thread_state = threading.local()  # ``loop``: the IOLoop whose requests a pool thread runs


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ChannelUnavailable(ConnectionError):
    """The channels' backend (Redis) can't be reached; raised in the caller of ``publish``, ``since`` and ``size``."""


class _Event(dict):
    """One event, ``{"id": int, "data": ...}`` plus ``"event"`` when it has a name.

    Every reader of an event gets this same mapping, so it is never changed once
    made; what the transports send of it is encoded once, the first time.
    """

    __slots__ = ("_data_json", "_frame", "_json", "_websocket_frame")

    def __init__(self, event_id: int, data: Any, name: str | None, data_json: str | None = None) -> None:
        super().__init__(id=event_id, data=data)
        if name is not None:
            self["event"] = name
        self._data_json = data_json
        self._frame: bytes | None = None
        self._json: str | None = None
        self._websocket_frame: bytes | None = None

    def json_text(self) -> str:
        """The event as JSON (what a WebSocket sends)."""
        if self._json is None:
            self._json = _json_text(self)
        return self._json

    def websocket_frame(self) -> bytes:
        """The event as one WebSocket text frame: a server's frames are unmasked, so the same bytes for every socket."""
        if self._websocket_frame is None:
            self._websocket_frame = _websocket_frame(self.json_text().encode(), binary=False)
        return self._websocket_frame

    def sse_frame(self) -> bytes:
        """The event as Server-Sent Events fields (``id:``, ``event:``, ``data:``)."""
        if self._frame is None:
            if self._data_json is None:
                self._data_json = _json_text(self["data"])
            name = f"event: {self['event']}\n" if "event" in self else ""
            self._frame = f"id: {self['id']}\n{name}data: {self._data_json}\n\n".encode()
        return self._frame


def _json_text(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def _encode_event_data(data: Any) -> str:
    try:
        return _json_text(data)
    except TypeError as error:
        raise TypeError(f"an event's data must be JSON-encodable: {error}") from None
    except ValueError as error:  # NaN and infinities: Python writes them, JSON parsers refuse them
        raise TypeError(f"an event's data must be JSON-encodable: {error}") from None


def _check_event_name(name: str | None) -> str | None:
    if name is not None and not (isinstance(name, str) and _EVENT_NAME.fullmatch(name)):
        raise ValueError(f"an event name is 1-200 characters on one line, not {name!r}")
    return name


def _check_event_id(event_id: Any, what: str = "since") -> int:
    if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 0:
        raise ValueError(f"{what} must be an event id (an int, 0 or more), not {event_id!r}")
    return event_id


def _parse_event_id(text: str, what: str) -> int:
    if not _EVENT_ID.fullmatch(text):
        raise ValueError(f"{what} must be an event id (digits only), not {text[:40]!r}")
    return int(text)


class Channel:
    """A named stream of events: publish from any code; read with long-polls, ``EventStream`` or ``listen()``.

    Channels of one name are one channel in every process that shares the
    backend (``settings.TORNADO_CHANNELS_URL``: this process's memory by
    default, or Redis). Each event gets an ``id``: an int from the millisecond
    clock, bumped on ties, so that ids strictly increase and a client that
    only knows the time can ask for what came after it. The last ``backlog``
    events are kept for readers that catch up; a channel with no reader and no
    event for ``retention`` seconds is forgotten. Creating one costs nothing.
    """

    def __init__(self, name: str, *, backlog: int = 1000, retention: float = 86400) -> None:
        if not isinstance(name, str) or not _CHANNEL_NAME.fullmatch(name):
            raise ValueError(f"a channel name is 1-200 letters, digits and '._:-', not {name!r}")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be a number of events, 1 or more, not {backlog!r}")
        if not (isinstance(retention, (int, float)) and 0 < retention < math.inf):
            raise ValueError(f"retention must be a number of seconds, more than 0, not {retention!r}")
        self.name = name
        self.backlog = backlog
        self.retention = retention

    def __repr__(self) -> str:
        return f"Channel({self.name!r})"

    def publish(self, data: Any, *, event: str | None = None) -> int:
        """Add an event with ``data`` (and the name ``event``) and wake the channel's readers; return its id.

        Safe from any thread and from the IOLoop. ``data`` is anything ``json``
        encodes (TypeError otherwise). In memory this never waits; with Redis it
        waits for one round trip, and raises ChannelUnavailable if Redis can't
        be reached.
        """
        data_json = _encode_event_data(data)
        return _channel_backend().publish(self, data_json, _check_event_name(event))

    def since(self, last_id: int) -> list[dict[str, Any]]:
        """Return the events in the backlog after ``last_id``, oldest first."""
        return _channel_backend().since(self.name, _check_event_id(last_id, "last_id"))

    def size(self) -> int:
        """Return the number of events in the backlog."""
        return _channel_backend().size(self.name)

    def query(self, callback: Callable[[list[dict[str, Any]]], Any], since: int) -> Callable[[], None]:
        """Call ``callback(events)`` once, on the IOLoop, with the events after ``since``.

        That is at once if there are some, else at the next publish (or with no
        events when the server stops). Return a function that cancels the query,
        for a client that leaves; a callback made by ``handler.async_callback``
        is cancelled by itself when its request ends.
        """
        since = _check_event_id(since)

        def answer(events: list[_Event]) -> None:
            reader.cancel()
            callback(events)

        reader = _Reader(self, since, answer, lambda: answer([]), catch_up=False)
        reader.start()
        handler = getattr(callback, "tornado_handler", None)
        if handler is not None:
            handler._when_over(reader.cancel)
        return reader.cancel

    def listen(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Iterate, in a coroutine, over the events after ``since`` (None: from now) as they come.

        Holds no thread. If events after ``since`` are no longer in the backlog
        (or the loop falls ``backlog`` events behind), an event named "reset"
        comes first. The iteration ends when the server stops.
        """
        return self._listen(None if since is None else _check_event_id(since))

    async def _listen(self, since: int | None) -> AsyncIterator[dict[str, Any]]:
        inbox = _EventInbox(self.backlog)
        reader = _Reader(self, since, inbox.put, inbox.end)
        reader.start()
        try:
            while (events := await inbox.take()) is not None:
                for event in events:
                    yield event
        finally:
            reader.cancel()


def _reset_event(floor: int) -> _Event:
    return _Event(floor, None, _RESET)


class _Reader:
    """One reader of one channel, on one IOLoop: it gets each event after its cursor once, in order.

    ``deliver(events)`` and ``end()`` (the server stops) run on the IOLoop. A
    reader with ``catch_up`` is told, with a "reset" event, when events after
    its ``since`` are gone from the backlog.
    """

    __slots__ = ("cancelled", "catch_up", "channel", "cursor", "deliver", "end", "fresh", "hub")

    def __init__(self, channel: Channel, since: int | None, deliver: Callable[[list[_Event]], Any], end: Callable[[], Any], *, catch_up: bool = True) -> None:
        self.channel = channel
        self.cursor = since  # the id of the last event it has had; None ("from now") until the hub has it
        self.fresh = True  # not yet checked against the backlog
        self.deliver = deliver
        self.end = end
        self.catch_up = catch_up
        self.hub: _Hub | None = None
        self.cancelled = False

    def start(self) -> None:
        """Start reading, from any thread (a pool thread of a django_tornado server too)."""
        self.hub = _channel_backend().hub(_readers_loop())
        self.hub.call(self.hub.add, self)

    def cancel(self) -> None:
        """Stop reading, from any thread; nothing is delivered afterwards."""
        if not self.cancelled:
            self.cancelled = True
            if self.hub is not None:
                self.hub.call(self.hub.remove, self)


def _readers_loop() -> asyncio.AbstractEventLoop:
    """The event loop readers started here live on: the running one, or a pool thread's server's."""
    loop = asyncio.events._get_running_loop() or getattr(_thread_state, "loop", None)
    if loop is None:
        raise RuntimeError("reading a Channel needs an IOLoop: do it on the IOLoop, or in a view served by django_tornado")
    return loop


class _EventInbox:
    """Events waiting for a ``listen()`` loop; past ``limit`` the oldest go and a "reset" takes their place."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: list[_Event] = []
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def put(self, events: list[_Event]) -> None:
        self.events.extend(events)
        if len(self.events) > self.limit:
            dropped = self.events[-self.limit - 1]["id"]
            self.events = [_reset_event(dropped), *self.events[-self.limit :]]
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[_Event] | None:
        """The events that came since the last call (waiting for some), or None once it has ended."""
        while not self.events:
            if self.ended:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        events, self.events = self.events, []
        return events


class _Watch:
    """A hub's view of one channel: its readers there, and the id of the last event the hub has seen."""

    __slots__ = ("cursor", "linger", "name", "pump", "readers", "stale")

    def __init__(self, name: str) -> None:
        self.name = name
        self.readers: set[_Reader] = set()
        self.cursor: int | None = None  # None until the backend has been asked
        self.stale = False  # the backlog must be read: a reader catches up, or an event was missed
        self.pump: asyncio.Task[None] | None = None
        self.linger: asyncio.TimerHandle | None = None


class _Hub:
    """The readers of every channel on one IOLoop; the backend wakes it when a channel gets an event.

    An event goes straight to the readers when it follows the last one the hub
    saw; otherwise (a reader catching up, a missed wake-up, a reconnection to
    Redis) the hub reads the backlog after the lowest cursor and hands each
    reader what it lacks. Everything but ``call`` runs on the hub's loop.
    """

    def __init__(self, backend: _MemoryBackend | _RedisBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self.watches: dict[str, _Watch] = {}
        self.stopping = False
        self.tasks: set[asyncio.Task[Any]] = set()  # running, referenced so that none vanishes

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the hub's loop: now if this is its thread, else soon."""
        if asyncio.events._get_running_loop() is self.loop:
            function(*args)
        else:
            self.loop.call_soon_threadsafe(function, *args)

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def add(self, reader: _Reader) -> None:
        if reader.cancelled:
            return
        if self.stopping:
            reader.end()
            return
        watch = self.watches.get(reader.channel.name)
        if watch is None:
            watch = self.watches[reader.channel.name] = _Watch(reader.channel.name)
            self.backend.watch(self, watch.name)
        elif watch.linger is not None:
            watch.linger.cancel()
            watch.linger = None
        watch.readers.add(reader)
        if reader.cursor is None:  # "from now": after the last event there is at this moment
            reader.cursor = watch.cursor if watch.cursor is not None else self.backend.last_id(watch.name)
            reader.catch_up = False
        if watch.cursor is not None and reader.cursor >= watch.cursor:
            reader.fresh = False  # in step with the hub
        else:
            self.wake(watch.name)

    def remove(self, reader: _Reader) -> None:
        watch = self.watches.get(reader.channel.name)
        if watch is None or reader not in watch.readers:
            return
        watch.readers.discard(reader)
        if not watch.readers and watch.linger is None:
            watch.linger = self.loop.call_later(_WATCH_LINGER, self._forget, watch)

    def _forget(self, watch: _Watch) -> None:
        watch.linger = None
        if not watch.readers and self.watches.get(watch.name) is watch:
            del self.watches[watch.name]
            self.backend.unwatch(self, watch.name)

    def published(self, name: str, previous_id: int, event: _Event) -> None:
        """The backend says: ``event`` was published to ``name`` after the event ``previous_id``."""
        watch = self.watches.get(name)
        if watch is None or (watch.cursor is not None and event["id"] <= watch.cursor):
            return  # not read here, or already read from the backlog
        if watch.cursor == previous_id and not watch.stale and watch.pump is None:
            self._deliver(watch, [event], previous_id, event["id"], None)
        else:
            self.wake(name)

    def wake(self, name: str) -> None:
        """Have the backlog of ``name`` read, and each of its readers given what it lacks."""
        watch = self.watches.get(name)
        if watch is None:
            return
        watch.stale = True
        if watch.pump is None:
            watch.pump = self.spawn(self._pump(watch))

    def wake_all(self) -> None:
        for name in list(self.watches):
            self.wake(name)

    async def _pump(self, watch: _Watch) -> None:
        try:
            while watch.stale and not self.stopping:
                watch.stale = False
                cursors = [reader.cursor for reader in watch.readers if reader.fresh]
                if watch.cursor is not None:
                    cursors.append(watch.cursor)
                if not cursors:
                    continue  # its readers have gone
                after = min(cursors)
                events, last_id, floor = await self.backend.read(watch.name, after)
                self._deliver(watch, events, after, last_id, floor)
        except ChannelUnavailable:
            watch.stale = True  # read again when Redis is back (the subscription's return wakes every channel)
            self.loop.call_later(_REDIS_RETRY_EVERY, self.wake, watch.name)
        finally:
            watch.pump = None

    def _deliver(self, watch: _Watch, events: list[_Event], after: int, last_id: int, floor: int | None) -> None:
        """Give each reader of ``watch`` the ``events`` (those after ``after``) newer than its cursor.

        A fresh reader is told first, with a "reset" event, if events after its
        cursor are gone (``floor``: the last id known lost). One whose cursor is
        below ``after`` came while the backlog was being read: the next reading
        covers it.
        """
        watch.cursor = last_id if watch.cursor is None else max(watch.cursor, last_id)
        ids = [event["id"] for event in events]
        for reader in list(watch.readers):
            if reader.cursor < after or reader.cancelled:
                continue
            new = events[bisect.bisect_right(ids, reader.cursor) :]
            if reader.fresh and floor is not None:
                reader.fresh = False
                if reader.catch_up and floor > reader.cursor:
                    new = [_reset_event(floor), *new]
            if new:
                reader.cursor = max(reader.cursor, new[-1]["id"])
                try:
                    reader.deliver(new)
                except Exception:
                    _logger.exception("Error delivering events of %r", reader.channel)

    def shutdown(self) -> None:
        """The server stops: every reader ends (a query is answered with no events), and new ones end at once."""
        self.stopping = True
        for watch in self.watches.values():
            for reader in list(watch.readers):
                watch.readers.discard(reader)
                try:
                    reader.end()
                except Exception:
                    _logger.exception("Error ending a reader of %r", reader.channel)


class _Backends:
    """What every backend shares: its hubs, one per event loop."""

    def __init__(self) -> None:
        self.hubs: dict[asyncio.AbstractEventLoop, _Hub] = {}
        self._hubs_lock = threading.Lock()

    def hub(self, loop: asyncio.AbstractEventLoop) -> _Hub:
        hub = self.hubs.get(loop)
        if hub is None:
            with self._hubs_lock:
                hub = self.hubs.setdefault(loop, _Hub(self, loop))
        return hub


class _MemoryChannel:
    __slots__ = ("events", "floor", "hubs", "ids", "last_id", "retention", "touched")

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.ids: list[int] = []
        self.last_id = 0
        self.floor = _now_ms() - 1  # what came before this process kept the channel is not known
        self.hubs: set[_Hub] = set()
        self.retention = 0.0
        self.touched = time.monotonic()


class _MemoryBackend(_Backends):
    """Channels in this process's memory: one process, however many ports (the default)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.channels: dict[str, _MemoryChannel] = {}
        self.next_sweep = time.monotonic() + _SWEEP_EVERY

    def _channel(self, name: str) -> _MemoryChannel:
        """The channel ``name``, made if need be; under the lock."""
        state = self.channels.get(name)
        if state is None:
            state = self.channels[name] = _MemoryChannel()
        return state

    def publish(self, channel: Channel, data_json: str, name: str | None) -> int:
        event_data = json.loads(data_json)  # a copy: what the caller changes later is not changed here
        with self.lock:
            state = self._channel(channel.name)
            previous_id = state.last_id
            event = _Event(max(_now_ms(), previous_id + 1), event_data, name, data_json)
            state.events.append(event)
            state.ids.append(event["id"])
            if len(state.events) > channel.backlog:
                state.floor = max(state.floor, state.ids[-channel.backlog - 1])
                del state.events[: -channel.backlog], state.ids[: -channel.backlog]
            state.last_id = event["id"]
            state.retention, state.touched = channel.retention, time.monotonic()
            hubs = list(state.hubs)
            self._sweep()
        for hub in hubs:
            hub.call(hub.published, channel.name, previous_id, event)
        return event["id"]

    def since(self, name: str, last_id: int) -> list[dict[str, Any]]:
        with self.lock:
            state = self.channels.get(name)
            return [] if state is None else state.events[bisect.bisect_right(state.ids, last_id) :]

    def size(self, name: str) -> int:
        with self.lock:
            state = self.channels.get(name)
            return 0 if state is None else len(state.events)

    def last_id(self, name: str) -> int:
        """The id of the channel's last event, after which a reader "from now" starts."""
        with self.lock:
            state = self.channels.get(name)
            return 0 if state is None else state.last_id

    async def read(self, name: str, after: int) -> tuple[list[_Event], int, int]:
        """The events after ``after``, the channel's last id, and its floor (the last id known to be lost)."""
        with self.lock:
            state = self._channel(name)
            return state.events[bisect.bisect_right(state.ids, after) :], state.last_id, state.floor

    def watch(self, hub: _Hub, name: str) -> None:
        with self.lock:
            self._channel(name).hubs.add(hub)

    def unwatch(self, hub: _Hub, name: str) -> None:
        with self.lock:
            state = self.channels.get(name)
            if state is not None:
                state.hubs.discard(hub)
                state.touched = time.monotonic()
            self._sweep()

    def _sweep(self) -> None:
        """Forget the channels nobody has read or published to for their retention; under the lock."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + _SWEEP_EVERY
        clock = _now_ms()
        for name in [
            name
            for name, state in self.channels.items()
            # An id must never come back: wait for the clock to pass the last one.
            if not state.hubs and now - state.touched > state.retention and state.last_id < clock
        ]:
            del self.channels[name]


class _RedisBackend(_Backends):
    """Channels in Redis, shared by every process (and machine) that uses the same Redis.

    The backlog in Redis is the truth: a Lua script stamps, stores, trims and
    announces each event in one step. Each process holds one subscription (per
    IOLoop) for all the channels its readers follow; an announcement carries
    the event and the id before it, so a process that missed one notices at the
    next and reads the backlog. Publishing uses a blocking client, so that it
    works in any thread and in processes with no IOLoop at all.
    """

    PUBLISH = """
        local time = redis.call('TIME')
        local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
        local meta = redis.call('HMGET', KEYS[2], 'last', 'floor')
        local previous, floor = tonumber(meta[1]), tonumber(meta[2])
        if not previous then  -- a new channel, or one Redis forgot: what came before is not known
            previous, floor = 0, now - 1
        end
        local id = math.max(now, previous + 1)
        local member = '{"id":' .. string.format('%d', id) .. ',"data":' .. ARGV[1]
        if ARGV[2] ~= '' then member = member .. ',"event":' .. cjson.encode(ARGV[2]) end
        member = member .. '}'
        redis.call('ZADD', KEYS[1], id, member)
        local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
        if excess > 0 then
            local dropped = redis.call('ZRANGE', KEYS[1], excess - 1, excess - 1, 'WITHSCORES')
            floor = math.max(floor, tonumber(dropped[2]))
            redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
        end
        redis.call('HSET', KEYS[2], 'last', string.format('%d', id), 'floor', string.format('%d', floor))
        -- Kept for the retention, and until the clock has passed the last id, which must never come back.
        local ttl = tonumber(ARGV[4]) + math.max(0, math.ceil((id - now) / 1000))
        redis.call('EXPIRE', KEYS[1], ttl)
        redis.call('EXPIRE', KEYS[2], ttl)
        redis.call('PUBLISH', ARGV[5], string.format('%d', previous) .. ' ' .. member)
        return id
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import redis
            import redis.asyncio
            import redis.asyncio.retry
            import redis.backoff
            import redis.retry
        except ImportError:
            raise ImproperlyConfigured(
                "TORNADO_CHANNELS_URL names Redis, which needs redis-py: pip install 'django-on-tornado[redis]'"
            ) from None
        self.redis = redis
        self.url = url
        self.shown_url = re.sub(r"//[^@/]*@", "//", url)  # without a password
        options = {"socket_timeout": _REDIS_TIMEOUT, "socket_connect_timeout": _REDIS_TIMEOUT, "decode_responses": True}
        # One retry: a connection Redis closed (a restart) is replaced at once; a Redis that is down fails fast.
        try:
            self.client = redis.Redis.from_url(url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1), **options)
        except ValueError as error:
            raise ImproperlyConfigured(f"TORNADO_CHANNELS_URL: {error}") from None
        self.async_options = {**options, "retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1)}
        self.publish_script = self.client.register_script(self.PUBLISH)
        self.reachable = True
        self.retry_at = 0.0  # while Redis is down, the IOLoop does not wait for it again before this (monotonic)
        self.state_lock = threading.Lock()
        self.async_clients: dict[asyncio.AbstractEventLoop, Any] = {}  # redis.asyncio clients, one per loop
        self.subscriptions: dict[_Hub, asyncio.Task[None]] = {}  # each hub's subscription loop
        self.pubsubs: dict[_Hub, Any] = {}  # and its connection, while subscribed

    @staticmethod
    def key(name: str) -> str:
        return f"{_REDIS_PREFIX}{{{name}}}"  # the braces keep a channel's keys in one Redis Cluster slot

    def _call(self, what: str, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking Redis command; ChannelUnavailable if Redis can't be reached."""
        on_loop = asyncio.events._get_running_loop() is not None
        if on_loop and not self.reachable and time.monotonic() < self.retry_at:
            raise ChannelUnavailable(f"can't {what} {name!r}: Redis at {self.shown_url} is unreachable")
        try:
            result = function(*args, **kwargs)
        except (self.redis.ConnectionError, self.redis.TimeoutError, OSError) as error:
            self.lost(error)
            raise ChannelUnavailable(f"can't {what} {name!r}: Redis at {self.shown_url} is unreachable ({error})") from None
        self.found()
        return result

    def lost(self, error: BaseException) -> None:
        """Note an outage: one log line for it, however many callers fail."""
        with self.state_lock:
            self.retry_at = time.monotonic() + _REDIS_RETRY_EVERY
            if not self.reachable:
                return
            self.reachable = False
        _logger.warning("Redis at %s is unreachable (%s): publishing fails, readers wait for it", self.shown_url, error)

    def found(self) -> None:
        if self.reachable:
            return
        with self.state_lock:
            if self.reachable:
                return
            self.reachable = True
        _logger.warning("Redis at %s is reachable again", self.shown_url)

    def publish(self, channel: Channel, data_json: str, name: str | None) -> int:
        key = self.key(channel.name)
        return int(self._call(
            "publish to", channel.name, self.publish_script,
            keys=[f"{key}:events", f"{key}:meta"],
            args=[data_json, name or "", channel.backlog, math.ceil(channel.retention), key],
        ))

    def since(self, name: str, last_id: int) -> list[dict[str, Any]]:
        members = self._call("read", name, self.client.zrangebyscore, f"{self.key(name)}:events", f"({last_id}", "+inf")
        return [_event_from_json(member) for member in members]

    def size(self, name: str) -> int:
        return self._call("read", name, self.client.zcard, f"{self.key(name)}:events")

    def _async_client(self, loop: asyncio.AbstractEventLoop) -> Any:
        client = self.async_clients.get(loop)
        if client is None:
            client = self.async_clients[loop] = self.redis.asyncio.Redis.from_url(self.url, **self.async_options)
        return client

    def last_id(self, name: str) -> int:
        """Where a reader "from now" starts: the clock, since the IOLoop must not wait for Redis."""
        return _now_ms() - 1

    async def read(self, name: str, after: int) -> tuple[list[_Event], int, int]:
        key = self.key(name)
        try:
            async with self._async_client(asyncio.get_running_loop()).pipeline(transaction=True) as pipeline:
                pipeline.zrangebyscore(f"{key}:events", f"({after}", "+inf")
                pipeline.hmget(f"{key}:meta", "last", "floor")
                members, (last_id, floor) = await pipeline.execute()
        except (self.redis.ConnectionError, self.redis.TimeoutError, OSError) as error:
            self.lost(error)
            raise ChannelUnavailable(f"can't read {name!r}: Redis at {self.shown_url} is unreachable ({error})") from None
        self.found()
        if last_id is None:  # no such channel (yet, or any more): nothing before now is known
            return [], 0, _now_ms() - 1
        return [_event_from_json(member) for member in members], int(last_id), int(floor)

    def watch(self, hub: _Hub, name: str) -> None:
        subscription = self.subscriptions.get(hub)
        if subscription is None or subscription.done():
            self.subscriptions[hub] = hub.spawn(self._subscribe(hub))
        elif hub in self.pubsubs:
            hub.spawn(self._command(self.pubsubs[hub].subscribe, self.key(name)))

    def unwatch(self, hub: _Hub, name: str) -> None:
        if hub in self.pubsubs:
            hub.spawn(self._command(self.pubsubs[hub].unsubscribe, self.key(name)))

    async def _command(self, command: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with contextlib.suppress(self.redis.RedisError, OSError):  # the subscription's loop sees the connection fail
            await command(*args)

    async def _subscribe(self, hub: _Hub) -> None:
        """Hold this hub's one subscription while it follows channels, reconnecting after a failure.

        Each channel's subscription, once confirmed, has its backlog read, so
        that nothing published before the subscription took effect is missed.
        """
        client = self._async_client(hub.loop)
        while hub.watches and not hub.stopping:
            pubsub = client.pubsub()
            try:
                names = list(hub.watches)
                await pubsub.subscribe(*(self.key(name) for name in names))
                # Channels followed or forgotten meanwhile (watch() waits while connecting):
                self.pubsubs[hub] = pubsub
                if missing := set(hub.watches) - set(names):
                    await pubsub.subscribe(*(self.key(name) for name in missing))
                if extra := set(names) - set(hub.watches):
                    await pubsub.unsubscribe(*(self.key(name) for name in extra))
                pinged = False
                while hub.watches and not hub.stopping:
                    message = await pubsub.get_message(timeout=_REDIS_PING_EVERY)
                    if message is None:
                        if pinged:
                            raise self.redis.ConnectionError(f"no answer to a ping in {_REDIS_PING_EVERY} s")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False
                    self.found()
                    self._received(hub, message)
            except (self.redis.ConnectionError, self.redis.TimeoutError, OSError) as error:
                self.lost(error)
                await asyncio.sleep(_REDIS_RETRY_EVERY)
            finally:
                self.pubsubs.pop(hub, None)
                with contextlib.suppress(Exception):
                    # aclose() is redis-py 5.0.1's name for reset(); reset() alone is in 5.0.0.
                    await (getattr(pubsub, "aclose", None) or pubsub.reset)()

    def _received(self, hub: _Hub, message: dict[str, Any]) -> None:
        kind, key = message["type"], message.get("channel") or ""
        name = key[len(_REDIS_PREFIX) + 1 : -1]  # "django_tornado:{name}"
        if kind == "subscribe":
            hub.wake(name)
        elif kind == "message":
            previous_id, _, member = message["data"].partition(" ")
            hub.published(name, int(previous_id), _event_from_json(member))


def _event_from_json(member: str) -> _Event:
    event = json.loads(member)
    return _Event(event["id"], event["data"], event.get("event"))


_backends: dict[str, _MemoryBackend | _RedisBackend] = {}
_backends_lock = threading.Lock()


def _channel_backend() -> _MemoryBackend | _RedisBackend:
    """The backend ``settings.TORNADO_CHANNELS_URL`` names, made the first time it is used."""
    url = getattr(settings, "TORNADO_CHANNELS_URL", None) or "memory://"
    backend = _backends.get(url)
    if backend is None:
        with _backends_lock:
            backend = _backends.get(url)
            if backend is None:
                if url == "memory://":
                    backend = _MemoryBackend()
                elif url.startswith(("redis://", "rediss://", "unix://")):
                    backend = _RedisBackend(url)
                else:
                    raise ImproperlyConfigured(f"TORNADO_CHANNELS_URL must be memory:// or a redis:// URL, not {url!r}")
                _backends[url] = backend
    return backend


def _stop_channel_readers(loop: asyncio.AbstractEventLoop) -> None:
    """End every channel reader on ``loop``: the server is stopping."""
    for backend in list(_backends.values()):
        hub = backend.hubs.get(loop)
        if hub is not None:
            hub.shutdown()


class EventStream(StreamingHttpResponse):
    """A Server-Sent Events response streaming a channel's events: ``return EventStream(channel, request)``.

    Per event it sends ``id:`` (the event's id), ``event:`` (its name, if it has
    one) and ``data:`` (its data as JSON). It starts after the ``Last-Event-ID``
    header (an ``EventSource`` that reconnects) or ``?since=``, replaying what
    the client missed from the backlog; when events after that id are gone from
    the backlog, an event named "reset" comes first, so that the page knows to
    reload its state. A comment line every ``keepalive`` seconds keeps proxies
    from timing the stream out; ``retry`` (seconds) is the browser's delay
    before it reconnects. The server writes the events as they come, holding no
    thread, and closes a client that leaves 1 MiB unread (which reconnects and
    loses nothing). A bad id gets 400; a server other than django_tornado, 501.
    """

    def __new__(cls, channel: Channel, request: HttpRequest, *, keepalive: float = 15.0, retry: float = 2.0) -> HttpResponseBase:
        # Bad requests get a plain answer instead of a stream, which only __new__ can give.
        if _HANDLER_ENVIRON_KEY not in request.META:
            return _plain_response(501, "an EventStream needs django_tornado (runtornado, serve or make_app) to serve it")
        # From META: request.headers and request.GET would be copies, kept as long as the stream.
        last_event_id, query = request.META.get("HTTP_LAST_EVENT_ID"), request.META.get("QUERY_STRING", "")
        since = QueryDict(query).get("since") if "since" in query else None
        try:
            if last_event_id:  # what the browser saw last wins over the URL it first opened
                since = _parse_event_id(last_event_id, "Last-Event-ID")
            elif since is not None:
                since = _parse_event_id(since, "since")
        except ValueError as error:
            return _plain_response(400, str(error))
        stream = super().__new__(cls)
        stream.since, stream.request = since, request
        return stream

    def __init__(self, channel: Channel, request: HttpRequest, *, keepalive: float = 15.0, retry: float = 2.0) -> None:
        if not (0 < keepalive < math.inf and 0 <= retry < math.inf):
            raise ValueError(f"keepalive must be more than 0 seconds and retry 0 or more, not {keepalive!r} and {retry!r}")
        # The events never pass through streaming_content: the server writes them (DjangoHandler._stream_events).
        super().__init__((), content_type="text/event-stream")
        self.channel, self.keepalive, self.retry = channel, keepalive, retry
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once


def _plain_response(status: int, detail: str) -> HttpResponse:
    return HttpResponse(f"{status} {tornado.httputil.responses[status]}: {detail}\n", status=status, content_type="text/plain; charset=utf-8")


# -- Live updates: WebSocket endpoints that are Django views ------------------------
# The handshake is an ordinary request through Django (middleware, decorators,
# the view); the view answers with an upgrade, and then Tornado's own WebSocket
# protocol has the connection, speaking for the endpoint the view made.

_LOGOUTS = "django_tornado.logouts"  # a channel: hashes of the sessions logged out, for every process's sockets
_LOGGED_OUT = 4401  # the close code for a socket whose session logged out (4000-4999: the application's)


class WebSocket:
    """A WebSocket endpoint that is a Django view: ``path("ws/", login_required(Feed.as_view()))``.

    The handshake is an ordinary request: the project's middleware and the
    view's decorators run in the pool, and if they answer (a redirect to the
    login page, 403, 404) that is the answer and no socket opens. Otherwise the
    connection is upgraded and ``open(**kwargs)`` runs with the URL's kwargs;
    ``self.request`` is the handshake's HttpRequest, with ``user``, ``session``
    and whatever middleware set.

    Plain methods (``open``, ``on_message``, ``on_close``) run in the thread
    pool, one at a time and in order for each socket, so they may use the ORM;
    ``async def`` ones run on the IOLoop and must not block. ``on_event``
    always runs on the IOLoop. ``send`` and ``close`` are safe from any thread.
    Options are class attributes, or keywords of ``as_view()``.
    """

    max_message_size = 1024 * 1024  # a larger message (fragmented or not) closes the socket with 1009
    ping_interval = 20.0  # seconds between pings
    ping_timeout = 20.0  # seconds a pong may take (uvicorn's; Tornado 6.5+ refuses one above the interval)
    max_queued_bytes = 1024 * 1024  # output waiting for a client that doesn't read: past it, closed with 1008
    allowed_origins: Collection[str] | None = None  # None: this site's origins; or a list ("*": any origin)
    compression = False  # permessage-deflate

    request: HttpRequest

    @classmethod
    def as_view(cls, **options: Any) -> Callable[..., HttpResponseBase]:
        """Return the view that answers the handshake; ``options`` override the class's attributes."""
        for name in options:
            if name.startswith("_") or not hasattr(cls, name) or callable(getattr(cls, name)):
                raise TypeError(f"{cls.__qualname__}.as_view() got {name!r}, which is not an option of {cls.__qualname__}")
        _announce_logouts()

        def view(request: HttpRequest, **kwargs: Any) -> HttpResponseBase:
            return cls._handshake(request, options, kwargs)

        view.view_class = cls
        view.__name__, view.__qualname__, view.__module__, view.__doc__ = cls.__name__, cls.__qualname__, cls.__module__, cls.__doc__
        return view

    @classmethod
    def _handshake(cls, request: HttpRequest, options: dict[str, Any], url_kwargs: dict[str, Any]) -> HttpResponseBase:
        """Answer a handshake that middleware and decorators let through: an upgrade, or why not (RFC 6455 4.2)."""
        name = f"{cls.__module__}.{cls.__qualname__}"
        if _HANDLER_ENVIRON_KEY not in request.META:
            return _plain_response(501, f"the WebSocket {name} needs django_tornado (runtornado, serve or make_app) to serve it")
        # META, not request.headers: the request lives as long as the socket, and headers would be a copy.
        meta = request.META
        if meta.get("HTTP_UPGRADE", "").lower() != "websocket":
            refusal = _plain_response(426, f"{request.path} is a WebSocket endpoint: open it with a WebSocket client")
            refusal["Upgrade"], refusal["Sec-WebSocket-Version"] = "websocket", "13"
            return refusal
        if request.method != "GET":
            refusal = _plain_response(405, "a WebSocket handshake is a GET request")
            refusal["Allow"] = "GET"
            return refusal
        if "upgrade" not in [token.strip().lower() for token in meta.get("HTTP_CONNECTION", "").split(",")]:
            return _plain_response(400, "a WebSocket handshake needs Connection: Upgrade")
        if meta.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            refusal = _plain_response(426, "this server speaks WebSocket version 13")
            refusal["Sec-WebSocket-Version"] = "13"
            return refusal
        try:
            key_is_good = len(base64.b64decode(meta.get("HTTP_SEC_WEBSOCKET_KEY", ""), validate=True)) == 16
        except ValueError:
            key_is_good = False
        if not key_is_good:
            return _plain_response(400, "Sec-WebSocket-Key must be 16 bytes in base64")
        websocket = cls()
        websocket.__dict__.update(options)
        websocket.request = request
        websocket._url_kwargs = url_kwargs
        origin = meta.get("HTTP_ORIGIN")
        if origin is not None and not websocket._origin_allowed(origin):
            _logger.warning("%s %s: refused a WebSocket handshake from %s, not an origin of this site", request.method, request.get_full_path(), origin[:200])
            return _plain_response(403, f"WebSocket connections from {origin[:200]} are not allowed")
        return _SocketUpgrade(websocket)

    def _origin_allowed(self, origin: str) -> bool:
        """Whether a browser's ``Origin`` may open this socket: cross-site WebSocket hijacking is refused."""
        if self.allowed_origins is not None:
            return "*" in self.allowed_origins or origin in self.allowed_origins
        return _origin_is_this_site(self.request, origin)

    # What the endpoint overrides.

    def open(self, **kwargs: Any) -> Any:
        """The socket is open; ``kwargs`` are the URL's. Subscribe to channels here."""

    def on_message(self, message: str | bytes) -> Any:
        """A message came: a str (text) or bytes (binary)."""

    def on_event(self, event: dict[str, Any]) -> None:
        """An event of a subscribed channel came (on the IOLoop, so it must not block): send it, by default."""
        self.send(event)

    def on_close(self) -> Any:
        """The socket has closed (from either side); nothing more can be sent."""

    # What the endpoint calls.

    def send(self, data: Any) -> None:
        """Send ``data``: a dict or list as JSON text, a str as text, bytes as binary. From any thread; never waits."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            message, binary = bytes(data), True
        elif isinstance(data, str):
            message, binary = data, False
        elif isinstance(data, _Event):
            message, binary = data, False  # its frame is made once, for every socket
        else:
            message, binary = _encode_event_data(data), False
        self._on_loop(self._write, message, binary)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket with ``code`` and ``reason``; from any thread. What was sent before goes first."""
        self._on_loop(self._close, code, reason)

    def subscribe(self, channel: Channel, since: int | None = None) -> None:
        """Have ``channel``'s events sent to this socket (through ``on_event``), first the backlog after ``since``.

        A socket may follow several channels; subscribing to one again starts it
        over from ``since``. Events come as ``{"id", "data", "event"}`` JSON, after
        a "reset" one if events after ``since`` are gone.
        """
        since = None if since is None else _check_event_id(since)
        self._on_loop(self._follow, channel, since)

    def unsubscribe(self, channel: Channel) -> None:
        """Send no more of ``channel``'s events."""
        self._on_loop(self._unfollow, channel)

    # Its life, on the IOLoop.

    def _start(self, handler: DjangoHandler, upgrade: _SocketUpgrade) -> None:
        """Take the connection from ``handler``; Tornado's protocol then answers the handshake (101)."""
        self._bridge, self._loop = handler.bridge, handler.loop
        self._readers: dict[str, _Reader] = {}
        self._turn: asyncio.Future[None] | None = None  # the endpoint's method running now, or last
        self._closed = False
        self.request.META.pop(_HANDLER_ENVIRON_KEY)  # the DjangoHandler is done
        _forget_the_urls_tried(self.request)
        self._stream = handler.request.connection.stream
        self._stream.max_write_buffer_size = self.max_queued_bytes  # a client that doesn't read can't grow memory
        self._protocol = _SocketHandler(handler.application, handler.request, websocket=self)
        for name, value in _response_headers(upgrade):  # what middleware set: cookies, say
            if name.lower() not in ("content-type", "content-length"):
                self._protocol.add_header(name, value)
        session = getattr(self.request, "session", None)
        self._session_hash = _session_hash(session.session_key) if session is not None and session.session_key else None
        self._bridge.socket_opened(self)
        self._lifetime = self._loop.asyncio_loop.create_task(self._protocol.get(**self._url_kwargs))

    def _on_loop(self, function: Callable[..., Any], *args: Any) -> None:
        if asyncio.events._get_running_loop() is self._loop.asyncio_loop:
            function(*args)
        else:
            self._bridge.calls_from_threads.call_soon(self._loop, function, *args)

    def _run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        """Run one of the endpoint's methods once the one before has returned: in the pool, or on the IOLoop."""
        self._turn = asyncio.ensure_future(self._call(self._turn, method, args, kwargs))
        return self._turn

    async def _call(self, previous: asyncio.Future[None] | None, method: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        try:
            if iscoroutinefunction(method):
                await method(*args, **kwargs)
            else:
                await self._bridge.run_blocking(self._bridge.executor, functools.partial(method, *args, **kwargs))
        except Exception:
            _logger.exception("WebSocket %s: %s() failed; closing it with 1011", self.request.path, method.__name__)
            self._close(1011, "server error")
        finally:
            if self._turn is asyncio.current_task():
                self._turn = None  # the last one done: nothing stays referenced for the socket's life

    def _write(self, message: str | bytes | _Event, binary: bool) -> None:
        connection = None if self._closed else self._protocol.ws_connection
        if connection is None or connection.is_closing():
            return  # closing: what was still to send goes nowhere
        try:
            if self.compression:  # each socket deflates with its own context
                text = message.json_text() if isinstance(message, _Event) else message
                written = connection.write_message(text, binary=binary)
            elif isinstance(message, _Event):
                written = self._stream.write(message.websocket_frame())
            else:  # the frame Tornado's write_message makes, without the task it starts for every message
                written = self._stream.write(_websocket_frame(tornado.escape.utf8(message), binary))
        except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
            return
        except tornado.iostream.StreamBufferFullError:
            _logger.warning("WebSocket %s: the client left %d bytes unread; closing it with 1008", self.request.path, self.max_queued_bytes)
            self._stream.max_write_buffer_size = None  # room for the close frame
            self._close(1008, "too slow")
            return
        written.add_done_callback(_written)

    def _close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._protocol.close(code, reason)

    def _follow(self, channel: Channel, since: int | None) -> None:
        self._unfollow(channel)
        if not self._closed:
            reader = self._readers[channel.name] = _Reader(channel, since, self._events, _nothing)
            reader.start()

    def _unfollow(self, channel: Channel) -> None:
        reader = self._readers.pop(channel.name, None)
        if reader is not None:
            reader.cancel()

    def _events(self, events: list[_Event]) -> None:
        for event in events:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)

    def _ended(self) -> None:
        """The connection has closed: drop the subscriptions, then run ``on_close`` after what runs."""
        self._closed = True
        for reader in self._readers.values():
            reader.cancel()
        self._readers.clear()
        self._run(self.on_close).add_done_callback(self._release)

    def _release(self, _: asyncio.Future[None]) -> None:
        """``on_close`` has run: the socket is gone, and leaves no cycle for the collector to find."""
        self._bridge.socket_closed(self)
        self._protocol.websocket = None
        self._protocol = self._stream = self._lifetime = None


def _forget_the_urls_tried(request: HttpRequest) -> None:
    """Drop the list of every URL pattern Django tried before the match, from a request kept for long."""
    if getattr(request, "resolver_match", None) is not None:
        request.resolver_match.tried = []


def _nothing() -> None:
    """A socket's channel reader has nothing to do when the server stops: the server closes the socket."""


def _websocket_frame(payload: bytes, binary: bool) -> bytes:
    """One whole, unmasked frame (RFC 6455, 5.2): text or binary ``payload``."""
    first = 0x82 if binary else 0x81  # FIN and the opcode
    if len(payload) < 126:
        return struct.pack("!BB", first, len(payload)) + payload
    if len(payload) <= 0xFFFF:
        return struct.pack("!BBH", first, 126, len(payload)) + payload
    return struct.pack("!BBQ", first, 127, len(payload)) + payload


def _written(write: asyncio.Future[None]) -> None:
    """A write a socket that closed meanwhile never finished is no error."""
    if not write.cancelled():
        write.exception()


def _origin_is_this_site(request: HttpRequest, origin: str) -> bool:
    """Whether ``origin`` is this site's: the request's own scheme and host, an ALLOWED_HOSTS
    entry (on the same scheme, matched as Django matches hosts, "*" excepted: it would let
    any site in), or a CSRF_TRUSTED_ORIGINS entry (matched as CsrfViewMiddleware does)."""
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file), or not an origin at all
    with contextlib.suppress(DisallowedHost):
        if origin == f"{request.scheme}://{request.get_host()}":  # the scheme honours --xheaders
            return True
    domain, _ = split_domain_port(parts.netloc)
    hosts = [host for host in settings.ALLOWED_HOSTS if host != "*"]
    if parts.scheme == request.scheme and domain and validate_host(domain, hosts):
        return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        if "*" in trusted:
            scheme, _, pattern = trusted.partition("://")
            if parts.scheme == scheme and is_same_domain(parts.netloc, pattern.lstrip("*")):
                return True
        elif origin == trusted:
            return True
    return False


def _session_hash(session_key: str) -> str:
    """What a logout announces of a session: not its key, which was a password until then."""
    return hashlib.sha256(session_key.encode()).hexdigest()


def _announce_logouts() -> None:
    """Connect, once per process, the receiver that tells every process's sockets of a logout."""
    from django.contrib.auth.signals import user_logged_out

    user_logged_out.connect(_logged_out, dispatch_uid=_LOGOUTS, weak=False)


def _logged_out(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    session = getattr(request, "session", None)
    if session is None or not session.session_key:
        return
    try:
        Channel(_LOGOUTS, backlog=100, retention=600).publish(_session_hash(session.session_key))
    except ChannelUnavailable as error:  # logging out must work even so
        _logger.warning("The logout's sockets stay open in other processes: %s", error)


class _SocketUpgrade(HttpResponse):
    """What a WebSocket view answers a good handshake with, through middleware: the bridge upgrades it."""

    status_code = 101

    def __init__(self, websocket: WebSocket) -> None:
        super().__init__()
        self.websocket = websocket


class _SocketHandler(tornado.websocket.WebSocketHandler):
    """Tornado's WebSocket protocol, speaking for one endpoint once Django has let its handshake through."""

    def initialize(self, websocket: WebSocket) -> None:
        _outside_execute(self)
        self.websocket = websocket

    def check_origin(self, origin: str) -> bool:
        return True  # the endpoint decided, in Django's view

    @property
    def ping_interval(self) -> float:
        return self.websocket.ping_interval

    @property
    def ping_timeout(self) -> float:
        return self.websocket.ping_timeout

    @property
    def max_message_size(self) -> int:
        return self.websocket.max_message_size

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.websocket.compression else None

    def open(self, **kwargs: Any) -> Awaitable[None]:
        return self.websocket._run(self.websocket.open, **kwargs)  # awaited: messages wait for it

    def on_message(self, message: str | bytes) -> Awaitable[None]:
        return self.websocket._run(self.websocket.on_message, message)  # awaited: the next waits for it

    def on_close(self) -> None:
        self.websocket._ended()


# -- Wiring: the Tornado application -------------------------------------------


def make_app(
    handlers: Iterable[Any] = (),
    *,
    threads: int | None = None,
    static: bool = False,
    **tornado_settings: Any,
) -> tornado.web.Application:
    """Return a Tornado Application: ``handlers`` first, then Django for every other path.

    ``threads`` sizes the pool plain views run in (default: 16);
    0 runs them on the IOLoop thread, as the original django_tornado did.
    ``static=True`` serves STATIC_URL from django.contrib.staticfiles' finders,
    as runserver does in development (use a web server for that in production).
    ``tornado_settings`` go to ``tornado.web.Application`` unchanged. The pool is
    ``app.django_executor`` (None with ``threads=0``). Django must be configured
    (``DJANGO_SETTINGS_MODULE`` or ``settings.configure()``).
    """
    if threads is None:
        threads = _DEFAULT_THREADS
    if threads < 0:
        raise ValueError(f"threads must be 0 or more, not {threads!r}")
    if not apps.ready:
        django.setup(set_prefix=False)
    bridge = _DjangoBridge(threads, static)
    app = tornado.web.Application([*handlers, (r".*", _DjangoRouter(bridge))], **tornado_settings)
    bridge.application = app
    app.django_bridge = bridge
    app.django_executor = bridge.executor
    return app


# -- Serving: addresses, worker processes, reload, graceful shutdown ------------

_DEFAULT_HOST = "127.0.0.1"  # like runserver: reachable from this machine only
_BIND_ERRORS = {  # as runserver words them
    errno.EACCES: "you don't have permission to use that port",
    errno.EADDRINUSE: "that port is already in use",
    errno.EADDRNOTAVAIL: "that IP address is not one of this machine's",
}
# Connections waiting to be accepted: gunicorn's and uvicorn's default. Tornado's 128
# makes a burst of new clients wait a second for the kernel to retry their SYN.
_LISTEN_BACKLOG = 2048
_server_logger = logging.getLogger("django.server")  # runserver's access log, shown by Django's default logging
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")  # header names (RFC 9110 section 5.6.2)
_FORBIDDEN_IN_VALUES = re.compile(r"[\r\n\0]")  # RFC 9110 section 5.5
_ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of file descriptors
_HANDSHAKE_WAIT = 0.1  # on shutdown, seconds for a TCP handshake under way to complete (a round trip)
# accept(2) errors that belong to one connection, which failed before it was accepted:
# the next one may be fine (Linux's man page asks for a retry on these; BSD's ECONNABORTED).
_ACCEPT_RETRY = frozenset(
    getattr(errno, name, errno.ECONNABORTED)
    for name in ("ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
)
_CLIENT_LEFT = 499  # logged for a request whose client left before its answer (nginx's convention)
_LINGER_SECONDS = 5.0  # how long a refused request's unread body is drained before closing (nginx: lingering_timeout)
_FIRST_HEAD_WAIT = 1.0  # on shutdown, how long a connection accepted but not yet heard from is awaited
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_STUCK_WORKER_WAIT = 5  # seconds past the grace period before the parent kills a worker that has not exited
# New container objects before the collector's first generation runs (Python: 700, or 2,000 from 3.13).
_GC_FIRST_GENERATION = 10_000


_NEW, _BUSY, _KEPT_ALIVE = "new", "busy", "kept alive"  # the states of a connection (_HTTPServer.connection_states)


class _RequestGuard(tornado.httputil.HTTPMessageDelegate):
    """Refuse, before the application sees it, a request HTTP rules out or the limits forbid.

    Tornado parses the message; this adds what RFC 9112 and the server's limits
    ask of the head: one Host on HTTP/1.1, a 414/431 instead of a cut connection
    for a head that is too large, 413 for a declared body over ``max_body_size``
    (before a ``100 Continue`` invites it) or a chunked one that grows past it,
    417 for an Expect it cannot meet.
    """

    def __init__(
        self,
        server: _HTTPServer,
        server_connection: object,
        connection: tornado.http1connection.HTTP1Connection,
        delegate: tornado.httputil.HTTPMessageDelegate,
    ) -> None:
        self.server = server
        self.server_connection = server_connection
        self.connection = connection
        self.delegate = delegate
        self.start_line: tornado.httputil.RequestStartLine | None = None
        self.chunked_body_left: int | None = None  # bytes a chunked body may still bring
        self.refused = False

    def headers_received(self, start_line: tornado.httputil.RequestStartLine, headers: tornado.httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.start_line = start_line
        self.server.connection_states[self.server_connection] = _BUSY
        refusal = self._refusal(start_line, headers)
        if refusal is not None:
            # Stop Tornado reading this connection (detach is meant for this moment) and answer on it directly.
            self._refuse(self.connection.detach(), *refusal)
            return None
        if "Transfer-Encoding" in headers:
            self.chunked_body_left = self.server.max_body_size
        return self.delegate.headers_received(start_line, headers)

    def _refusal(self, start_line: tornado.httputil.RequestStartLine, headers: tornado.httputil.HTTPHeaders) -> tuple[int, str] | None:
        """Return (status, reason) if this request must not go on, else None."""
        max_header_size, max_body_size = self.server.max_header_size, self.server.max_body_size
        if len(start_line.path) > max_header_size:
            return 414, f"the request target is over {max_header_size} bytes"
        fields = list(headers.get_all())
        names, values = "".join(name for name, _ in fields), "".join(value for _, value in fields)
        if len(start_line.path) + len(names) + len(values) + 4 * len(fields) > max_header_size:
            return 431, f"the request head is over {max_header_size} bytes"
        if not _TOKEN.fullmatch(names) or not all(name for name, _ in fields) or _FORBIDDEN_IN_VALUES.search(values):
            # RFC 9110 section 5: Tornado before 6.5 lets these through, and a
            # stray CR or NUL in a header Django reads is a smuggling risk.
            return 400, "a malformed header line"
        hosts = headers.get_list("Host")
        if len(hosts) > 1 or (not hosts and start_line.version == "HTTP/1.1"):
            return 400, "an HTTP/1.1 request needs exactly one Host header"  # RFC 9112 section 3.2
        # (A membership test first: most requests have none of these, and get() costs more.)
        if "Expect" in headers and headers["Expect"].lower() != "100-continue":
            return 417, f"can't meet Expect: {headers['Expect']}"
        if "Transfer-Encoding" in headers:
            if "Content-Length" in headers:
                return 400, "both Transfer-Encoding and Content-Length"  # RFC 9112 section 6.1: a smuggling sign
            if headers["Transfer-Encoding"].lower() != "chunked":
                return 501, f"can't decode Transfer-Encoding: {headers['Transfer-Encoding']}"  # RFC 9112 section 6.1
        if "Content-Length" in headers and headers["Content-Length"].isdigit() and int(headers["Content-Length"]) > max_body_size:
            return self._body_too_large()
        return None

    def _body_too_large(self) -> tuple[int, str]:
        return 413, f"the body is over {self.server.max_body_size} bytes"

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.chunked_body_left is not None:
            self.chunked_body_left -= len(chunk)
            if self.chunked_body_left < 0 and not self.refused:
                # Tornado reads no further until the returned answer is written and the
                # connection closed: the stream is the guard's meanwhile.
                self.delegate.on_connection_close()  # the application gives the request up
                return self._refuse(self.connection.stream, *self._body_too_large())
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()

    def _refuse(self, stream: tornado.iostream.IOStream, status: int, detail: str) -> asyncio.Future[None]:
        """Log the refusal in the access log, then answer it on ``stream`` and close it."""
        self.refused = True
        line = self.start_line
        address = getattr(self.connection.context, "remote_ip", "-")
        uri = line.path if len(line.path) <= 200 else line.path[:200] + "..."
        _server_logger.warning('"%s %s %s" %d %s (%s)', line.method, uri, line.version, status, address, detail)
        refusal = asyncio.ensure_future(_answer_and_close(stream, status, detail))
        self.server.refusals.add(refusal)  # a task nobody references may vanish mid-way
        refusal.add_done_callback(self.server.refusals.discard)
        return refusal


async def _answer_and_close(stream: tornado.iostream.IOStream, status: int, detail: str) -> None:
    """Answer ``status`` on a connection taken from Tornado, then close it gently."""
    reason = tornado.httputil.responses.get(status, "Error")
    body = f"{status} {reason}: {detail}\n".encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        await stream.write(head.encode() + body)
        # Closing with unread data resets the connection, and a client still sending its
        # body would lose this answer: read on for a while and drop it (nginx's lingering close).
        stream.socket.shutdown(socket.SHUT_WR)
        deadline = stream.io_loop.time() + _LINGER_SECONDS
        while True:
            await tornado.gen.with_timeout(deadline, stream.read_bytes(64 * 1024, partial=True), quiet_exceptions=tornado.iostream.StreamClosedError)
    except (tornado.iostream.StreamClosedError, tornado.util.TimeoutError, OSError):
        pass
    finally:
        stream.close()


class _HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer with the request guard, and a header timeout of its own.

    Tornado times the wait for a request head with its idle timeout. Here a new
    connection gets ``header_timeout`` for its first head (a slowloris client is
    dropped early); a kept-alive one ``idle_timeout`` for the next.
    """

    def initialize(
        self,
        request_callback: Any,
        *,
        max_header_size: int,
        max_body_size: int,
        header_timeout: float,
        idle_timeout: float,
        **options: Any,
    ) -> None:
        # Tornado cuts a connection whose head is over its own limit without a word, and
        # answers a body over its own with a bare 400: its limits are set higher, so that
        # heads up to 4 times ours get a 414 or 431 from the guard, and a chunked body a
        # 413 (Tornado still refuses a single chunk declared over twice the limit).
        super().initialize(
            request_callback,
            max_header_size=4 * max_header_size,
            max_body_size=2 * max_body_size,
            idle_connection_timeout=idle_timeout,
            **options,
        )
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self.first_request_params = copy.copy(self.conn_params)
        self.first_request_params.header_timeout = header_timeout
        # What each open connection is doing, for a graceful shutdown: awaiting its first
        # request head, busy with a request, or kept alive and awaiting the next head.
        self.connection_states: dict[object, str] = {}
        self.refusals: set[asyncio.Future[None]] = set()  # answers of refused requests, being written

    def start_request(self, server_conn: object, request_conn: tornado.http1connection.HTTP1Connection) -> tornado.httputil.HTTPMessageDelegate:
        if server_conn in self.connection_states:
            self.connection_states[server_conn] = _KEPT_ALIVE
        else:
            self.connection_states[server_conn] = _NEW
            request_conn.params = self.first_request_params  # read when Tornado starts waiting for the head
        delegate = super().start_request(server_conn, request_conn)
        return _RequestGuard(self, server_conn, request_conn, delegate)

    def on_close(self, server_conn: object) -> None:
        self.connection_states.pop(server_conn, None)
        super().on_close(server_conn)

    def requests_to_wait_for(self, new_connections_too: bool) -> bool:
        """Whether a connection is busy with a request (or, if asked, new and not yet heard from)."""
        states = set(self.connection_states.values())
        return _BUSY in states or (new_connections_too and _NEW in states)


class _Listener:
    """Accept connections on ``sockets`` for ``server`` (in place of ``server.add_sockets``).

    Two things Tornado's accept loop (6.3-6.6) does not do: when accept() fails,
    for instance because the process ran out of file descriptors, it raises on
    every turn of the IOLoop while the socket stays readable, so the server spins
    writing tracebacks; here it stops accepting for a moment and says so once, as
    asyncio's own servers do. And closing drops the connections the kernel has
    queued; here they are served.
    """

    def __init__(self, server: _HTTPServer, sockets: list[socket.socket]) -> None:
        self.server = server
        self.sockets = sockets
        self.loop = tornado.ioloop.IOLoop.current()
        self._paused: object | None = None  # the timeout that resumes accepting
        self._closed = False
        self._listen()

    def _listen(self) -> None:
        self._paused = None
        for listening in self.sockets:
            self.loop.add_handler(listening, self._accept, tornado.ioloop.IOLoop.READ)

    def _accept(self, listening: socket.socket, events: int = 0) -> None:
        for _ in range(_LISTEN_BACKLOG):  # then let the IOLoop serve the others
            try:
                connection, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _ACCEPT_RETRY:
                    continue
                # Out of descriptors or memory, or anything else: raising here would come
                # back on every turn of the IOLoop while the socket stays readable.
                _logger.warning("Can't accept connections (%s): pausing for %s s", error.strerror, _ACCEPT_PAUSE)
                self._pause()
                return
            stream = tornado.iostream.IOStream(connection, max_buffer_size=self.server.max_buffer_size, read_chunk_size=self.server.read_chunk_size)
            self.server.handle_stream(stream, address)

    def _pause(self) -> None:
        if self._closed:
            return
        for listening in self.sockets:
            self.loop.remove_handler(listening)
        self._paused = self.loop.call_later(_ACCEPT_PAUSE, self._listen)

    async def close(self, refuse_new_handshakes: bool) -> None:
        """Stop listening, after serving the connections already on their way in.

        A worker stopping on its own passes False: the others go on accepting on
        the sockets it shares with them.
        """
        if refuse_new_handshakes:
            _refuse_new_handshakes(self.sockets)
        await asyncio.sleep(_HANDSHAKE_WAIT)  # meanwhile, handshakes under way complete and are accepted
        self._closed = True
        if self._paused is not None:
            self.loop.remove_timeout(self._paused)
        else:
            for listening in self.sockets:
                self.loop.remove_handler(listening)
        for listening in self.sockets:
            self._accept(listening)
            listening.close()


_SO_ATTACH_FILTER = 26  # Linux's socket option for a classic BPF program
# A classic BPF program: drop a packet whose TCP flags (byte 13 of its header) have SYN
# set; keep every other one, so that the handshakes under way can complete.
_DROP_SYN = b"".join(
    struct.pack("HBBI", *instruction)
    for instruction in (
        (0x30, 0, 0, 13),  # ldb [13]: the flags
        (0x45, 0, 1, 0x02),  # jset #SYN: go on, else skip one
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep, whole
    )
)


def _refuse_new_handshakes(sockets: list[socket.socket]) -> None:
    """Have the kernel ignore new connection attempts on listening ``sockets`` (Linux only).

    Closing a listening socket resets the connections the kernel completed since
    the last accept(), with the requests already sent on them; on a busy machine
    that window is long enough to matter. Without new SYNs, the queue can be
    emptied before the socket is closed: a client that came too late retries its
    SYN, finds the port closed, and is refused, never reset.
    """
    if sys.platform != "linux":
        return
    program = ctypes.create_string_buffer(_DROP_SYN)  # the kernel copies it
    filter_option = struct.pack("HP", len(_DROP_SYN) // 8, ctypes.addressof(program))
    for listening in sockets:
        with contextlib.suppress(OSError):
            listening.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, filter_option)


def serve(
    addresses: Iterable[str | int] = ("8000",),
    *,
    handlers: Iterable[Any] = (),
    threads: int | None = None,
    static: bool = False,
    processes: int = 1,
    reload: bool = False,
    xheaders: bool = False,
    no_keep_alive: bool = False,
    max_body_size: int = 100 * 1024 * 1024,  # Tornado's default; a declared larger body gets 413
    max_header_size: int = 64 * 1024,  # Tornado's default; a larger request head gets 414 or 431
    header_timeout: float = 20.0,  # a new connection's first request head (Apache's mod_reqtimeout)
    idle_timeout: float = 75.0,  # above nginx's 60 s upstream keep-alive, so nginx closes first
    body_timeout: float | None = 300.0,  # a whole request body, however slowly it trickles
    grace_period: float = 30.0,  # gunicorn's default graceful timeout
    startup: Iterable[Callable[[], Any] | str] = (),
    stdout: TextIO | None = None,
    **tornado_settings: Any,
) -> None:
    """Serve this Django project on every address in ``addresses`` until SIGINT or SIGTERM.

    ``addresses`` are ports or ``address:port`` strings: ``8000``, ``"8001"``,
    ``"0.0.0.0:8000"``, ``"[::1]:8000"``; the default address is 127.0.0.1, as
    with runserver. All of them are served by one process and one IOLoop, so
    in-memory state is shared by every port. ``processes=N`` forks N workers
    that share the listening sockets (0: one per CPU); the parent restarts a
    worker that dies, and in-memory state is then per process. ``reload=True``
    restarts the process when a source file changes (one process only).

    ``handlers``, ``threads``, ``static`` and ``tornado_settings`` go to ``make_app``.
    ``xheaders`` trusts X-Real-IP, X-Forwarded-For and X-Forwarded-Proto (behind
    a proxy only); ``no_keep_alive`` closes each connection after one answer.

    Limits, enforced before Django sees a request: a request head over
    ``max_header_size`` bytes gets 414 or 431, a declared body over
    ``max_body_size`` 413 (a chunked one as it grows past it), a malformed
    head 400. A new connection has ``header_timeout`` seconds to send
    its first request head, a kept-alive one ``idle_timeout`` seconds for the
    next, a body ``body_timeout`` seconds (None: no limit); then the connection
    is closed.

    ``startup`` callables (or dotted paths), then those in
    ``settings.TORNADO_STARTUP``, run in each worker once its IOLoop is up; a
    coroutine is awaited. The banner goes to ``stdout`` (default ``sys.stdout``).

    On SIGINT or SIGTERM the server stops accepting, answers parked
    ``@asynchronous`` requests at once (503 with Retry-After, unless a disconnect
    callback answers them), lets the requests in flight finish for up to
    ``grace_period`` seconds, then returns. A second signal cuts them off.
    Raises ValueError for a bad argument (or a bad ``TORNADO_CHANNELS_URL``) and
    OSError (with a plain message) for an address it cannot listen on.
    """
    parsed = [_parse_address(address) for address in addresses]
    if not parsed:
        raise ValueError("serve() needs at least one address to listen on")
    if processes < 0:
        raise ValueError(f"processes must be 0 (one per CPU) or more, not {processes!r}")
    processes = processes or os.cpu_count() or 1
    if reload and processes != 1:
        raise ValueError("reload restarts a single process; it cannot be combined with processes > 1")
    if not (grace_period >= 0 and math.isfinite(grace_period)):
        raise ValueError(f"grace_period must be a number of seconds, 0 or more, not {grace_period!r}")
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be 0 or more, not {threads!r}")
    for name, limit in [("max_body_size", max_body_size), ("max_header_size", max_header_size), ("header_timeout", header_timeout), ("idle_timeout", idle_timeout), ("body_timeout", body_timeout)]:
        if limit is not None and limit <= 0:
            raise ValueError(f"{name} must be more than 0, not {limit!r}")
    stdout = stdout or sys.stdout
    if not apps.ready:
        django.setup(set_prefix=False)
    try:
        _channel_backend()  # a bad TORNADO_CHANNELS_URL fails now, not at the first publish
    except ImproperlyConfigured as error:
        raise ValueError(str(error)) from None
    startup = [*startup, *getattr(settings, "TORNADO_STARTUP", ())]
    startup_callbacks = [import_string(entry) if isinstance(entry, str) else entry for entry in startup]
    _raise_open_file_limit()
    sockets = _bind(parsed)
    _print_banner(stdout, sockets, threads, processes, reload)
    server_options = {
        "xheaders": xheaders,
        "no_keep_alive": no_keep_alive,
        "max_body_size": max_body_size,
        "max_header_size": max_header_size,
        "header_timeout": header_timeout,
        "idle_timeout": idle_timeout,
        "body_timeout": body_timeout,
    }

    def run_worker(supervised: bool) -> bool:
        app = make_app(handlers, threads=threads, static=static, log_function=_log_request, **tornado_settings)
        return asyncio.run(
            _serve_until_signalled(sockets, app, server_options, startup_callbacks, grace_period, reload, supervised, stdout)
        )

    if processes > 1:
        connections.close_all()  # a database connection must not be shared by forked workers
        _supervise(processes, run_worker, sockets, grace_period)
    elif not run_worker(supervised=False):
        _exit_now(0)  # pool threads still running a view would keep the interpreter from exiting


def _raise_open_file_limit() -> None:
    """Let every parked connection have its file descriptor: raise the soft limit to the hard one.

    The soft limit is often 1,024 while the hard one is far higher (Go's runtime
    raises it the same way); a long-poll server needs one per waiting client.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # some systems refuse RLIM_INFINITY
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _exit_now(code: int) -> None:
    """Exit without waiting for pool threads, after writing out the logs."""
    logging.shutdown()
    os._exit(code)


def _parse_address(address: str | int) -> tuple[str, int]:
    """Return ``(host, port)`` for ``8000``, ``"8000"``, ``"0.0.0.0:8000"`` or ``"[::1]:8000"``."""
    text = str(address).strip()
    host, port = _DEFAULT_HOST, text
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
        if not separator:
            host = ""
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f'"{text}" is not a port or address:port (like 8000, 0.0.0.0:8000 or [::1]:8000)')
    return host, int(port)


def _bind(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """Open a listening socket for each address, or raise OSError saying plainly why not."""
    sockets: list[socket.socket] = []
    for host, port in addresses:
        try:
            sockets.extend(tornado.netutil.bind_sockets(port, host, backlog=_LISTEN_BACKLOG))
        except OSError as error:
            for opened in sockets:
                opened.close()
            reason = _BIND_ERRORS.get(error.errno, error.strerror or str(error))
            plain_error = OSError(f"Can't listen on {_url(host, port)}: {reason}")
            plain_error.errno = error.errno
            raise plain_error from None
    return sockets



def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _print_banner(stdout: TextIO, sockets: list[socket.socket], threads: int | None, processes: int, reload: bool) -> None:
    """Say what runs where, as runserver does."""
    urls = dict.fromkeys(_url(*sock.getsockname()[:2]) for sock in sockets)
    pool = f"{_DEFAULT_THREADS if threads is None else threads} threads for plain views"
    workers = f"{processes} worker processes (in-memory state is per process)" if processes > 1 else "1 process"
    stdout.write(
        f"{datetime.datetime.now().strftime('%B %d, %Y - %X')}\n"
        f"Django version {django.get_version()}, using settings {settings.SETTINGS_MODULE or 'configured in code'!r}\n"
        f"Starting django_tornado {__version__} (Tornado {tornado.version}) at {', '.join(urls)}\n"
        f"{workers}, {pool}{', reloading on code changes' if reload else ''}\n"
        "Quit the server with CONTROL-C.\n"
    )
    stdout.flush()


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Log one line per request on the ``django.server`` logger, which Django's default logging shows."""
    if getattr(handler, "_client_left", False):
        status, level = _CLIENT_LEFT, logging.INFO  # a closed tab, a long-poll given up: routine
    else:
        status = handler.get_status()
        level = logging.ERROR if status >= 500 and status != 501 else logging.WARNING if status >= 400 else logging.INFO
    if not _server_logger.isEnabledFor(level):
        return
    request = handler.request
    _server_logger.log(
        level,
        '"%s %s %s" %d %.1fms %s',
        request.method,
        request.uri,
        request.version,
        status,
        1000 * request.request_time(),
        request.remote_ip,
        extra={"status_code": status},
    )



async def _serve_until_signalled(
    sockets: list[socket.socket],
    app: tornado.web.Application,
    server_options: dict[str, Any],
    startup_callbacks: list[Callable[[], Any]],
    grace_period: float,
    reload: bool,
    supervised: bool,
    stdout: TextIO,
) -> bool:
    """Serve until SIGTERM (or SIGINT), then shut down gracefully; True if nothing was cut off."""
    server = _HTTPServer(app, **server_options)
    listener = _Listener(server, sockets)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signal_number: int) -> None:
        if stop.is_set():
            _logger.warning("Second %s: stopping now", signal.Signals(signal_number).name)
            _exit_now(1)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
    # Only the last process holding the sockets refuses new connections on them: a
    # supervised worker's parent does it when all stop (a worker may stop on its own).
    last_holder = not supervised
    if not supervised:
        # A supervised worker ignores SIGINT: Ctrl-C reaches every process of the
        # terminal's group, and the parent turns it into one SIGTERM per worker.
        loop.add_signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    else:
        parent = os.getppid()

        def stop_if_orphaned() -> None:
            # The parent was killed (kill -9 sends its workers nothing): stop gracefully
            # rather than serve on unsupervised, as gunicorn's workers do.
            nonlocal last_holder
            if os.getppid() != parent and not stop.is_set():
                _logger.warning("Worker (pid %d): the parent process is gone; stopping", os.getpid())
                last_holder = True  # with the others, all orphans too
                stop.set()

        tornado.ioloop.PeriodicCallback(stop_if_orphaned, 1000).start()
    if reload:
        tornado.autoreload.start()
    _tune_garbage_collector()
    for callback in startup_callbacks:
        result = callback()
        if inspect.isawaitable(result):
            await result
    await stop.wait()

    bridge = app.django_bridge
    stdout.write(
        f"Stopping (pid {os.getpid()}): {len(bridge.active_handlers)} requests in flight get up to {grace_period} s; "
        "signal again to stop at once.\n"
    )
    stdout.flush()
    # Requests read from now on get "Connection: close"; HTTP1ConnectionParameters
    # is shared by every connection of this server (Tornado 6.3-6.6).
    server.conn_params.no_keep_alive = True
    server.first_request_params.no_keep_alive = True
    await listener.close(refuse_new_handshakes=last_holder)
    deadline, first_heads_until = loop.time() + grace_period, loop.time() + _FIRST_HEAD_WAIT
    drained = await bridge.drain(grace_period)
    # Connections accepted a moment ago (some from the backlog, just now) are about to
    # send their first request: closing them now would drop it. Wait for those requests
    # too, and for a silent new connection a second at most.
    while drained:
        await asyncio.sleep(0.02)  # first, so that the connections just accepted have started
        if not (bridge.active_handlers or server.requests_to_wait_for(loop.time() < first_heads_until)):
            break
        drained = loop.time() < deadline
    if not drained:
        _logger.warning("%d requests still running after %s s were cut off", len(bridge.active_handlers), grace_period)
    await server.close_all_connections()
    bridge.shutdown(wait=drained)
    return drained


def _tune_garbage_collector() -> None:
    """Keep full garbage collections from pausing a server that holds thousands of connections.

    Every parked request, stream and socket is a few dozen objects the
    collector tracks; with 5,000 of them a full collection stops the IOLoop for
    0.3-1 s, in the middle of a broadcast. What is loaded by now (Django, the
    project) is frozen out of collections, and the first generation waits for
    10,000 new objects rather than 700, so that a broadcast's short-lived
    objects are gone before the collector looks, instead of filling the older
    generations. Measured with 5,000 sockets and five broadcasts: 13 full
    collections (3 s of pauses) before, none after. A startup callback may set
    other thresholds.
    """
    gc.collect()
    gc.freeze()
    first, *older = gc.get_threshold()
    if first < _GC_FIRST_GENERATION:
        gc.set_threshold(_GC_FIRST_GENERATION, *older)


def _supervise(processes: int, run_worker: Callable[[bool], bool], sockets: list[socket.socket], grace_period: float) -> None:
    """Fork ``processes`` workers, replace any that dies, and stop them all on SIGINT or SIGTERM.

    A worker still running a little after the grace period (its IOLoop blocked,
    say) is killed, so that stopping takes a bounded time, as in gunicorn.
    """
    workers: dict[int, tuple[int, float]] = {}  # pid -> (worker number, start time)
    stopping = 0
    stuck_after = grace_period + _STUCK_WORKER_WAIT  # seconds after the first signal

    def start(number: int) -> None:
        # A signal waits until the parent knows the new worker (to pass the signal on)
        # and the worker has dropped the parent's handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            # Until the worker's own handlers are in place, SIGTERM just ends it.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            try:
                run_worker(True)
            except BaseException:
                _logger.exception("Worker %d failed", number)
                _exit_now(1)
            _exit_now(0)
        workers[pid] = (number, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def on_signal(signal_number: int, frame: Any) -> None:
        nonlocal stopping
        stopping += 1
        if stopping == 1:
            _refuse_new_handshakes(sockets)
            signal.signal(signal.SIGALRM, kill_stuck_workers)
            signal.setitimer(signal.ITIMER_REAL, stuck_after)
        for pid in workers:
            os.kill(pid, signal.SIGTERM if stopping == 1 else signal.SIGKILL)

    def kill_stuck_workers(signal_number: int, frame: Any) -> None:
        for pid, (number, _) in workers.items():
            _logger.warning("Worker %d (pid %d) still running %g s after the signal: killed", number, pid, stuck_after)
            os.kill(pid, signal.SIGKILL)

    for signal_number in _STOP_SIGNALS:
        signal.signal(signal_number, on_signal)
    for number in range(processes):
        start(number)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        number, started = workers.pop(pid)
        if stopping:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        _logger.warning("Worker %d (pid %d) exited with code %d; starting a new one", number, pid, exit_code)
        if time.monotonic() - started < 1:
            time.sleep(1)  # a worker that dies as it starts must not make the parent spin
        if not stopping:
            start(number)
    signal.setitimer(signal.ITIMER_REAL, 0)  # serve() returns to its caller, who has no use for a late SIGALRM


# -- The runtornado command and python -m django_tornado -----------------------


_LIMIT_OPTIONS = ("max_body_size", "header_timeout", "idle_timeout", "body_timeout")


class Command(BaseCommand):
    """``manage.py runtornado``: serve the project on Tornado, shaped like runserver."""

    help = "Serve this Django project on Tornado: one process (or --processes N) on one or more ports."
    requires_system_checks = ()  # run in handle(), after the arguments are checked, as runserver does
    default_addresses = ("8000",)

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("addrport", nargs="*", help="Ports or address:port pairs to listen on (default: 127.0.0.1:8000).")
        parser.add_argument("--reload", action="store_true", help="Restart when a source file changes.")
        parser.add_argument("--processes", type=int, default=1, help="Worker processes sharing the ports; 0 means one per CPU (default: 1).")
        parser.add_argument("--threads", type=int, default=None, help="Threads for plain views per process; 0 runs them on the IOLoop (default: 16).")
        parser.add_argument("--xheaders", action="store_true", help="Trust X-Real-IP, X-Forwarded-For and X-Forwarded-Proto (behind a proxy only).")
        parser.add_argument("--nokeepalive", action="store_true", help="Close each connection after one request.")
        parser.add_argument("--grace-period", type=float, default=30.0, help="Seconds in-flight requests get to finish on SIGTERM (default: 30).")
        parser.add_argument("--max-body-size", type=int, help="Largest request body in bytes; larger ones get 413 (default: 100 MiB).")
        parser.add_argument("--header-timeout", type=float, help="Seconds a new connection has to send its request head (default: 20).")
        parser.add_argument("--idle-timeout", type=float, help="Seconds an idle keep-alive connection stays open (default: 75).")
        parser.add_argument("--body-timeout", type=float, help="Seconds a request body may take to arrive (default: 300).")
        parser.add_argument("--nostatic", action="store_true", help="Do not serve static files (served with DEBUG, as runserver does).")
        parser.add_argument("--insecure", action="store_true", help="Serve static files even with DEBUG off.")
        parser.add_argument("--skip-checks", action="store_true", help="Skip system checks.")

    def handle(self, *args: Any, **options: Any) -> None:
        addresses = options["addrport"] or self.default_addresses
        for address in addresses:
            try:
                _parse_address(address)
            except ValueError as error:
                raise CommandError(error) from None
        if not options["skip_checks"]:
            self.stdout.write("Performing system checks...\n\n")
            self.check(display_num_errors=True)
        self.check_migrations()
        # As runserver does when django.contrib.staticfiles is installed.
        static = (settings.DEBUG or options["insecure"]) and not options["nostatic"] and apps.is_installed("django.contrib.staticfiles")
        limits = {name: options[name] for name in _LIMIT_OPTIONS if options[name] is not None}  # else serve()'s defaults
        try:
            serve(
                addresses,
                **limits,
                threads=options["threads"],
                static=static,
                processes=options["processes"],
                reload=options["reload"],
                xheaders=options["xheaders"],
                no_keep_alive=options["nokeepalive"],
                grace_period=options["grace_period"],
                stdout=self.stdout,
            )
        except (ValueError, OSError) as error:
            raise CommandError(error) from None


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m django_tornado [options] [addrport ...]``; settings from --settings or DJANGO_SETTINGS_MODULE."""
    argv = sys.argv[1:] if argv is None else argv
    command = Command()
    # As manage.py does: find --settings and --pythonpath first, set Django up, then run the command.
    parser = CommandParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--settings")
    parser.add_argument("--pythonpath")
    handle_default_options(parser.parse_known_args(argv)[0])
    settings_module = os.environ.get(ENVIRONMENT_VARIABLE)
    if settings.configured or settings_module:
        try:
            django.setup(set_prefix=False)
        except ModuleNotFoundError as error:
            if not settings_module or not f"{settings_module}.".startswith(f"{error.name}."):
                raise
            command.stderr.write(f"CommandError: can't import the settings module {settings_module!r} (no module named {error.name!r}).")
            return 1
    elif not {"-h", "--help"} & set(argv):
        command.stderr.write(f"CommandError: no Django settings: pass --settings=yourproject.settings or set {ENVIRONMENT_VARIABLE}.")
        return 1
    command.run_from_argv(["python -m django_tornado", "runtornado", *argv])
    return 0


def _register_command_with_django() -> None:
    """Let Django find ``runtornado`` when "django_tornado" is in INSTALLED_APPS.

    Django (4.2 to 5.2) lists an app's commands from the files in
    ``<app path>/management/commands``, which a single-file module has none of,
    then imports ``<app>.management.commands.<name>``. The module answers both:
    a finder for that one (absent) folder lists ``runtornado``, and the module
    itself stands in for the command module.
    """
    commands_folder = os.path.join(os.path.dirname(__file__), "management", "commands")  # as AppConfig.path has it
    sys.path_importer_cache[commands_folder] = _CommandFinder()
    sys.modules[f"{__name__}.management.commands.runtornado"] = sys.modules[__name__]


class _CommandFinder:
    """Path-entry finder that lists this module's one management command (for pkgutil.iter_modules)."""

    def iter_modules(self, prefix: str = "") -> Iterable[tuple[str, bool]]:
        yield prefix + "runtornado", False

    def find_spec(self, fullname: str, target: Any = None) -> None:
        return None


_register_command_with_django()

if __name__ == "__main__":
    # Run the copy Django and your views import, so both see the same classes.
    from django_tornado import main as _main

    sys.exit(_main())
