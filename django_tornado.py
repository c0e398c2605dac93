"""Serve a Django project on Tornado: plain views in a thread pool, long-polls on the IOLoop.

Every ordinary Django view keeps working unchanged (middleware, sessions, auth,
CSRF, admin, uploads, error pages) and never blocks the IOLoop. Views that want
Tornado's powers get them: an ``@asynchronous`` view receives the Tornado
handler as an extra argument and may answer later, and an ``async def`` view
runs on the IOLoop and can ``await`` anything asyncio or Tornado offers::

    from django.http import JsonResponse
    from django_tornado import asynchronous, make_app

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

    app = make_app([(r"/ws", MyWebSocketHandler)])   # Tornado routes first
    app.listen(8000)                                   # then Django for the rest

Concurrency: plain views run in a bounded thread pool (``threads``), so state
they share with ``@asynchronous`` views needs a lock. ``@asynchronous`` view
bodies, their ``async_callback`` callbacks and ``async def`` views run on the
IOLoop thread and must not block it. An ``@asynchronous`` view that returns
``None`` owns the response until it calls ``handler.finish()`` (from any thread
through ``handler.async_callback``). With ``threads=0`` everything runs on the
IOLoop thread, as the original django_tornado did.

Not supported: HTTP/2, and response middleware that rewrites the late body of
an ``@asynchronous`` view (GZip, ETags): middleware sees a placeholder, and only
its headers reach the late answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import django
import tornado.concurrent
import tornado.escape
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.web
from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.apps import apps
from django.conf import settings
from django.core import signals
from django.core.handlers.base import BaseHandler
from django.core.handlers.wsgi import (
    WSGIHandler,
    WSGIRequest,
    get_path_info,
    get_script_name,
)
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseBase
from django.urls import Resolver404, get_resolver, set_script_prefix
from django.utils.cache import add_never_cache_headers

__version__ = "0.1.0"
__all__ = ["DjangoHandler", "asynchronous", "make_app"]

_logger = logging.getLogger(__name__)

# Code written for the original project imports ``django_tornado.decorator``;
# the single-file module answers to that name too.
sys.modules[f"{__name__}.decorator"] = sys.modules[__name__]

_DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default
# Threads for the synchronous part (middleware) of @asynchronous views, so
# long-polls keep being accepted while slow plain views fill the main pool.
_RESERVED_THREADS = 4
_HANDLER_ENVIRON_KEY = "tornado.handler"  # PEP 3333 lets servers add keys of their own

_FILE_BLOCK_SIZE = 64 * 1024  # FileResponse reads 4 KiB by default; Django's ASGI handler raises it too
_ROUTE_CACHE_SIZE = 1024  # distinct paths whose view kind is remembered

# How a request's view runs, decided once per path (see _DjangoBridge.route).
_PLAIN = "plain"  # whole Django cycle in the main pool
_DEFERRING = "asynchronous"  # middleware in the reserved pool, view body on the IOLoop
_COROUTINE = "async def"  # Django's async cycle on the IOLoop

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
    path = tornado_request.path
    if not path.startswith("/") and "://" in path:
        # Absolute-form request target (RFC 9112 section 3.2.2): the path is what follows the authority.
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    host, port = tornado.httputil.split_host_and_port(tornado_request.host)
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


class _DjangoBridge:
    """What every DjangoHandler of one application shares: Django's handlers and the pools."""

    def __init__(self, threads: int) -> None:
        self.wsgi_handler = WSGIHandler()
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, "django") if threads else None
        self.reserved_executor = (
            concurrent.futures.ThreadPoolExecutor(min(threads, _RESERVED_THREADS), "django-asynchronous") if threads else None
        )
        self.deferred_handlers: set[DjangoHandler] = set()  # requests answered later, for shutdown and monitoring
        self._async_handler: BaseHandler | None = None
        self._resolver = None
        self._routes: dict[str, str] = {}

    @property
    def async_handler(self) -> BaseHandler:
        """Django's middleware chain in async mode, built the first time an ``async def`` view is served."""
        if self._async_handler is None:
            self._async_handler = BaseHandler()
            self._async_handler.load_middleware(is_async=True)
        return self._async_handler

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

    async def get_response_async(self, environ: dict[str, Any]) -> HttpResponseBase:
        """Run Django's async cycle on the IOLoop, as Django's ASGIHandler does."""
        set_script_prefix(get_script_name(environ))
        await sync_to_async(signals.request_started.send)(sender=WSGIHandler, environ=environ)
        response = await self.async_handler.get_response_async(WSGIRequest(environ))
        if not response.streaming:
            await sync_to_async(response.close)()
        return response

    async def run_blocking(self, executor: concurrent.futures.Executor | None, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking Django code in ``executor``, or right here when there is no pool."""
        if executor is None:
            return _call_outside_event_loop(function, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    def close_response(self, response: HttpResponseBase) -> Awaitable[None]:
        """Close a finished streaming response (sends ``request_finished``) off the IOLoop."""
        if getattr(response, "is_async", False):
            return sync_to_async(response.close)()
        return self.run_blocking(self.executor, response.close)

    def shutdown(self) -> None:
        """Stop the pools once the requests in them are done."""
        for executor in (self.executor, self.reserved_executor):
            if executor is not None:
                executor.shutdown(wait=True)


def _ignore_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    """WSGI ``start_response``: the bridge reads status and headers from the response itself."""


@tornado.web.stream_request_body
class DjangoHandler(tornado.web.RequestHandler):
    """Serve one request through Django; ``@asynchronous`` views receive it as ``handler``.

    All of Tornado's RequestHandler API is there (``write``, ``flush``,
    ``finish``, ``set_header``, ``set_status``, ``request``, ...), plus
    ``async_callback`` and ``add_disconnect_callback``.
    """

    def initialize(self, bridge: _DjangoBridge) -> None:
        self.bridge = bridge
        self.loop = tornado.ioloop.IOLoop.current()
        self._loop_thread = threading.get_ident()
        self._body: io.IOBase = io.BytesIO()
        self._in_django = False  # Django is still working on this request (middleware, view)
        self._waiting_for_django: list[Callable[[], None]] = []  # flush/finish asked for meanwhile
        self._finish_waiting: asyncio.Future[None] | None = None
        self._headers_set_meanwhile: set[str] = set()
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._answered: asyncio.Future[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # Django work on the IOLoop the client leaving cancels
        self._expiry: object | None = None
        self._headers_sent = False
        self._abandoned = False  # ended without the view's answer
        self._done = False

    # Request body: collected here so Tornado does not parse forms Django will parse.

    def data_received(self, chunk: bytes) -> None:
        if isinstance(self._body, io.BytesIO) and self._body.tell() + len(chunk) > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            # Large uploads spill to disk, as with Django's ASGI handler.
            spooled = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE)  # noqa: SIM115 (closed in on_finish)
            spooled.write(self._body.getvalue())
            self._body = spooled
        self._body.write(chunk)

    def check_xsrf_cookie(self) -> None:
        """Leave CSRF to Django's CsrfViewMiddleware, even if the app sets ``xsrf_cookies``."""

    def compute_etag(self) -> None:
        """Send no automatic ETag: Django's ConditionalGetMiddleware decides that."""

    # The request's journey.

    async def get(self) -> None:
        """Hand the request to Django, then write what it answers."""
        bridge = self.bridge
        environ = _wsgi_environ(self.request, self._body, self)
        kind = bridge.route(environ)
        self._in_django = True
        try:
            if kind is _COROUTINE:
                # As in Django's ASGIHandler: sync code this request calls through
                # sync_to_async shares one thread of its own.
                async with ThreadSensitiveContext():
                    response = await self._cancel_on_disconnect(bridge.get_response_async(environ))
            else:
                executor = bridge.reserved_executor if kind is _DEFERRING else bridge.executor
                response = await bridge.run_blocking(executor, bridge.get_response, environ)
        finally:
            self._in_django = False
        if response is None:  # the client left and the view was cancelled
            await sync_to_async(signals.request_finished.send)(sender=WSGIHandler)
        elif isinstance(response, _DeferredResponse):
            await self._answer_later(response)
        else:
            await self._write_response(response)

    head = post = put = patch = delete = options = get

    async def _write_response(self, response: HttpResponseBase) -> None:
        """Write Django's response: headers, then the body at once or chunk by chunk."""
        if self._waiting_for_django:
            _logger.warning("%s %s: middleware replaced the response the view had started", self.request.method, self.request.uri)
            self._waiting_for_django = []
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
            if response.streaming:
                await self.bridge.close_response(response)
        elif response.streaming:
            await self._stream(response)
        else:
            self.finish(response.content)

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
            self.request.connection.close()
        finally:
            await self.bridge.close_response(response)
        if not self.request.connection.stream.closed():
            self.finish()

    async def _write_async_chunks(self, response: HttpResponseBase) -> None:
        async with contextlib.aclosing(aiter(response)) as chunks:
            async for chunk in chunks:
                await self._write_chunk(chunk)

    async def _write_chunk(self, chunk: bytes) -> None:
        if chunk:
            self.write(chunk)
            await self.flush()

    async def _cancel_on_disconnect(self, coroutine: Awaitable[Any]) -> Any:
        """Await ``coroutine`` in a task that the client leaving cancels; None if it did."""
        self._task = asyncio.ensure_future(coroutine)
        try:
            await asyncio.wait([self._task])
            return None if self._task.cancelled() else self._task.result()
        finally:
            self._task = None

    # Answering later: the @asynchronous contract.

    async def _answer_later(self, placeholder: _DeferredResponse) -> None:
        """Keep the connection open until the view calls ``finish()``, the client leaves or time runs out."""
        for name, value in _response_headers(placeholder):
            lower_name = name.lower()
            if lower_name in _PLACEHOLDER_ONLY_HEADERS or lower_name in self._headers_set_meanwhile:
                continue  # the view's own choice wins
            if name == "Set-Cookie":
                super().add_header(name, value)
            else:
                super().set_header(name, value)
        waiting, self._waiting_for_django = self._waiting_for_django, []
        for operation in waiting:
            operation()
        if self._done:
            return
        self._answered = self.loop.asyncio_loop.create_future()
        self.bridge.deferred_handlers.add(self)
        if placeholder.timeout is not None:
            self._expiry = self.loop.call_later(placeholder.timeout, self._expire, placeholder.timeout)
        try:
            await self._answered
        finally:
            self.bridge.deferred_handlers.discard(self)

    def _expire(self, timeout: float) -> None:
        """End a deferred request whose view did not answer in time with 504."""
        _logger.warning("%s %s: the view did not answer within %s s", self.request.method, self.request.uri, timeout)
        self._expiry = None
        self._abandon()
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
            if self._done:
                return
            try:
                callback(*args, *more_args, **kwargs, **more_kwargs)
            except Exception:
                _logger.exception("Error in callback for %s %s", self.request.method, self.request.uri)
                self._fail(500)

        @functools.wraps(callback)
        def call_on_loop(*more_args: Any, **more_kwargs: Any) -> None:
            if self._on_loop_thread():
                run(*more_args, **more_kwargs)
            else:
                self.loop.add_callback(run, *more_args, **more_kwargs)

        return call_on_loop

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _call_on_loop_and_wait(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``function`` on the IOLoop and wait for its result (from a pool thread)."""
        if self._on_loop_thread():
            return function(*args, **kwargs)
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function(*args, **kwargs))
            except BaseException as error:  # noqa: BLE001 (re-raised in the waiting thread)
                result.set_exception(error)

        self.loop.add_callback(run)
        return result.result()

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the IOLoop if the request ends without the view's answer.

        That is: the client went away, the view's timeout struck, or the server
        is shutting down. Use it to drop a waiter at once. If that has already
        happened (the client left while middleware ran), ``callback`` runs soon.
        """
        if self._abandoned:
            self.loop.add_callback(callback)
        else:
            self._disconnect_callbacks.append(callback)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._task is not None:
            self._task.cancel()
        self._abandon()
        self._mark_done()

    def on_finish(self) -> None:
        self._mark_done()
        self._body.close()

    def _abandon(self) -> None:
        """Run the disconnect callbacks, once, unless the view has answered."""
        callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
        if self._done:
            return
        self._abandoned = True
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _logger.exception("Error in disconnect callback for %s %s", self.request.method, self.request.uri)

    def _mark_done(self) -> None:
        self._done = True
        self._disconnect_callbacks = []
        if self._expiry is not None:
            self.loop.remove_timeout(self._expiry)
            self._expiry = None
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)

    def _fail(self, status_code: int) -> None:
        """End the request with an error page, or cut it off if the answer had started."""
        if self._done:
            return
        if self._headers_sent:
            self.request.connection.close()
            self._mark_done()
        else:
            self.send_error(status_code)

    # While Django's middleware still holds the placeholder, a late answer waits for its headers.

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        if self._in_django:
            return self._after_django(lambda: self.flush(include_footers))
        self._headers_sent = True
        return super().flush(include_footers)

    def finish(self, chunk: str | bytes | dict | None = None) -> asyncio.Future[None]:
        if self._in_django:
            if self._finish_waiting is None:  # send_error() may ask twice; finish once
                self._finish_waiting = self._after_django(lambda: self.finish(chunk))
            return self._finish_waiting
        return super().finish(chunk)

    def set_header(self, name: str, value: Any) -> None:
        if self._in_django:
            self._headers_set_meanwhile.add(name.lower())
        super().set_header(name, value)

    def add_header(self, name: str, value: Any) -> None:
        if self._in_django:
            self._headers_set_meanwhile.add(name.lower())
        super().add_header(name, value)

    def clear_header(self, name: str) -> None:
        if self._in_django:
            self._headers_set_meanwhile.add(name.lower())
        super().clear_header(name)

    def _after_django(self, operation: Callable[[], asyncio.Future[None]]) -> asyncio.Future[None]:
        result = self.loop.asyncio_loop.create_future()

        def run() -> None:
            try:
                tornado.concurrent.chain_future(operation(), result)
            except Exception as error:  # noqa: BLE001 (handed to whoever awaits the result)
                result.set_exception(error)

        self._waiting_for_django.append(run)
        return result


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
            handler = _handler_of(request, view)
            response = await view(request, handler, *args, **kwargs)
            return _DeferredResponse(timeout) if response is None else response

    else:

        @functools.wraps(view)
        def deferring_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            handler = _handler_of(request, view)
            response = handler._call_on_loop_and_wait(view, request, handler, *args, **kwargs)
            return _DeferredResponse(timeout) if response is None else response

    deferring_view.tornado_asynchronous = True
    return deferring_view


def _handler_of(request: HttpRequest, view: Callable[..., Any]) -> DjangoHandler:
    try:
        return request.META[_HANDLER_ENVIRON_KEY]
    except KeyError:
        raise RuntimeError(
            f"The view {view.__module__}.{view.__qualname__} is @asynchronous and needs the Tornado "
            "handler: serve it with django_tornado (make_app, serve or runtornado)."
        ) from None


# -- Wiring: the Tornado application -------------------------------------------


def make_app(
    handlers: Iterable[Any] = (),
    *,
    threads: int | None = None,
    **tornado_settings: Any,
) -> tornado.web.Application:
    """Return a Tornado Application: ``handlers`` first, then Django for every other path.

    ``threads`` sizes the pool plain views run in (default: ``min(32, CPUs + 4)``);
    0 runs them on the IOLoop thread, as the original django_tornado did.
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
    bridge = _DjangoBridge(threads)
    app = tornado.web.Application([*handlers, (r".*", DjangoHandler, {"bridge": bridge})], **tornado_settings)
    app.django_bridge = bridge
    app.django_executor = bridge.executor
    return app
