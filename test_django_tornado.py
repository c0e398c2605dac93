"""Tests for django_tornado: real Tornado servers on loopback, real HTTP clients, no mocks.

Each test's tiny views sit right above it; ``@route`` adds them to this
module's urlconf.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import http.client
import io
import itertools
import json
import os
import pathlib
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import ClassVar

import django
import pytest
import requests
import tornado
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.websocket
from django.conf import settings
from django.test.utils import override_settings

_DATABASE_DIR = tempfile.mkdtemp(prefix="django_tornado_test_")
settings.configure(
    DEBUG=False,
    SECRET_KEY="django-tornado-tests",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(_DATABASE_DIR, "db.sqlite3")}},
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
    ],
    MIDDLEWARE=[  # Django's default stack, as startproject writes it
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast, for tests only
)
django.setup()

# Imported once settings are configured:
from django.contrib.auth import authenticate, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.management import call_command
from django.http import (
    FileResponse,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.middleware.csrf import get_token
from django.urls import path, reverse
from django.views.decorators.csrf import csrf_exempt

import django_tornado
from django_tornado import Channel, EventStream, WebSocket, asynchronous, make_app

urlpatterns = []
TIMEOUT = 10  # seconds any single client call may take before the test fails
HERE = pathlib.Path(__file__).resolve().parent
# Headless Chromium as root in a sandbox with no network beyond loopback.
CHROMIUM_ARGUMENTS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def route(pattern):
    """Add the decorated view to this module's urlconf at ``pattern``."""

    def register(view):
        urlpatterns.append(path(pattern, view, name=view.__name__))
        return view

    return register


# -- A live server ---------------------------------------------------------------


class LiveServer:
    """Serve ``app`` with a real HTTPServer on a free loopback port, in a thread of its own."""

    def __init__(self, app, **server_options):
        self.app = app
        self.server_options = server_options
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self):
        server = tornado.httpserver.HTTPServer(self.app, **self.server_options)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.loop = asyncio.get_running_loop()
        self.thread_id = threading.get_ident()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()
        self.app.django_bridge.shutdown()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "server did not start"
        return self

    def __exit__(self, *exc_info):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)


@pytest.fixture(scope="session", autouse=True)
def database():
    call_command("migrate", verbosity=0)


class EchoWebSocket(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message("echo: " + message)


@pytest.fixture(scope="module")
def server(database):
    with LiveServer(make_app([(r"/ws", EchoWebSocket)], threads=4)) as live:
        yield live


def get(server, path, **kwargs):
    return requests.get(server.url(path), timeout=TIMEOUT, **kwargs)


def wait_for(condition, timeout=5.0):
    """Wait until ``condition()`` is true (polling a cross-thread state), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def now_stamp():
    """Milliseconds since the epoch: the clock channel ids (and node_chat's stamps) come from."""
    return int(time.time() * 1000)


def raw_request(server, request_bytes):
    """Send raw bytes; return the connected socket for the caller to read and close."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    connection.sendall(request_bytes)
    return connection


# -- Plain views run in the pool ------------------------------------------------

slow_view_release = threading.Event()
slow_views_running = []


@route("slow")
def slow(request):
    slow_views_running.append(request)
    try:
        slow_view_release.wait(2)
    finally:
        slow_views_running.remove(request)
    return HttpResponse("slow")


@route("fast")
def fast(request):
    return JsonResponse({"fast": True, "thread": threading.get_ident()})


def test_a_slow_sync_view_does_not_delay_a_fast_one(server):
    slow_view_release.clear()
    with contextlib.closing(raw_request(server, b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) as slow_client:
        started = time.monotonic()
        response = get(server, "/fast")
        elapsed = time.monotonic() - started
        slow_view_release.set()
        assert slow_client.recv(1024).startswith(b"HTTP/1.1 200")
    assert response.json()["fast"] is True
    assert elapsed < 0.2
    assert response.json()["thread"] != server.thread_id  # ran in the pool, not on the IOLoop


@route("echo")
@csrf_exempt
def echo(request):
    return JsonResponse(
        {
            "method": request.method,
            "path": request.path,
            "query": request.GET.dict(),
            "body": request.body.decode(),
            "content_type": request.content_type,
            "remote_addr": request.META["REMOTE_ADDR"],
            "secure": request.is_secure(),
            "host": request.get_host(),
            "custom": request.META.get("HTTP_X_CUSTOM"),
        }
    )


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_reaches_the_view_with_its_body(server, method):
    response = requests.request(method, server.url("/echo?a=1&b=%C3%A9"), data=b"payload", timeout=TIMEOUT)
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == method
    assert seen["query"] == {"a": "1", "b": "é"}
    assert seen["body"] == "payload"


def test_head_sends_the_headers_of_get_without_a_body(server):
    got = get(server, "/fast")
    head = requests.head(server.url("/fast"), timeout=TIMEOUT)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(got.content))
    assert head.headers["Content-Type"] == "application/json"


def test_a_chunked_request_body_arrives_whole(server):
    response = requests.post(server.url("/echo"), data=iter([b"abc", b"def"]), timeout=TIMEOUT)
    assert response.json()["body"] == "abcdef"


@route("unicode/<str:word>")
def unicode_word(request, word):
    return JsonResponse({"word": word, "path": request.path})


def test_path_is_percent_decoded_as_utf8(server):
    response = get(server, "/unicode/caf%C3%A9%20cr%C3%A8me")
    assert response.json() == {"word": "café crème", "path": "/unicode/café crème"}


@pytest.mark.parametrize("bad_path", ["/unicode/%ff%fe", "/echo?q=%ff&r=%zz", "/unicode/%E2%82"])
def test_bad_percent_encoding_is_answered_not_crashed(server, bad_path):
    response = get(server, bad_path)
    assert response.status_code in (200, 400, 404)
    assert "Traceback" not in response.text


def test_proxy_headers_are_ignored_without_xheaders(server):
    response = get(server, "/echo", headers={"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "X-Forwarded-Proto": "https"})
    assert response.json()["remote_addr"] == "127.0.0.1"
    assert response.json()["secure"] is False


def test_proxy_headers_are_trusted_with_xheaders(database):
    with LiveServer(make_app(threads=1), xheaders=True) as trusting:
        response = get(trusting, "/echo", headers={"X-Real-IP": "203.0.113.9", "X-Forwarded-Proto": "https"})
    assert response.json()["remote_addr"] == "203.0.113.9"
    assert response.json()["secure"] is True


def test_headers_spelled_with_underscores_are_dropped(server):
    with contextlib.closing(raw_request(server, b"GET /echo HTTP/1.0\r\nHost: 127.0.0.1\r\nX_Custom: spoofed\r\n\r\n")) as client:
        answer = b"".join(iter(lambda: client.recv(65536), b""))
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["custom"] is None
    assert get(server, "/echo", headers={"X-Custom": "kept"}).json()["custom"] == "kept"


@route("where")
def where(request):
    return JsonResponse({"path": request.path, "url": reverse("where")})


def test_force_script_name_prefixes_paths_and_urls(server):
    with override_settings(FORCE_SCRIPT_NAME="/mounted"):
        assert get(server, "/where").json() == {"path": "/mounted/where", "url": "/mounted/where"}
    assert get(server, "/where").json() == {"path": "/where", "url": "/where"}


@route("cookies")
def cookies(request):
    response = HttpResponse("three cookies")
    for name in ("first", "second", "third"):
        response.set_cookie(name, name.upper())
    return response


def test_several_set_cookie_headers_all_arrive(server):
    response = get(server, "/cookies")
    assert response.raw.headers.getlist("Set-Cookie")[:3] == [
        "first=FIRST; Path=/",
        "second=SECOND; Path=/",
        "third=THIRD; Path=/",
    ]
    assert response.cookies.get_dict() == {"first": "FIRST", "second": "SECOND", "third": "THIRD"}


@route("status/<int:code>")
def status(request, code):
    return HttpResponse("a body HTTP forbids here", status=code)


@pytest.mark.parametrize("code", [204, 304])
def test_bodyless_statuses_send_no_body_and_keep_the_connection_usable(server, code):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.request("GET", f"/status/{code}")
    response = connection.getresponse()
    assert (response.status, response.read()) == (code, b"")
    assert response.getheader("Content-Length") is None
    assert response.getheader("Transfer-Encoding") is None
    connection.request("GET", "/fast")  # the same keep-alive connection still works
    assert json.loads(connection.getresponse().read())["fast"] is True
    connection.close()


@route("upload")
@csrf_exempt
def upload(request):
    uploaded = request.FILES["document"]
    return JsonResponse(
        {
            "name": uploaded.name,
            "size": uploaded.size,
            "sha256": hashlib.sha256(uploaded.read()).hexdigest(),
            "title": request.POST["title"],
        }
    )


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])  # in memory, and spilled to disk
def test_multipart_upload(server, size):
    document = os.urandom(size)
    response = requests.post(
        server.url("/upload"),
        files={"document": ("report.bin", document)},
        data={"title": "Quarterly ✓"},
        timeout=TIMEOUT,
    )
    assert response.json() == {
        "name": "report.bin",
        "size": size,
        "sha256": hashlib.sha256(document).hexdigest(),
        "title": "Quarterly ✓",
    }


@route("boom")
def boom(request):
    raise ValueError("the view broke")


@pytest.mark.parametrize("debug", [False, True])
def test_404_and_500_pages_follow_debug(server, debug):
    with override_settings(DEBUG=debug):
        missing = get(server, "/no/such/page")
        broken = get(server, "/boom")
    assert missing.status_code == 404
    assert broken.status_code == 500
    assert ("the view broke" in broken.text) is debug  # the technical 500 page only with DEBUG
    assert ("URLconf" in missing.text) is debug
    assert get(server, "/fast").status_code == 200  # and the server keeps serving


def test_a_host_outside_allowed_hosts_gets_400(server):
    response = get(server, "/fast", headers={"Host": "evil.example"})
    assert response.status_code == 400


@route("form")
def form(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"csrf": get_token(request)})


@route("submit")
def submit(request):
    return JsonResponse({"visits": request.session.get("visits"), "said": request.POST.get("said")})


def test_csrf_protected_post_with_session_cookie_round_trip(server):
    browser = requests.Session()
    token = browser.get(server.url("/form"), timeout=TIMEOUT).json()["csrf"]
    assert {"sessionid", "csrftoken"} <= set(browser.cookies.keys())
    accepted = browser.post(server.url("/submit"), data={"csrfmiddlewaretoken": token, "said": "hi"}, timeout=TIMEOUT)
    assert accepted.json() == {"visits": 1, "said": "hi"}
    rejected = requests.post(server.url("/submit"), data={"said": "forged"}, cookies={"sessionid": browser.cookies["sessionid"]}, timeout=TIMEOUT)
    assert rejected.status_code == 403


def test_a_native_tornado_websocket_route_lives_beside_django(server):
    async def talk():
        connection = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{server.port}/ws")
        await connection.write_message("hello")
        reply = await asyncio.wait_for(connection.read_message(), TIMEOUT)
        connection.close()
        return reply

    assert asyncio.run(talk()) == "echo: hello"
    assert get(server, "/fast").status_code == 200


# -- Streaming ---------------------------------------------------------------------

stream_gate = threading.Event()
stream_closed = threading.Event()


@route("stream/sync")
def stream_sync(request):
    def chunks():
        try:
            yield b"first;"
            stream_gate.wait(TIMEOUT)
            yield b"second;"
        finally:
            stream_closed.set()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


@route("stream/async")
async def stream_async(request):
    async def chunks():
        try:
            yield b"first;"
            for _ in range(TIMEOUT * 100):
                if stream_gate.is_set():
                    break
                await asyncio.sleep(0.01)
            yield b"second;"
        finally:
            stream_closed.set()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_streaming_first_chunk_arrives_before_the_stream_ends(server, kind):
    stream_gate.clear()
    stream_closed.clear()
    with get(server, f"/stream/{kind}", stream=True) as response:
        chunks = response.iter_content(chunk_size=None)
        assert next(chunks) == b"first;"  # the iterator is still waiting at this point
        stream_gate.set()
        assert b"".join(chunks) == b"second;"
    assert "Content-Length" not in response.headers
    assert stream_closed.wait(TIMEOUT)


@route("stream/endless/<str:kind>")
def stream_endless(request, kind):
    def sync_chunks():
        try:
            for number in range(1000):
                yield b"tick %d\n" % number
                time.sleep(0.01)
        finally:
            stream_closed.set()

    async def async_chunks():
        try:
            yield b"tick 0\n"
            await asyncio.sleep(TIMEOUT * 2)  # cancelled when the client leaves
            yield b"never"
        finally:
            stream_closed.set()

    return StreamingHttpResponse(sync_chunks() if kind == "sync" else async_chunks())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_leaving_mid_stream_stops_and_closes_the_iterator(server, kind):
    stream_closed.clear()
    with contextlib.closing(raw_request(server, f"GET /stream/endless/{kind} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())) as client:
        received = b""
        while b"tick 0" not in received:
            chunk = client.recv(4096)
            assert chunk, f"closed before the first tick: {received!r}"
            received += chunk
    assert stream_closed.wait(5)


@route("stream/broken")
def stream_broken(request):
    def chunks():
        yield b"partial"
        raise RuntimeError("the iterator broke")

    return StreamingHttpResponse(chunks())


def test_an_iterator_raising_mid_stream_truncates_the_response(server, caplog):
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # no final empty chunk
        get(server, "/stream/broken")
    assert "failed mid-stream" in caplog.text
    assert get(server, "/fast").status_code == 200


@route("file")
def file_download(request):
    return FileResponse(open(request.GET["path"], "rb"), as_attachment=True, filename="data.bin")


def test_file_response_streams_the_whole_file(server, tmp_path):
    data = os.urandom(1024 * 1024 + 7)
    (tmp_path / "data.bin").write_bytes(data)
    response = get(server, "/file", params={"path": str(tmp_path / "data.bin")})
    assert response.content == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Disposition"] == 'attachment; filename="data.bin"'


# -- async def views ---------------------------------------------------------------


@route("coroutine")
async def coroutine(request):
    await tornado.gen.sleep(0.01)
    await asyncio.sleep(0.01)
    return JsonResponse({"thread": threading.get_ident(), "user": str(request.user)})


def test_async_def_views_run_on_the_ioloop(server):
    response = get(server, "/coroutine")
    assert response.json() == {"thread": server.thread_id, "user": "AnonymousUser"}


class ThreadNotingMiddleware:
    """Sync middleware that notes the thread it runs in."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.middleware_thread = threading.get_ident()
        return self.get_response(request)


class AsyncOnlyMiddleware:
    """Middleware that is async capable and not sync capable: Django adapts it with async_to_sync."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import markcoroutinefunction

        self.get_response = get_response
        markcoroutinefunction(self)  # as Django's docs have async middleware classes do

    async def __call__(self, request):
        request.async_only_loop = id(asyncio.get_running_loop())
        response = await self.get_response(request)
        response["X-Async-Only"] = "seen"
        return response


@route("threads-of-an-async-view")
async def threads_of_an_async_view(request):
    from asgiref.sync import sync_to_async

    return JsonResponse({
        "view": threading.get_ident(),
        "middleware": request.middleware_thread,
        "sync_to_async": await sync_to_async(threading.get_ident)(),  # thread_sensitive: the request's own thread
        "async_only_middleware_loop": request.async_only_loop,
        "view_loop": id(asyncio.get_running_loop()),
    })


@pytest.fixture(scope="module")
def noting_server(database):
    middleware = [*settings.MIDDLEWARE, "test_django_tornado.ThreadNotingMiddleware", "test_django_tornado.AsyncOnlyMiddleware"]
    with override_settings(MIDDLEWARE=middleware), LiveServer(make_app(threads=4)) as live:
        yield live


@pytest.mark.parametrize("path", ["/threads-of-an-async-view", "/fast"])
def test_async_def_views_run_their_middleware_in_a_thread_and_their_coroutine_on_the_ioloop(noting_server, path):
    response = get(noting_server, path)
    assert response.status_code == 200
    assert response.headers["X-Async-Only"] == "seen"  # async-only middleware runs, for either kind of view
    if path == "/fast":
        return
    threads = response.json()
    assert threads["view"] == noting_server.thread_id  # the coroutine is on the server's IOLoop
    assert threads["middleware"] != noting_server.thread_id
    assert threads["sync_to_async"] == threads["middleware"]  # and comes back to the request's thread
    assert threads["async_only_middleware_loop"] == threads["view_loop"]  # one loop, no loop per request


@route("async-stream-of-threads")
async def async_stream_of_threads(request):
    async def chunks():
        yield b"first\n"
        await asyncio.sleep(2)
        yield b"last\n"

    return StreamingHttpResponse(chunks())


def test_async_def_views_streaming_async_iterators_hold_no_thread(server):
    threads_before = threading.active_count()
    streams = []
    try:
        for _ in range(30):  # one after the other: each stream's thread is free again for the next
            streams.append(raw_request(server, b"GET /async-stream-of-threads HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            received = b""
            while b"first" not in received:
                received += streams[-1].recv(4096)
        assert threading.active_count() - threads_before <= 2  # 30 streams open, not 30 threads held
        assert get(server, "/fast").status_code == 200
    finally:
        for stream in streams:
            stream.close()


async_views_left = []


@route("await-forever")
async def await_forever(request):
    try:
        await asyncio.sleep(TIMEOUT * 2)
    except asyncio.CancelledError:
        async_views_left.append("cancelled")
        raise
    return JsonResponse({"woke": True})


def test_an_async_def_view_is_cancelled_when_its_client_leaves(server):
    async_views_left.clear()
    with contextlib.closing(raw_request(server, b"GET /await-forever HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")):
        time.sleep(0.2)  # the view is awaiting (nothing to wait for but the sleep itself)
    wait_for(lambda: async_views_left == ["cancelled"])
    assert get(server, "/fast").status_code == 200


# -- @asynchronous: the original project's contract ------------------------------
# The "Quick Tutorial" of the original README, verbatim, with what it leaves
# to the reader (Session, channel, ChatResponseError) defined first.


class ChatResponseError(JsonResponse):
    def __init__(self, message):
        super().__init__({"error": message}, status=400)


class Session:
    sessions: ClassVar[dict] = {}

    def __init__(self, id):
        self.id = id
        self.pokes = 0

    @classmethod
    def get(cls, id):
        return cls.sessions.get(id)

    def poke(self):
        self.pokes += 1


channel = Channel("chat")  # the one line the original README leaves to its reader


from django_tornado.decorator import asynchronous  # noqa: F811, I001 (the README's own import, kept verbatim)

@asynchronous
def recv(request, handler) :
    response = {}  # noqa: F841

    if 'since' not in request.GET :
        return ChatResponseError('Must supply since parameter')
    if 'id' not in request.GET :
        return ChatResponseError('Must supply id parameter')

    id = request.GET['id']
    session = Session.get(id)
    if session :
        session.poke()

    since = int(request.GET['since'])

    def on_new_messages(messages) :
        if handler.request.connection.stream.closed():
            return
        handler.finish({ 'messages': messages, 'rss' : channel.size() })

    channel.query(handler.async_callback(on_new_messages), since)

# (end of the original README's example)

route("recv")(recv)


@route("send")
@csrf_exempt
def send(request):
    event_id = channel.publish({"text": request.POST["text"]})  # in a pool thread
    return JsonResponse({"sent": event_id})


def readers_of(name):
    """How many readers channel ``name`` has in this process (long-polls, streams, listen loops)."""
    return sum(
        len(hub.watches[name].readers) if name in hub.watches else 0
        for backend in list(django_tornado._backends.values())
        for hub in list(backend.hubs.values())
    )


def test_the_original_readme_recv_example_runs_against_a_channel(server):
    Session.sessions["s1"] = Session("s1")
    since = now_stamp()
    with requests.Session() as poller:
        pending = threading.Thread(target=lambda: results.append(poller.get(server.url(f"/recv?since={since}&id=s1"), timeout=TIMEOUT)))
        results = []
        pending.start()
        wait_for(lambda: readers_of("chat") == 1)  # parked, holding no thread
        sent = requests.post(server.url("/send"), data={"text": "hello"}, timeout=TIMEOUT).json()["sent"]
        pending.join(TIMEOUT)
    response = results[0]
    assert response.status_code == 200
    assert response.json() == {"messages": [{"id": sent, "data": {"text": "hello"}}], "rss": channel.size()}
    assert sent > since
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert Session.sessions["s1"].pokes == 1
    # Already-available messages come back at once; bad input gets the view's own 400.
    assert get(server, f"/recv?since={since}&id=s1").json()["messages"][0]["data"]["text"] == "hello"
    assert get(server, "/recv?id=s1").status_code == 400


def test_a_long_poll_that_leaves_leaves_no_reader_behind(server):
    """The original example never cancels its query: the request ending does it."""
    with contextlib.closing(raw_request(server, f"GET /recv?since={now_stamp() + 10**9}&id=s1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())):
        wait_for(lambda: readers_of("chat") == 1)
    wait_for(lambda: readers_of("chat") == 0)


waiters = []
waiter_parked = threading.Event()


@route("wait")
@asynchronous
def wait(request, handler):
    request.session["waiting"] = True  # so SessionMiddleware sets a cookie on the late answer
    callback = handler.async_callback(lambda text: handler.finish({"text": text, "thread": threading.get_ident()}))
    waiters.append(callback)
    handler.add_disconnect_callback(lambda: waiters.remove(callback))
    waiter_parked.set()


def wake_waiters(text):
    """Call every parked waiter from this (non-IOLoop) thread."""
    while waiters:
        waiters.pop()(text)


def test_async_callback_from_another_thread_answers_on_the_ioloop_with_middleware_headers(server):
    waiter_parked.clear()
    results = []
    pending = threading.Thread(target=lambda: results.append(get(server, "/wait")))
    pending.start()
    assert waiter_parked.wait(TIMEOUT)
    wake_waiters("late")
    pending.join(TIMEOUT)
    response = results[0]
    assert response.json() == {"text": "late", "thread": server.thread_id}
    # Headers Django's middleware put on the placeholder reach the late answer.
    assert "sessionid" in response.cookies
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Cookie" in response.headers["Vary"]
    assert "no-store" in response.headers["Cache-Control"]


def test_a_client_leaving_drops_its_waiter(server):
    waiter_parked.clear()
    with contextlib.closing(raw_request(server, b"GET /wait HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")):
        assert waiter_parked.wait(TIMEOUT)
        assert len(waiters) == 1
    wait_for(lambda: not waiters)


def after_the_client_left(view):
    """Hold the request in middleware-land (a pool thread) until its client has gone."""

    @functools.wraps(view)
    def held(request, *args, **kwargs):
        stream = request.META["tornado.handler"].request.connection.stream
        deadline = time.monotonic() + TIMEOUT
        while not stream.closed() and time.monotonic() < deadline:
            time.sleep(0.01)
        return view(request, *args, **kwargs)

    return held


@route("wait-late")
@after_the_client_left
@asynchronous
def wait_late(request, handler):
    callback = handler.async_callback(lambda: handler.finish("never sent"))
    waiters.append(callback)
    handler.add_disconnect_callback(lambda: waiters.remove(callback))
    waiter_parked.set()


def test_a_waiter_registered_after_its_client_left_is_dropped_too(server):
    waiter_parked.clear()
    with contextlib.closing(raw_request(server, b"GET /wait-late HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")):
        pass
    assert waiter_parked.wait(TIMEOUT)
    wait_for(lambda: not waiters)


def test_clients_that_leave_as_they_ask_leave_no_waiter_behind(server):
    for _ in range(50):
        with contextlib.closing(raw_request(server, b"GET /wait HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")):
            pass  # closed at once, maybe before the server has read the request
    wait_for(lambda: not waiters and not server.app.django_bridge.active_handlers)


@route("answer-at-once")
@asynchronous
def answer_at_once(request, handler):
    return JsonResponse({"handler": type(handler).__name__})


def test_an_asynchronous_view_may_return_a_response(server):
    assert get(server, "/answer-at-once").json() == {"handler": "DjangoHandler"}


@route("answer-inside")
@asynchronous
def answer_inside(request, handler):
    request.session["inside"] = True
    handler.set_header("Cache-Control", "max-age=5")  # the view's own header wins over the placeholder's
    handler.finish("answered inside the view")  # before middleware has finished: waits for its headers


def test_finishing_inside_the_view_still_carries_middleware_headers(server):
    response = get(server, "/answer-inside")
    assert response.text == "answered inside the view"
    assert "sessionid" in response.cookies
    assert response.headers["Cache-Control"] == "max-age=5"


@route("never")
@asynchronous(timeout=0.2)
def never(request, handler):
    handler.add_disconnect_callback(never_abandoned.set)


never_abandoned = threading.Event()


def test_a_deferred_request_times_out_with_504(server):
    never_abandoned.clear()
    response = get(server, "/never")
    assert response.status_code == 504
    assert never_abandoned.is_set()


failing_callbacks = []


@route("fail-later")
@asynchronous
def fail_later(request, handler):
    def broken(_):
        raise KeyError("no such thing")

    failing_callbacks.append(handler.async_callback(broken))


def test_an_exception_in_a_deferred_callback_ends_that_request_with_500(server, caplog):
    results = []
    pending = threading.Thread(target=lambda: results.append(get(server, "/fail-later")))
    pending.start()
    wait_for(lambda: failing_callbacks)
    failing_callbacks.pop()(None)
    pending.join(TIMEOUT)
    assert results[0].status_code == 500
    assert "Error in callback for GET /fail-later" in caplog.text
    assert get(server, "/fast").status_code == 200


@route("coroutine-asynchronous")
@asynchronous
async def coroutine_asynchronous(request, handler):
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.01, handler.finish, {"late": True})


def test_asynchronous_decorates_async_def_views_too(server):
    assert get(server, "/coroutine-asynchronous").json() == {"late": True}


def test_asynchronous_views_and_async_def_views_answer_while_slow_views_fill_the_pool(database):
    slow_view_release.clear()
    with LiveServer(make_app(threads=2)) as small:
        slow_clients = [raw_request(small, b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") for _ in range(4)]
        wait_for(lambda: len(slow_views_running) == 2)  # the pool is full; two more wait in its queue
        started = time.monotonic()
        assert get(small, "/answer-at-once").status_code == 200
        assert get(small, "/coroutine").status_code == 200
        elapsed = time.monotonic() - started
        slow_view_release.set()
        for client in slow_clients:
            assert client.recv(1024).startswith(b"HTTP/1.1 200")  # the queued ones complete too
            client.close()
    assert elapsed < 1


def test_the_decorator_needs_django_tornado_to_serve_the_view():
    from django.test import Client

    with pytest.raises(RuntimeError, match="test_django_tornado.answer_at_once is @asynchronous"):
        Client().get("/answer-at-once", HTTP_HOST="127.0.0.1")


# -- threads=0: the original single-threaded mode -----------------------------------


@route("signup")
@csrf_exempt
def signup(request):
    user = User.objects.create_user(request.POST["username"], password=request.POST["password"])
    login(request, authenticate(request, username=user.username, password=request.POST["password"]))
    return JsonResponse({"thread": threading.get_ident()})


@route("whoami")
def whoami(request):
    return JsonResponse({"username": request.user.username})


def test_threads_zero_runs_views_on_the_ioloop_with_the_orm_working(database):
    with LiveServer(make_app(threads=0)) as single, requests.Session() as browser:
        assert single.app.django_executor is None
        signed_up = browser.post(single.url("/signup"), data={"username": "ada", "password": "s3cret!"}, timeout=TIMEOUT)
        assert signed_up.status_code == 200
        assert signed_up.json()["thread"] == single.thread_id
        assert browser.get(single.url("/whoami"), timeout=TIMEOUT).json() == {"username": "ada"}


def test_threads_must_not_be_negative():
    with pytest.raises(ValueError, match="threads must be 0 or more, not -1"):
        make_app(threads=-1)


def test_module_exports_a_small_api():
    assert django_tornado.__all__ == [
        "Channel", "ChannelUnavailable", "Command", "DjangoHandler", "EventStream", "WebSocket", "asynchronous", "main", "make_app", "serve",
    ]


# -- Live updates: Channel, query, listen() and EventStream in one process ------------


def run_on_a_loop(coroutine_function, timeout=TIMEOUT):
    """Run ``coroutine_function()`` on an event loop of its own in another thread; return its result."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, asyncio.wait_for(coroutine_function(), timeout)).result(timeout + 5)


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    """Each test with this fixture runs once on this process's memory and once on a real redis-server."""
    if request.param == "memory":
        yield "memory://"
    else:
        url = request.getfixturevalue("redis_url")
        with override_settings(TORNADO_CHANNELS_URL=url):
            yield url


def test_concurrent_publishers_get_strictly_increasing_ids_and_lose_nothing(backend):
    news = Channel(f"concurrent.{time.monotonic_ns()}", backlog=5000)
    heard = []

    async def listen():
        started.set()
        async for event in news.listen():
            heard.append(event)
            if len(heard) == 2000:
                return

    def publish(thread):
        return [news.publish({"thread": thread, "index": index}) for index in range(500)]

    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        listening = pool.submit(run_on_a_loop, listen)
        assert started.wait(TIMEOUT)
        wait_for(lambda: readers_of(news.name) == 1)
        ids_by_thread = list(pool.map(publish, range(4)))
        listening.result(TIMEOUT)
    for ids in ids_by_thread:
        assert ids == sorted(ids) and len(set(ids)) == 500  # each publisher's ids strictly increase
    all_ids = sorted(event_id for ids in ids_by_thread for event_id in ids)
    assert len(set(all_ids)) == 2000  # none reused
    backlog = news.since(0)
    assert [event["id"] for event in backlog] == all_ids  # the backlog holds each once, in id order
    assert [event["id"] for event in heard] == all_ids  # and a reader heard each once, in order
    for ids, thread in zip(ids_by_thread, range(4)):
        mine = [event["data"]["index"] for event in backlog if event["data"]["thread"] == thread]
        assert mine == list(range(500))  # in the order each thread published
    assert news.size() == 2000
    assert abs(all_ids[0] - now_stamp()) < 60_000  # ids come from the millisecond clock


def test_publishing_refuses_what_json_cannot_carry_and_names_the_type():
    news = Channel("refusals")
    with pytest.raises(TypeError, match="set"):
        news.publish({"tags": {"a", "b"}})
    with pytest.raises(TypeError, match="datetime"):
        news.publish(datetime.datetime.now())
    with pytest.raises(TypeError, match="JSON"):
        news.publish(float("nan"))
    with pytest.raises(ValueError, match="event name"):
        news.publish("x", event="two\nlines")
    assert news.size() == 0


@pytest.mark.parametrize("name", ["", "x" * 201, "with space", "slash/", "ünïcode", None, 5])
def test_a_channel_name_is_letters_digits_and_a_few_marks(name):
    with pytest.raises(ValueError, match="channel name"):
        Channel(name)


def test_channel_names_and_options_that_are_fine():
    assert Channel("user.42:inbox_v-1").name == "user.42:inbox_v-1"
    assert Channel("x" * 200, backlog=1, retention=0.5).backlog == 1
    with pytest.raises(ValueError, match="backlog"):
        Channel("ok", backlog=0)
    with pytest.raises(ValueError, match="retention"):
        Channel("ok", retention=0)


@pytest.mark.parametrize("since", [-1, "5", 1.5, None, True])
def test_reading_after_something_that_is_not_an_event_id_is_a_value_error(since):
    news = Channel("bad-since")
    with pytest.raises(ValueError, match="event id"):
        news.since(since)
    with pytest.raises(ValueError, match="event id"):
        news.query(print, since)


def test_an_event_is_a_mapping_that_json_encodes_as_it_is(backend):
    news = Channel(f"shape.{time.monotonic_ns()}")
    first = news.publish([1, "two", {"three": None}])
    named = news.publish("hello", event="greeting")
    assert json.loads(json.dumps(news.since(0))) == [
        {"id": first, "data": [1, "two", {"three": None}]},
        {"id": named, "data": "hello", "event": "greeting"},
    ]
    assert news.since(first) == [{"id": named, "data": "hello", "event": "greeting"}]


def test_published_data_is_a_copy_of_what_the_publisher_passed():
    news = Channel("copies")
    data = {"items": [1]}
    news.publish(data)
    data["items"].append(2)
    assert news.since(0)[-1]["data"] == {"items": [1]}


def test_query_answers_at_once_or_at_the_next_publish_on_the_ioloop_and_can_be_cancelled(backend):
    news = Channel(f"query.{time.monotonic_ns()}")
    first = news.publish("first")

    async def scenario():
        loop_thread = threading.get_ident()
        answers = {name: asyncio.get_running_loop().create_future() for name in ("now", "later")}

        def answer(name):
            return lambda events: answers[name].set_result((events, threading.get_ident()))

        news.query(answer("now"), 0)
        news.query(answer("later"), first)
        cancelled = []
        cancel = news.query(cancelled.append, first)
        cancel()
        now_events, now_thread = await answers["now"]
        assert [event["data"] for event in now_events] == ["first"]
        assert not answers["later"].done()
        second = await asyncio.to_thread(news.publish, "second")  # from another thread
        later_events, later_thread = await answers["later"]
        assert later_events == [{"id": second, "data": "second"}]
        assert now_thread == later_thread == loop_thread
        await asyncio.sleep(0.05)
        return cancelled

    assert run_on_a_loop(scenario) == []  # a cancelled query hears nothing


def test_listen_yields_the_backlog_after_since_then_new_events_holding_no_thread(backend):
    news = Channel(f"listen.{time.monotonic_ns()}")
    first = news.publish(1)
    news.publish(2)

    async def scenario():
        heard = []
        threads_before = threading.active_count()
        async for event in news.listen(since=first):
            heard.append(event["data"])
            if len(heard) == 1:
                assert threading.active_count() == threads_before
                await asyncio.to_thread(news.publish, 3)
            if len(heard) == 2:
                return heard

    assert run_on_a_loop(scenario) == [2, 3]


def test_a_reader_outrun_by_the_backlog_hears_reset_first(backend):
    news = Channel(f"outrun.{time.monotonic_ns()}", backlog=3)
    ids = [news.publish(number) for number in range(6)]

    async def scenario():
        heard = []
        async for event in news.listen(since=ids[0]):
            heard.append(event)
            if len(heard) == 4:
                return heard

    reset, *rest = run_on_a_loop(scenario)
    assert reset == {"id": ids[2], "data": None, "event": "reset"}  # the last id that is gone
    assert [event["data"] for event in rest] == [3, 4, 5]
    assert [event["data"] for event in news.since(0)] == [3, 4, 5]


def test_a_memory_channel_nobody_uses_is_forgotten_after_its_retention():
    backend = django_tornado._channel_backend()
    brief = Channel(f"brief.{time.monotonic_ns()}", retention=0.2)
    brief.publish("soon gone")
    assert brief.name in backend.channels
    time.sleep(0.3)
    backend.next_sweep = 0  # the sweep runs every few seconds; make this publish run it now
    Channel("another").publish("x")
    assert brief.name not in backend.channels
    assert brief.size() == 0


def test_redis_keeps_a_channel_for_its_retention_then_nothing(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    brief = Channel(f"brief.{time.monotonic_ns()}", retention=1)
    with override_settings(TORNADO_CHANNELS_URL=redis_url):
        brief.publish("soon gone")
        keys = client.keys(f"*{brief.name}*")
        assert len(keys) == 2 and all(0 < client.ttl(key) <= 1 for key in keys)
        wait_for(lambda: not client.keys(f"*{brief.name}*"), timeout=3)
        assert brief.size() == 0


news_feed = Channel("feed")
small_feed = Channel("small-feed", backlog=3)


@route("feed/events")
def feed_events(request):
    return EventStream(small_feed if "small" in request.GET else news_feed, request, keepalive=float(request.GET.get("keepalive", 15)))


class EventStreamClient:
    """A raw HTTP client of an event stream: the head, then each event as a dict of its fields."""

    def __init__(self, server_or_port, path, headers=()):
        port = server_or_port if isinstance(server_or_port, int) else server_or_port.port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        self.connection.request("GET", path, headers=dict(headers))
        self.response = self.connection.getresponse()

    def next_frame(self):
        """The next block of lines (an event, a comment, a ``retry:``) as a dict; None at the end."""
        fields = {}
        while (line := self.response.readline()) not in (b"\n", b""):
            name, _, value = line.decode().rstrip("\n").partition(":")
            fields[name] = value.removeprefix(" ")
        return fields if fields or line else None

    def next_event(self):
        while (frame := self.next_frame()) is not None:
            if "data" in frame:
                return frame
        return None

    def close(self):
        self.connection.close()


def test_an_event_stream_sends_each_event_as_sse_fields(server):
    client = EventStreamClient(server, "/feed/events?keepalive=0.3")
    try:
        assert client.response.status == 200
        assert client.response.getheader("Content-Type") == "text/event-stream"
        assert client.response.getheader("Cache-Control") == "no-cache"
        assert client.response.getheader("X-Accel-Buffering") == "no"
        assert client.next_frame() == {"retry": "2000"}
        wait_for(lambda: readers_of("feed") >= 1)
        first = news_feed.publish({"title": "Hello", "lines": "a\nb"})
        named = news_feed.publish([1, 2], event="numbers")
        assert client.next_frame() == {"id": str(first), "data": '{"title":"Hello","lines":"a\\nb"}'}
        assert client.next_frame() == {"id": str(named), "event": "numbers", "data": "[1,2]"}
        assert client.next_frame() == {"": ""}  # a comment after 0.3 s without events
    finally:
        client.close()
    wait_for(lambda: readers_of("feed") == 0)  # the client leaving ended it


def test_an_event_stream_replays_what_the_client_missed_after_last_event_id_or_since(server):
    ids = [news_feed.publish(number) for number in range(3)]
    for headers, query in [({"Last-Event-ID": str(ids[0])}, ""), ({}, f"?since={ids[0]}"), ({"Last-Event-ID": str(ids[0])}, f"?since={ids[2]}")]:
        client = EventStreamClient(server, "/feed/events" + query, headers)
        try:
            assert [client.next_event()["data"] for _ in range(2)] == ["1", "2"]
        finally:
            client.close()


def test_an_event_stream_outrun_by_the_backlog_sends_reset_first(server):
    ids = [small_feed.publish(number) for number in range(6)]
    client = EventStreamClient(server, f"/feed/events?small&since={ids[0]}")
    try:
        assert client.next_event() == {"id": str(ids[2]), "event": "reset", "data": "null"}
        assert [client.next_event()["data"] for _ in range(3)] == ["3", "4", "5"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("headers", "query"),
    [({}, "?since=abc"), ({}, "?since=-1"), ({}, "?since=" + "9" * 20), ({"Last-Event-ID": "1.5"}, ""), ({"Last-Event-ID": "x"}, "?since=1")],
)
def test_an_event_stream_answers_an_id_that_is_not_one_with_400(server, headers, query):
    response = get(server, "/feed/events" + query, headers=headers)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert len(response.text.strip().splitlines()) == 1
    assert "must be an event id" in response.text


def test_idle_event_streams_hold_no_thread(server):
    clients = [EventStreamClient(server, "/feed/events") for _ in range(12)]  # the pool has 4 threads
    try:
        for client in clients:
            assert client.next_frame() == {"retry": "2000"}
        assert get(server, "/fast").json()["fast"] is True
        event_id = news_feed.publish("to all")
        for client in clients:
            assert client.next_event()["id"] == str(event_id)
    finally:
        for client in clients:
            client.close()


def test_an_event_stream_needs_django_tornado_to_serve_it():
    from django.test import Client

    response = Client().get("/feed/events", HTTP_HOST="127.0.0.1")
    assert response.status_code == 501
    assert "needs django_tornado" in response.content.decode()


# -- WebSocket endpoints that are Django views ----------------------------------------


class TaggingMiddleware:
    """A project's own middleware: what it sets on the request, a socket's ``self.request`` has."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.tagged_by_middleware = "tagged"
        return self.get_response(request)


class WhoAmI(WebSocket):
    def open(self, **kwargs):
        self.send({
            "user": self.request.user.username,
            "kwargs": kwargs,
            "tag": getattr(self.request, "tagged_by_middleware", None),
            "in_pool": threading.current_thread().name.startswith("django"),
        })

    def on_message(self, message):
        self.send({"echo": message})


@route("accounts/login/")
def accounts_login(request):
    from django.contrib.auth.views import LoginView

    return LoginView.as_view()(request)


@route("accounts/logout/")
def accounts_logout(request):
    from django.contrib.auth.views import LogoutView

    return LogoutView.as_view(next_page="/fast")(request)


urlpatterns.append(path("ws/whoami/<slug:room>", login_required(WhoAmI.as_view()), name="whoami-socket"))


def socket_url(server, path):
    return f"ws://127.0.0.1:{server.port}{path}"


class SocketClient:
    """A real WebSocket client (Tornado's), driven from the test's thread: each call runs on its own loop."""

    def __init__(self, url, headers=None, cookies=None, compression=False, ca_certs=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        request_headers = dict(headers or {})
        if cookies:
            request_headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
        request = tornado.httpclient.HTTPRequest(url, headers=request_headers, request_timeout=TIMEOUT, ca_certs=ca_certs)
        try:
            self.connection = self._on_its_loop(lambda: tornado.websocket.websocket_connect(request, compression_options={} if compression else None))
        except BaseException:
            self.close()
            raise

    def _on_its_loop(self, start, timeout=TIMEOUT):
        """Call ``start()`` on the client's loop and wait for what it returns (Tornado's client needs its loop)."""

        async def bounded():
            return await asyncio.wait_for(start(), timeout)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(timeout + 1)

    def receive(self, timeout=TIMEOUT):
        """The next message (a str or bytes; a JSON text decoded), or None once the server has closed."""
        message = self._on_its_loop(self.connection.read_message, timeout)
        if isinstance(message, str) and message[:1] in ("[", "{"):
            return json.loads(message)
        return message

    def send(self, message):
        self._on_its_loop(lambda: self.connection.write_message(message, binary=isinstance(message, bytes)))

    @property
    def close_code(self):
        return self.connection.close_code

    def close(self):
        connection = getattr(self, "connection", None)
        if connection is not None:
            self.loop.call_soon_threadsafe(connection.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)


def handshake_refusal(url, **kwargs):
    """The HTTP status a refused handshake got."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        SocketClient(url, **kwargs)
    return refused.value.code


@pytest.fixture(scope="module")
def site(database):
    """A server with a middleware of the project's own, and a user to log in as."""
    User.objects.filter(username="grace").delete()
    User.objects.create_user("grace", password="hopper-1906")
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "test_django_tornado.TaggingMiddleware"]), LiveServer(make_app(threads=4)) as live:
        yield live


def logged_in(site):
    """A browser session logged in through Django's own LoginView (CSRF token and all)."""
    browser = requests.Session()
    token = browser.get(site.url("/form"), timeout=TIMEOUT).json()["csrf"]
    response = browser.post(site.url("/accounts/login/"), data={"username": "grace", "password": "hopper-1906", "csrfmiddlewaretoken": token},
                            timeout=TIMEOUT, allow_redirects=False)
    assert response.status_code == 302, response.text
    return browser


def test_a_websocket_behind_login_required_is_refused_anonymous_then_knows_the_user_and_closes_on_logout(site):
    assert handshake_refusal(socket_url(site, "/ws/whoami/lobby")) == 302  # to the login page: no socket
    browser = logged_in(site)
    client = SocketClient(socket_url(site, "/ws/whoami/lobby"), cookies=browser.cookies.get_dict())
    try:
        assert client.receive() == {"user": "grace", "kwargs": {"room": "lobby"}, "tag": "tagged", "in_pool": True}
        client.send("hello")
        assert client.receive() == {"echo": "hello"}
        token = browser.cookies["csrftoken"]
        assert browser.post(site.url("/accounts/logout/"), data={"csrfmiddlewaretoken": token}, timeout=TIMEOUT, allow_redirects=False).status_code == 302
        assert client.receive() is None
        assert client.close_code == 4401
    finally:
        client.close()
    assert handshake_refusal(socket_url(site, "/ws/whoami/lobby"), cookies=browser.cookies.get_dict()) == 302


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("http://127.0.0.1:{port}", True),  # the request's own scheme, host and port
        ("http://localhost:9999", True),  # an ALLOWED_HOSTS entry, on the same scheme
        ("https://app.trusted.example", True),  # a CSRF_TRUSTED_ORIGINS wildcard
        ("http://evil.example", False),
        ("https://127.0.0.1:{port}", False),  # another scheme
        ("http://127.0.0.1.evil.example", False),
        ("null", False),  # a sandboxed frame, a file
    ],
)
def test_a_browser_handshake_from_another_site_is_refused_even_with_the_session_cookie(site, origin, allowed, caplog):
    browser = logged_in(site)
    headers = {} if origin is None else {"Origin": origin.format(port=site.port)}
    with override_settings(CSRF_TRUSTED_ORIGINS=["https://*.trusted.example"]):
        if allowed:
            client = SocketClient(socket_url(site, "/ws/whoami/x"), headers=headers, cookies=browser.cookies.get_dict())
            assert client.receive()["user"] == "grace"
            client.close()
        else:
            assert handshake_refusal(socket_url(site, "/ws/whoami/x"), headers=headers, cookies=browser.cookies.get_dict()) == 403
            assert [record.getMessage() for record in caplog.records if "refused a WebSocket handshake" in record.getMessage()] == [
                f"GET /ws/whoami/x: refused a WebSocket handshake from {headers['Origin']}, not an origin of this site"
            ]


def test_allowed_hosts_star_does_not_open_the_origin_check(site):
    with override_settings(ALLOWED_HOSTS=["*"]):
        assert handshake_refusal(socket_url(site, "/ws/whoami/x"), headers={"Origin": "http://evil.example"}, cookies=logged_in(site).cookies.get_dict()) == 403


class Ledger(WebSocket):
    """A sync on_message that uses the ORM, and one socket's messages in order."""

    def on_message(self, message):
        count = User.objects.filter(username__startswith="ledger-").count()
        User.objects.create_user(f"ledger-{time.monotonic_ns()}")
        self.send({"message": message, "users_before": count})


class AsyncLedger(WebSocket):
    async def on_message(self, message):
        await asyncio.sleep(0.01 * (int(message) % 3))  # later messages sometimes finish first, if not kept in order
        self.send({"message": message, "on_loop": threading.current_thread() is threading.main_thread() or "django" not in threading.current_thread().name})


urlpatterns += [path("ws/ledger", Ledger.as_view()), path("ws/async-ledger", AsyncLedger.as_view())]


def test_sync_and_async_def_message_handlers_on_one_server_keep_each_sockets_order(server):
    User.objects.filter(username__startswith="ledger-").delete()
    sync_client, async_client = SocketClient(socket_url(server, "/ws/ledger")), SocketClient(socket_url(server, "/ws/async-ledger"))
    try:
        for number in range(10):
            sync_client.send(str(number))
            async_client.send(str(number))
        sync_answers = [sync_client.receive() for _ in range(10)]
        async_answers = [async_client.receive() for _ in range(10)]
    finally:
        sync_client.close()
        async_client.close()
    assert sync_answers == [{"message": str(number), "users_before": number} for number in range(10)]  # each saw the one before
    assert [answer["message"] for answer in async_answers] == [str(number) for number in range(10)]
    assert all(answer["on_loop"] for answer in async_answers)


class Small(WebSocket):
    max_message_size = 1024

    def on_message(self, message):
        self.send({"length": len(message)})


urlpatterns.append(path("ws/small", Small.as_view()))


def test_a_message_one_byte_over_the_limit_closes_the_socket_with_1009(server):
    client = SocketClient(socket_url(server, "/ws/small"))
    try:
        client.send(b"x" * 1024)
        assert client.receive() == {"length": 1024}
        client.send(b"x" * 1025)
        assert client.receive() is None
        assert client.close_code == 1009
    finally:
        client.close()


class Broken(WebSocket):
    def open(self):
        if self.request.GET.get("fail") == "open":
            raise RuntimeError("open broke")
        self.send("opened")

    def on_message(self, message):
        raise RuntimeError(f"on_message broke on {message}")


urlpatterns.append(path("ws/broken", Broken.as_view()))


@pytest.mark.parametrize("where", ["open", "on_message"])
def test_an_exception_in_an_endpoint_closes_its_socket_with_1011_and_one_log_line(server, where, caplog):
    client = SocketClient(socket_url(server, f"/ws/broken?fail={where}"))
    try:
        if where == "on_message":
            assert client.receive() == "opened"
            client.send("boom")
        assert client.receive() is None
        assert client.close_code == 1011
    finally:
        client.close()
    failures = [record for record in caplog.records if "failed; closing it with 1011" in record.getMessage()]
    assert len(failures) == 1 and failures[0].getMessage() == f"WebSocket /ws/broken: {where}() failed; closing it with 1011"
    assert f"{where} broke" in str(failures[0].exc_info[1])  # with its traceback
    assert get(server, "/fast").status_code == 200  # the server goes on


feed = Channel("socket-feed", backlog=3)


class Feed(WebSocket):
    def open(self):
        since = self.request.GET.get("since")
        self.subscribe(feed, since=int(since) if since else None)


urlpatterns.append(path("ws/feed", Feed.as_view()))


def test_a_subscribed_socket_gets_the_channels_events_replaying_after_since(server):
    first = feed.publish("first")
    client = SocketClient(socket_url(server, f"/ws/feed?since={first}"))
    try:
        second = feed.publish({"n": 2}, event="named")
        assert client.receive() == {"id": second, "data": {"n": 2}, "event": "named"}
        wait_for(lambda: readers_of("socket-feed") == 1)
    finally:
        client.close()
    wait_for(lambda: readers_of("socket-feed") == 0)  # its subscription went with it
    later = [feed.publish(number) for number in range(3)]  # the backlog of 3 no longer has the second
    outrun = SocketClient(socket_url(server, f"/ws/feed?since={first}"))
    try:
        assert outrun.receive() == {"id": second, "data": None, "event": "reset"}
        assert [outrun.receive()["id"] for _ in range(3)] == later
    finally:
        outrun.close()


class Echo(WebSocket):
    """Sends back what it gets, and the feed's events; ``Deflating`` compresses."""

    def open(self):
        self.subscribe(feed)

    def on_message(self, message):
        self.send(message)


class Deflating(Echo):
    compression = True


urlpatterns += [path("ws/echo", Echo.as_view()), path("ws/deflating", Deflating.as_view())]


@pytest.mark.parametrize("endpoint", ["/ws/echo", "/ws/deflating"])
def test_messages_of_every_frame_length_arrive_whole_as_text_or_binary_compressed_or_not(server, endpoint):
    client = SocketClient(socket_url(server, endpoint), compression=True)  # the client offers deflate; only Deflating takes it
    try:
        assert ("permessage-deflate" in client.connection.headers.get("Sec-WebSocket-Extensions", "")) == (endpoint == "/ws/deflating")
        for length in (0, 125, 126, 65535, 65536, 300_000):  # the three length encodings, each side of their bounds
            text = ("é" * length)[: length // 2] + "x" * (length - length // 2)  # more bytes than characters
            client.send(text)
            assert client.receive() == text
            client.send(bytes(range(256)) * (length // 256) + b"\0" * (length % 256))
            assert client.receive() == bytes(range(256)) * (length // 256) + b"\0" * (length % 256)
        wait_for(lambda: readers_of("socket-feed") >= 1)
        event_id = feed.publish({"text": "é" * 200})
        assert client.receive() == {"id": event_id, "data": {"text": "é" * 200}}
    finally:
        client.close()


def test_a_websocket_url_without_upgrade_gets_426(server):
    response = get(server, "/ws/feed")
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "websocket"
    assert "is a WebSocket endpoint" in response.text


def test_a_websocket_view_needs_django_tornado_to_serve_it():
    from django.test import Client

    response = Client().get("/ws/feed", HTTP_HOST="127.0.0.1", HTTP_UPGRADE="websocket", HTTP_CONNECTION="Upgrade")
    assert response.status_code == 501
    assert "the WebSocket test_django_tornado.Feed needs django_tornado" in response.content.decode()


def raw_handshake(server, path="/ws/small", **headers):
    fields = {"Host": f"127.0.0.1:{server.port}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13", **headers}
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value is not None) + "\r\n"
    connection = raw_request(server, head.encode())
    answer = connection.recv(4096)
    return connection, answer


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-WebSocket-Key": "short"}, b"400"),
        ({"Sec-WebSocket-Key": None}, b"400"),
        ({"Sec-WebSocket-Version": "8"}, b"426"),
        ({"Connection": "keep-alive"}, b"400"),
    ],
)
def test_a_malformed_handshake_gets_the_protocols_answer(server, headers, status):
    connection, answer = raw_handshake(server, **headers)
    connection.close()
    assert answer.split(b" ", 2)[1] == status
    if status == b"426":
        assert b"sec-websocket-version: 13" in answer.lower()


def frame(opcode, payload, fin=True):
    """A client frame (masked, as RFC 6455 requires of clients)."""
    mask = b"\x01\x02\x03\x04"
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    return head + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def read_close_code(connection):
    """The close code of the server's close frame (after any other frames), or None if it just hung up."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := connection.recv(65536):
            data += chunk
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2 if length < 126 else 4
        if length == 126:
            length = int.from_bytes(data[2:4], "big")
        if opcode == 0x8:
            return int.from_bytes(data[start : start + 2], "big")
        data = data[start + length :]
    return None


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([frame(0x1, b"x" * 600, fin=False), frame(0x0, b"x" * 600)], 1009),  # fragments adding up past 1 KiB
        ([bytes([0x40]) + frame(0x1, b"hello")[1:]], 1002),  # a reserved bit, with no extension to mean it
        ([frame(0x9, b"x" * 200)], 1002),  # a ping too long for a control frame
        ([frame(0x3, b"reserved opcode")], 1002),
        ([frame(0x8, (999).to_bytes(2, "big"))], "any"),  # a close code no one may send: Tornado (6.3-6.6) echoes it
    ],
)
def test_malformed_frames_and_close_codes_get_the_protocols_close(server, frames, code):
    connection, answer = raw_handshake(server)
    try:
        assert answer.startswith(b"HTTP/1.1 101")
        for data in frames:
            connection.sendall(data)
        closed_with = read_close_code(connection)  # returns once the server has closed the connection
        assert code == "any" or closed_with in (code, None)  # Tornado's close frame, or it hangs up on a broken peer
    finally:
        connection.close()
    assert get(server, "/fast").status_code == 200


# -- serve(), worker processes, --reload, shutdown, runtornado: real processes ------
# A small project on disk, run with manage.py or python -m django_tornado.

PROJECT_FILES = {
    "manage.py": """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project_settings")
from django.core.management import execute_from_command_line
execute_from_command_line(sys.argv)
""",
    "project_settings.py": """
import os
SECRET_KEY = "django-tornado-process-tests"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "project_urls"
INSTALLED_APPS = ["django_tornado", "django.contrib.staticfiles"]
MIDDLEWARE = []
STATIC_URL = "static/"
STATICFILES_DIRS = ["assets"]
TORNADO_STARTUP = ["project_urls.on_startup"]
TORNADO_CHANNELS_URL = os.environ.get("TEST_CHANNELS_URL", "memory://")
""",
    "publish.py": """
# A plain Python process (no IOLoop, no server) publishing to the project's channel.
import sys
import django
django.setup()
from project_urls import news
from django_tornado import ChannelUnavailable
try:
    for text in sys.argv[1:]:
        print(news.publish({"text": text, "padding": ""}), flush=True)
except ChannelUnavailable as error:
    sys.exit(f"ChannelUnavailable: {error}")
""",
    "explicit_settings.py": """
from project_settings import *
INSTALLED_APPS = ["registered_app"]
""",
    "strict_settings.py": """
from project_settings import *
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
""",
    "strict_server.py": """
import sys
import django_tornado
django_tornado.serve(sys.argv[1:], threads=4, max_body_size=4_000_000, header_timeout=2, body_timeout=3, idle_timeout=4)
""",
    "few_files_server.py": """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # soft and hard: serve() cannot raise it
import django_tornado
django_tornado.serve(sys.argv[1:], threads=2)
""",
    "assets/hello.txt": "served by the staticfiles finders\n",
    "registered_app/__init__.py": "",
    "registered_app/management/__init__.py": "",
    "registered_app/management/commands/__init__.py": "",
    "registered_app/management/commands/runtornado.py": "from django_tornado import Command  # noqa: F401\n",
    "project_urls.py": """
import os, time
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django_tornado import asynchronous

counter = {"value": 0}
started = []

def on_startup():
    started.append(os.getpid())

@csrf_exempt
def state(request):
    if request.method == "POST":
        counter["value"] += 1
    return JsonResponse({"value": counter["value"], "pid": os.getpid(), "started": started})

def slow(request):
    print("slow view started\\n", end="", flush=True)  # one write: two threads' lines never merge
    time.sleep(float(request.GET.get("seconds", "1")))
    return JsonResponse({"slept": True})

@asynchronous
def park(request, handler):
    print("long-poll parked\\n", end="", flush=True)  # and never answered by the view

@csrf_exempt
def echo(request):
    body = request.body  # read before the form: Django refuses request.body after a multipart parse
    return JsonResponse({
        "method": request.method,
        "path": request.path,
        "query": request.GET.getlist("q"),
        "form": request.POST.getlist("f"),
        "body_length": len(body),
        "remote_addr": request.META["REMOTE_ADDR"],
        "secure": request.is_secure(),
    })

# For the disconnect storms: every waiter, generator and Django request in flight is counted.
import asyncio, gc, threading
from django.core.signals import request_finished, request_started
from django.http import StreamingHttpResponse

tally = {"started": 0, "finished": 0, "generators": 0}
tally_lock = threading.Lock()
waiters = set()

def count(key, step=1):
    with tally_lock:
        tally[key] += step

request_started.connect(lambda **kwargs: count("started"), weak=False)
request_finished.connect(lambda **kwargs: count("finished"), weak=False)

@asynchronous
def hold(request, handler):
    waiters.add(handler)
    handler.add_disconnect_callback(lambda: waiters.discard(handler))

def endless_sync():
    count("generators")
    try:
        while True:
            yield b"x" * 100
            time.sleep(0.005)
    finally:
        count("generators", -1)

async def nap(request):
    await asyncio.sleep(float(request.GET.get("seconds", "2")))
    return JsonResponse({"napped": True})

def crunch(request):  # a CPU-bound view, holding the GIL as long as the interpreter lets it
    until = time.monotonic() + float(request.GET.get("seconds", "1"))
    while time.monotonic() < until:
        pass
    return JsonResponse({"crunched": True})

async def endless_async():
    count("generators")
    try:
        while True:
            yield b"x" * 100
            await asyncio.sleep(0.005)
    finally:
        count("generators", -1)

def endless(request, kind):
    return StreamingHttpResponse(endless_sync() if kind == "sync" else endless_async())

# Live updates: one channel, read by long-polls, event streams, listen() loops and a page.
from django.http import HttpResponse
from django_tornado import Channel, ChannelUnavailable, EventStream

news = Channel("news", backlog=int(os.environ.get("TEST_BACKLOG", "1000")))

def news_events(request):
    return EventStream(news, request, keepalive=float(request.GET.get("keepalive", "15")))

@asynchronous
def news_poll(request, handler):
    answer = handler.async_callback(lambda events: handler.finish({"events": events, "pid": os.getpid()}))
    news.query(answer, int(request.GET["since"]))

async def news_listen(request):
    since = request.GET.get("since")
    async for event in news.listen(since=int(since) if since else None):
        return JsonResponse({"event": event, "pid": os.getpid()})
    return JsonResponse({"event": None, "pid": os.getpid()})  # the server stopped

@csrf_exempt
def news_publish(request):
    data = {"text": request.POST.get("text", ""), "padding": "x" * int(request.POST.get("padding", "0"))}
    try:
        return JsonResponse({"id": news.publish(data), "pid": os.getpid()})
    except ChannelUnavailable as error:
        return JsonResponse({"error": str(error)}, status=503)

NEWS_PAGE = \"\"\"<!DOCTYPE html><meta charset="utf-8"><title>news</title><ol id="events"></ol><script>
let opened = 0;
const source = new EventSource("/news/events");
const add = (text) => { const item = document.createElement("li"); item.textContent = text; document.getElementById("events").append(item); };
source.onopen = () => { opened += 1; document.title = `opened ${opened}`; };
source.onmessage = (message) => add(JSON.parse(message.data).text);
source.addEventListener("reset", () => add("reset"));
</script>\"\"\"

def news_page(request):
    return HttpResponse(NEWS_PAGE)

from django_tornado import WebSocket

class NewsSocket(WebSocket):
    def open(self):
        since = self.request.GET.get("since")
        self.subscribe(news, since=int(since) if since else None)
        self.send({"pid": os.getpid()})

    def on_message(self, message):
        self.send({"echo": message})

def channel_readers():
    import django_tornado  # its internals: for the census only
    return sum(
        len(watch.readers)
        for backend in list(django_tornado._backends.values())
        for hub in list(backend.hubs.values())
        for watch in list(hub.watches.values())
    )

@asynchronous
def census(request, handler):
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return JsonResponse({
        "waiters": len(waiters),
        "generators": tally["generators"],
        "unclosed": tally["started"] - tally["finished"] - 1,  # this request is not finished yet
        "handlers": len(handler.bridge.active_handlers) - 1,
        "readers": channel_readers(),
        "sockets": len(handler.bridge.sockets),
        "rss": int(fields["VmRSS"].split()[0]) * 1024,
        "threads": int(fields["Threads"]),
        "gc": {"first_generation": gc.get_threshold()[0], "frozen": gc.get_freeze_count()},
        "pid": os.getpid(),
    })

urlpatterns = [
    path("state", state), path("slow", slow), path("park", park), path("echo", echo),
    path("hold", hold), path("endless/<kind>", endless), path("census", census), path("nap", nap), path("crunch", crunch),
    path("news/events", news_events), path("news/poll", news_poll), path("news/listen", news_listen),
    path("news/publish", news_publish), path("news/page", news_page), path("news/socket", NewsSocket.as_view()),
]
""",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name, text in PROJECT_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.lstrip())
    return root


class ServerProcess:
    """A server started as a user would, whose output is read line by line."""

    def __init__(self, project, *args, settings_module="project_settings", own_process_group=False, environment=None):
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(project), os.path.dirname(os.path.abspath(django_tornado.__file__))]),
            "DJANGO_SETTINGS_MODULE": settings_module,
            "PYTHONUNBUFFERED": "1",
            **(environment or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=project,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=own_process_group,  # a terminal's group, for Ctrl-C
        )
        self.output = []
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, text, timeout=TIMEOUT, required=True):
        """Return the next output line containing ``text`` (None if not required and none came)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:  # however many other lines come
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            assert line is not None, "the server exited; its last lines:\n" + self.last_lines()
            self.output.append(line)
            if text in line:
                return line
        if required:
            pytest.fail(f"no line with {text!r} in {timeout} s; the output's last lines:\n" + self.last_lines())
        return None

    def wait_for_lines(self, *texts, timeout=TIMEOUT):
        """Wait until a line containing each of ``texts`` has come, in any order (a text given twice: two lines)."""
        missing = collections.Counter(texts)
        deadline = time.monotonic() + timeout
        while missing:
            line = self.wait_for_line("", timeout=deadline - time.monotonic(), required=False)
            if line is None:
                pytest.fail(f"no line with {sorted(missing.elements())} in {timeout} s; the output's last lines:\n" + self.last_lines())
            missing -= collections.Counter({text: line.count(text) for text in missing})

    def last_lines(self, count=60):
        """The last ``count`` lines of output, including any not waited for yet."""
        with contextlib.suppress(queue.Empty):
            while (line := self._lines.get_nowait()) is not None:
                self.output.append(line)
            self._lines.put(None)  # the end stays marked for whoever reads next
        return "".join(self.output[-count:])

    def wait_for_banner(self):
        """Wait until the server listens; return its URLs."""
        urls = self.wait_for_line("Starting django_tornado").split(" at ", 1)[1].strip().split(", ")
        self.wait_for_line("Quit the server with CONTROL-C.")
        return urls

    def stop(self, signal_number=signal.SIGTERM, timeout=TIMEOUT):
        """Signal the server and return its exit code once it has exited."""
        self.process.send_signal(signal_number)
        return self.wait_for_exit(signal.Signals(signal_number).name, timeout)

    def wait_for_exit(self, cause, timeout=TIMEOUT):
        """Return the exit code once the server has exited (after ``cause``) and all its output is read."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after {cause}; the output's last lines:\n" + self.last_lines())
        while (line := self._lines.get(timeout=TIMEOUT)) is not None:
            self.output.append(line)
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)


def port_of(url):
    """The port of a base URL such as ``http://127.0.0.1:8000/``."""
    return int(url.rstrip("/").rsplit(":", 1)[1])


@contextlib.contextmanager
def running(project, *args, **kwargs):
    server = ServerProcess(project, *args, **kwargs)
    try:
        yield server
    finally:
        server.kill()


def runtornado(*args):
    return ("manage.py", "runtornado", "--skip-checks", *args)


def test_the_server_keeps_full_garbage_collections_rare_for_its_parked_connections(project):
    with running(project, *runtornado("127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        collector = requests.get(url + "census", timeout=TIMEOUT).json()["gc"]
        assert server.stop() == 0
    assert collector["first_generation"] == 10_000
    assert collector["frozen"] > 10_000  # Django and the project, loaded at start, are left out of collections


def test_many_long_awaits_in_async_def_views_neither_wait_for_each_other_nor_starve_plain_views(project):
    async def scenario(port):
        async def one(path):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            return answer

        async def plain():
            plain_started = time.monotonic()
            assert b"200 OK" in await one("/state")
            return time.monotonic() - plain_started

        crunching = asyncio.ensure_future(one("/crunch?seconds=3"))  # a CPU-bound view holds the GIL meanwhile
        await asyncio.sleep(0.1)
        started = time.monotonic()
        naps = [asyncio.ensure_future(one("/nap?seconds=2")) for _ in range(500)]
        await asyncio.sleep(0.2)  # while they arrive and the pool they wait in grows
        while_arriving = await plain()
        await asyncio.sleep(0.3)  # all 500 are waiting now
        while_waiting = await plain()
        answers = await asyncio.gather(*naps)
        assert b"crunched" in await crunching
        return time.monotonic() - started, while_arriving, while_waiting, answers

    with running(project, *runtornado("--threads", "4", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        elapsed, while_arriving, while_waiting, answers = asyncio.run(scenario(port_of(url)))
        assert server.stop() == 0
    assert all(b"200 OK" in answer and b"napped" in answer for answer in answers)
    assert elapsed < 6  # side by side: 2 s each, not one after another (bench/ times it closely)
    assert while_arriving < 2  # 0.6-1 s; 2.7-2.9 s when ThreadPoolExecutor.submit() started the 500 threads
    assert while_waiting < 1


def test_two_ports_of_one_call_share_one_process_and_its_state(project):
    with running(project, *runtornado("127.0.0.1:0", "[::1]:0")) as server:
        first, second = server.wait_for_banner()
        assert second.startswith("http://[::1]:")
        requests.post(first + "state", timeout=TIMEOUT)
        seen = requests.get(second + "state", timeout=TIMEOUT).json()
        assert seen["value"] == 1  # one room, one counter
        assert seen["started"] == [seen["pid"]] == [server.process.pid]  # TORNADO_STARTUP ran once
        assert server.wait_for_line('"POST /state HTTP/1.1" 200')  # the access log
        assert server.stop() == 0


@pytest.mark.parametrize(("flags", "status"), [([], 404), (["--insecure"], 200), (["--insecure", "--nostatic"], 404)])
def test_static_files_are_served_like_runserver_serves_them(project, flags, status):
    with running(project, *runtornado(*flags, "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        response = requests.get(url + "static/hello.txt", timeout=TIMEOUT)  # DEBUG is off in this project
        assert response.status_code == status
        if status == 200:
            assert response.text == "served by the staticfiles finders\n"
        assert requests.get(url + "state", timeout=TIMEOUT).status_code == 200
        assert server.stop() == 0


def worker_pids(url, count, excluding=()):
    """The pids of ``count`` workers behind ``url``, other than ``excluding``, as new connections reach them."""
    pids = set()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # each new connection lands on either worker
        pid = requests.get(url + "state", timeout=TIMEOUT).json()["pid"]
        if pid not in excluding:
            pids.add(pid)
        if len(pids) == count:
            return pids
    pytest.fail(f"saw only workers {pids}")


def test_worker_processes_share_the_port_and_a_dead_worker_is_replaced(project):
    with running(project, *runtornado("--processes", "2", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        first, second = worker_pids(url, 2)
        assert server.process.pid not in (first, second)
        os.kill(first, signal.SIGKILL)
        server.wait_for_line(f"(pid {first}) exited with code -9; starting a new one")
        (replacement,) = worker_pids(url, 1, excluding={first, second})
        assert replacement != first
        assert server.stop() == 0


def test_a_worker_stopped_on_its_own_is_replaced_and_the_port_stays_open(project):
    with running(project, *runtornado("--processes", "2", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        first, second = worker_pids(url, 2)
        os.kill(first, signal.SIGTERM)  # as an operator recycling one worker would
        server.wait_for_line(f"(pid {first}) exited with code 0; starting a new one")
        # The listening socket is shared: the stopped worker must not have closed it to the
        # others, so new connections reach the other worker and the new one.
        assert second in worker_pids(url, 2, excluding={first})
        assert server.stop() == 0


def test_a_worker_that_cannot_stop_is_killed_after_the_grace_period(project):
    # With no pool, a slow view holds its worker's IOLoop: that worker can't act on SIGTERM.
    with running(project, *runtornado("--processes", "2", "--threads", "0", "--grace-period", "1", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(requests.get, url + "slow", params={"seconds": 3 * TIMEOUT}, timeout=4 * TIMEOUT)
            server.wait_for_line("slow view started")
            assert server.stop() == 0  # within stop()'s TIMEOUT, not the view's 3 * TIMEOUT
            with pytest.raises(requests.ConnectionError):
                stuck.result()
    assert any("still running 6 s after the signal: killed" in line for line in server.output)


def test_ctrl_c_stops_every_worker_once_and_the_parent_exits_0(project):
    with running(project, *runtornado("--processes", "2", "127.0.0.1:0"), own_process_group=True) as server:
        (url,) = server.wait_for_banner()
        workers = worker_pids(url, 2)
        os.killpg(server.process.pid, signal.SIGINT)  # what Ctrl-C does: the whole group gets it
        assert server.wait_for_exit("Ctrl-C") == 0
    output = "".join(server.output)
    for pid in workers:
        assert output.count(f"Stopping (pid {pid})") == 1
    assert "Second" not in output and "Traceback" not in output


def test_runtornado_passes_its_limits_to_the_server(project):
    with running(project, *runtornado("--max-body-size", "10", "--header-timeout", "1", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        assert requests.post(url + "echo", data=b"x" * 11, timeout=TIMEOUT).status_code == 413
        assert requests.post(url + "echo", data=b"x" * 10, timeout=TIMEOUT).json()["body_length"] == 10
        port = port_of(url)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as slow_client:
            slow_client.sendall(b"GET /echo HTTP/1.1\r\n")
            started = time.monotonic()
            assert slow_client.recv(1) == b""  # closed by the server
            assert time.monotonic() - started < 3
        assert server.stop() == 0


def test_workers_stop_when_their_parent_is_killed(project):
    with running(project, *runtornado("--processes", "2", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        workers = worker_pids(url, 2)
        server.process.kill()
        server.wait_for_lines(*(f"Worker (pid {pid}): the parent process is gone; stopping" for pid in workers))
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), TIMEOUT)  # reaped by init


def test_running_out_of_file_descriptors_pauses_accepting_instead_of_spinning(project):
    with running(project, "few_files_server.py", "127.0.0.1:0") as server:
        (url,) = server.wait_for_banner()
        port = port_of(url)
        flood = []
        with contextlib.suppress(OSError):
            for _ in range(100):  # more than the server has descriptors left
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        server.wait_for_line("Can't accept connections (Too many open files): pausing for 0.5 s")
        time.sleep(1)  # a second of being out of descriptors: two or three pauses, not a spin
        for connection in flood:
            connection.close()
        assert requests.get(url + "state", timeout=TIMEOUT).status_code == 200
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.output)
    assert sum("Can't accept connections" in line for line in server.output) < 10


def test_reload_restarts_the_server_when_a_source_file_changes(project):
    with running(project, *runtornado("--reload", "127.0.0.1:0")) as server:
        server.wait_for_banner()
        # The watcher takes its first look half a second after starting: change the
        # file until it notices.
        for attempt in range(1, TIMEOUT + 1):
            changed = time.time() + attempt
            os.utime(project / "project_urls.py", (changed, changed))
            restarted = server.wait_for_line("Starting django_tornado", timeout=1, required=False)
            if restarted:
                break
        else:
            pytest.fail("the server did not restart:\n" + "".join(server.output))
        url = restarted.split(" at ", 1)[1].strip()
        server.wait_for_line("Quit the server with CONTROL-C.")
        assert requests.get(url + "state", timeout=TIMEOUT).json()["pid"] == server.process.pid
        assert server.stop() == 0


def test_sigterm_lets_a_slow_view_finish_and_answers_a_long_poll(project):
    with running(project, *runtornado("--grace-period", "5", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        answers = {}
        clients = [
            threading.Thread(target=lambda: answers.update(slow=requests.get(url + "slow?seconds=1.5", timeout=TIMEOUT))),
            threading.Thread(target=lambda: answers.update(park=requests.get(url + "park", timeout=TIMEOUT))),
        ]
        for client in clients:
            client.start()
        server.wait_for_lines("slow view started", "long-poll parked")  # in either order
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        for client in clients:
            client.join(TIMEOUT)
    assert answers["slow"].json() == {"slept": True}
    assert answers["park"].status_code == 503
    assert answers["park"].headers["Retry-After"] == "1"
    with pytest.raises(requests.exceptions.ConnectionError):  # no longer listening
        requests.get(url + "state", timeout=TIMEOUT)


def test_a_connection_made_before_sigterm_gets_its_first_request_answered(project):
    with running(project, *runtornado("--grace-period", "5", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        port = port_of(url)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as late,
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as silent,
        ):
            time.sleep(0.3)  # accepted, and nothing in flight: the server could stop at once
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_line("Stopping")
            late.sendall(b"GET /state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a client is slower than the signal
            response = http.client.HTTPResponse(late)
            response.begin()
            assert (response.status, response.headers["Connection"]) == (200, "close")
            assert silent.recv(1) == b""  # one that never asks does not hold the shutdown
            assert server.wait_for_exit("SIGTERM") == 0
            assert time.monotonic() - started < 3


def test_requests_still_running_after_the_grace_period_are_cut_off_and_the_server_exits_0(project):
    with running(project, *runtornado("--grace-period", "1", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.get, url + "slow?seconds=8", timeout=TIMEOUT)
            server.wait_for_line("slow view started")
            started = time.monotonic()
            assert server.stop() == 0  # a pool thread still in the view does not hold the exit
            assert time.monotonic() - started < 5
            with pytest.raises(requests.exceptions.ConnectionError):
                slow.result(TIMEOUT)
    assert any("1 requests still running after 1.0 s were cut off" in line for line in server.output)


def get_ignoring_errors(url):
    with contextlib.suppress(requests.RequestException):
        requests.get(url, timeout=TIMEOUT)


def test_a_second_signal_stops_at_once(project):
    with running(project, *runtornado("--grace-period", "30", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        client = threading.Thread(target=get_ignoring_errors, args=(url + "slow?seconds=20",))
        client.start()
        server.wait_for_line("slow view started")
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        server.wait_for_line("Stopping (pid")
        assert server.stop(signal.SIGINT) == 1
        assert time.monotonic() - started < 5
        client.join(TIMEOUT)


@pytest.fixture
def busy_port():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def assert_fails_in_one_line(project, command, message, **kwargs):
    """The server ``command`` starts exits non-zero, having printed one line, which starts with ``message``."""
    with running(project, *command, **kwargs) as server:
        code = server.process.wait(TIMEOUT)
        server.stop()
    output = [line for line in server.output if line.strip()]
    assert code != 0
    assert len(output) == 1, output
    assert output[0].startswith(message)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["abc"], 'CommandError: "abc" is not a port or address:port'),
        (["70000"], 'CommandError: "70000" is not a port or address:port'),
        (["127.0.0.1:{busy_port}"], "CommandError: Can't listen on http://127.0.0.1:{busy_port}/: that port is already in use"),
        (["192.0.2.1:8000"], "CommandError: Can't listen on http://192.0.2.1:8000/: that IP address is not one of this machine's"),
        (["--reload", "--processes", "2", "8000"], "CommandError: reload restarts a single process"),
        (["--threads", "-1", "8000"], "CommandError: threads must be 0 or more, not -1"),
        (["--header-timeout", "0", "8000"], "CommandError: header_timeout must be more than 0, not 0.0"),
        (["--grace-period", "inf", "8000"], "CommandError: grace_period must be a number of seconds, 0 or more, not inf"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_clear_line(project, busy_port, arguments, message):
    arguments = [argument.format(busy_port=busy_port) for argument in arguments]
    assert_fails_in_one_line(project, runtornado(*arguments), message.format(busy_port=busy_port))


@pytest.mark.parametrize(
    ("channels_url", "message"),
    [
        ("mysql://127.0.0.1/0", "CommandError: TORNADO_CHANNELS_URL must be memory:// or a redis:// URL, not 'mysql://127.0.0.1/0'"),
        ("redis://127.0.0.1:notaport/0", "CommandError: TORNADO_CHANNELS_URL: "),
    ],
)
def test_a_bad_channels_url_stops_the_server_at_once_with_one_clear_line(project, channels_url, message):
    assert_fails_in_one_line(project, runtornado("127.0.0.1:0"), message, environment={"TEST_CHANNELS_URL": channels_url})


@pytest.mark.parametrize("settings_module", ["project_settings", "explicit_settings"])
def test_manage_py_help_lists_and_explains_runtornado(project, settings_module):
    with running(project, "manage.py", "help", settings_module=settings_module) as listing:
        assert listing.process.wait(TIMEOUT) == 0
        listing.stop()
    assert "    runtornado\n" in listing.output
    with running(project, "manage.py", "help", "runtornado", settings_module=settings_module) as helping:
        assert helping.process.wait(TIMEOUT) == 0
        helping.stop()
    assert "usage: manage.py runtornado [-h] [--reload] [--processes PROCESSES]" in "".join(helping.output)


def test_python_m_django_tornado_serves_a_project_named_by_settings(project):
    with running(project, "-m", "django_tornado", "--settings=project_settings", "--skip-checks", "127.0.0.1:0", settings_module="") as server:
        (url,) = server.wait_for_banner()
        assert requests.get(url + "state", timeout=TIMEOUT).json()["value"] == 0
        assert server.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["8000"], "CommandError: no Django settings: pass --settings=yourproject.settings or set DJANGO_SETTINGS_MODULE."),
        (["--settings=nowhere.settings", "8000"], "CommandError: can't import the settings module 'nowhere.settings' (no module named 'nowhere')."),
    ],
)
def test_python_m_django_tornado_without_usable_settings_says_so_in_one_line(project, arguments, message):
    with running(project, "-m", "django_tornado", *arguments, settings_module="") as server:
        code = server.process.wait(TIMEOUT)
        server.stop()
    assert code == 1
    assert [line.strip() for line in server.output if line.strip()] == [message]


# -- Behind nginx, configured as README.rst says, over TLS ------------------------------


def readme_nginx_config():
    """The nginx configuration README.rst's *Behind nginx* gives: its first literal block."""
    text = (pathlib.Path(__file__).parent / "README.rst").read_text()
    section = text.split("\nBehind nginx\n", 1)[1]
    block = section.split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


@contextlib.contextmanager
def nginx_in_front(tmp_path, upstream_ports):
    """README.rst's nginx, listening with TLS on a free loopback port, in front of ``upstream_ports``; yields the port and its certificate."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(binary), "nginx is not installed (.ci/run installs it)"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = readme_nginx_config()
    upstreams = "".join(f"server 127.0.0.1:{upstream} max_fails=0;\n" for upstream in upstream_ports)
    config = config.replace("server 127.0.0.1:8000 max_fails=0;\n", upstreams).replace("    server 127.0.0.1:8001 max_fails=0;\n", "")
    config = config.replace("listen 80;", f"listen 127.0.0.1:{port} ssl; ssl_certificate {tmp_path}/cert.pem; ssl_certificate_key {tmp_path}/key.pem;")
    config = config.replace("/srv/mysite/static/", f"{tmp_path}/static/")
    for folder in ("static", "temp"):
        (tmp_path / folder).mkdir()
    (tmp_path / "static" / "hello.txt").write_text("served by nginx\n")
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/temp/body;
    proxy_temp_path {tmp_path}/temp/proxy;
    fastcgi_temp_path {tmp_path}/temp/fastcgi;
    uwsgi_temp_path {tmp_path}/temp/uwsgi;
    scgi_temp_path {tmp_path}/temp/scgi;
{config}
}}
""")
    process = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
        yield port, str(tmp_path / "cert.pem")
    finally:
        process.terminate()
        process.wait(TIMEOUT)
    errors = (tmp_path / "error.log").read_text()
    assert "[error]" not in errors and "[crit]" not in errors and "[emerg]" not in errors, errors


def test_behind_nginx_configured_as_readme_says_pages_long_polls_streams_and_sockets_work_over_tls(project, tmp_path):
    with running(project, *runtornado("--xheaders", "127.0.0.1:0", "127.0.0.1:0")) as server:
        upstream_ports = [int(url.rstrip("/").rsplit(":", 1)[1]) for url in server.wait_for_banner()]
        with nginx_in_front(tmp_path, upstream_ports) as (port, certificate):
            site = f"https://127.0.0.1:{port}"
            browser = requests.Session()
            browser.trust_env, browser.verify = False, certificate  # the test's own certificate, not the machine's bundle
            assert browser.get(f"{site}/static/hello.txt", timeout=TIMEOUT).text == "served by nginx\n"
            echo = browser.get(f"{site}/echo", timeout=TIMEOUT).json()
            assert echo["secure"] is True and echo["remote_addr"] == "127.0.0.1"  # X-Forwarded-Proto and X-Real-IP, trusted

            since = browser.post(f"{site}/news/publish", data={"text": "before"}, timeout=TIMEOUT).json()["id"]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                poll = pool.submit(lambda: browser.get(f"{site}/news/poll", params={"since": since}, timeout=TIMEOUT).json())
                stream = browser.get(f"{site}/news/events", headers={"Last-Event-ID": str(since)}, stream=True, timeout=TIMEOUT)
                origin = {"Origin": site}
                socket_client = SocketClient(f"wss://127.0.0.1:{port}/news/socket?since={since}", headers=origin, ca_certs=certificate)
                try:
                    assert "pid" in socket_client.receive()
                    time.sleep(0.2)  # the long-poll has parked
                    published = browser.post(f"{site}/news/publish", data={"text": "through nginx"}, timeout=TIMEOUT).json()["id"]
                    assert [event["id"] for event in poll.result(TIMEOUT)["events"]] == [published]
                    assert socket_client.receive() == {"id": published, "data": {"text": "through nginx", "padding": ""}}
                    lines = stream.iter_lines()
                    assert next(line for line in lines if line.startswith(b"id:")) == f"id: {published}".encode()  # not buffered by nginx
                    assert json.loads(next(line for line in lines if line.startswith(b"data:"))[5:])["text"] == "through nginx"
                    socket_client.send("hello")
                    assert socket_client.receive() == {"echo": "hello"}
                finally:
                    socket_client.close()
                    stream.close()
            # The page's own origin is https: one on plain http (the scheme the handshake reached the server by) is another site.
            assert handshake_refusal(f"wss://127.0.0.1:{port}/news/socket", headers={"Origin": f"http://127.0.0.1:{port}"}, ca_certs=certificate) == 403
        assert server.stop() == 0


# -- Hostile and broken clients: raw bytes against serve() as users run it ----------
# The strict server: Django's middleware, max_body_size 4 MB, header/body/idle
# timeouts of 2/3/4 s (see strict_server.py above).


@pytest.fixture(scope="module")
def strict(project):
    with running(project, "strict_server.py", "127.0.0.1:0", settings_module="strict_settings") as server:
        (url,) = server.wait_for_banner()
        server.port = port_of(url)
        server.url = lambda path: url.rstrip("/") + path
        server.probes = 0
        yield server


class OneBuffer:
    """Stands for a socket to ``http.client.HTTPResponse`` so that all its responses read through one buffer.

    Each HTTPResponse makes its own buffered file, which may read ahead into the next response when
    pipelined answers arrive together: the next HTTPResponse would then find them gone.
    """

    class _Reader(io.BufferedReader):
        def close(self):  # HTTPResponse closes its file once a body is read: keep it for the next
            pass

    def __init__(self, connection):
        self.reader = self._Reader(socket.SocketIO(connection, "rb"))

    def makefile(self, mode):
        return self.reader


def exchange(port, request_bytes, method="GET"):
    """Send raw bytes on a new connection; return (status, headers, body) of the final response."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        connection.sendall(request_bytes)
        response = http.client.HTTPResponse(connection, method=method)
        response.begin()  # skips a 100 Continue, as clients do
        return response.status, response.headers, response.read()


def log_lines_of_last_request(server):
    """The server's output since the previous probe: a probe request marks where it ends."""
    server.probes += 1
    probe = f"/state?probe={server.probes}"
    assert requests.get(f"http://127.0.0.1:{server.port}{probe}", timeout=TIMEOUT).status_code == 200  # still serving
    lines = []
    while probe not in (line := server.wait_for_line("")):
        lines.append(line)
    return lines


KEEP = "Host: 127.0.0.1\r\nConnection: close\r\n"  # the headers of a well-formed request
POST = KEEP + "Content-Type: application/x-www-form-urlencoded\r\n"


def chunked(*chunks):
    return "".join(f"{len(chunk):x}\r\n{chunk}\r\n" for chunk in chunks) + "0\r\n\r\n"


HOSTILE_REQUESTS = [
    # Request lines
    ("a well-formed request", f"GET /echo HTTP/1.1\r\n{KEEP}\r\n", 200),
    ("a garbage request line", "HELLO\r\n\r\n", 400),
    ("a request line without a version", "GET /echo\r\n\r\n", 400),
    ("a lowercase HTTP version", f"GET /echo http/1.1\r\n{KEEP}\r\n", 400),
    ("a major version this server does not speak", f"GET /echo HTTP/2.0\r\n{KEEP}\r\n", 400),
    ("two spaces in the request line", f"GET  /echo HTTP/1.1\r\n{KEEP}\r\n", 400),
    ("a request line broken by CR LF", f"GET /echo\r\nX-Injected: 1 HTTP/1.1\r\n{KEEP}\r\n", 400),
    ("an unknown method", f"BREW /echo HTTP/1.1\r\n{KEEP}\r\n", 501),
    ("a lowercase method", f"get /echo HTTP/1.1\r\n{KEEP}\r\n", 501),
    ("TRACE", f"TRACE /echo HTTP/1.1\r\n{KEEP}\r\n", 501),
    ("CONNECT", f"CONNECT 127.0.0.1:443 HTTP/1.1\r\n{KEEP}\r\n", 501),
    ("a method of 200 letters", f"{'A' * 200} /echo HTTP/1.1\r\n{KEEP}\r\n", 501),
    # Targets: paths and queries
    ("an absolute-form target", f"GET http://127.0.0.1/echo HTTP/1.1\r\n{KEEP}\r\n", 200),
    ("an absolute-form target naming another host", f"GET http://evil.example/echo HTTP/1.1\r\n{KEEP}\r\n", 400),
    ("an asterisk-form OPTIONS", f"OPTIONS * HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("invalid percent-encoding in the path", f"GET /ec%zzho HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("a truncated percent-encoding in the path", f"GET /echo% HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("invalid UTF-8 in the path", f"GET /echo%ff%fe HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("overlong UTF-8 for a slash in the path", f"GET /%c0%afecho HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("raw non-ASCII bytes in the path", b"GET /\xff\xfeecho HTTP/1.1\r\n" + KEEP.encode() + b"\r\n", 404),
    ("a NUL in the path", f"GET /echo%00 HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("a path climbing above the root", f"GET /../../etc/passwd HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("an encoded CR LF in the path", f"GET /echo%0d%0aSet-Cookie:%20evil=1 HTTP/1.1\r\n{KEEP}\r\n", 404),
    ("invalid UTF-8 in the query", f"GET /echo?q=%ff%fe HTTP/1.1\r\n{KEEP}\r\n", 200),
    ("invalid percent-encoding in the query", f"GET /echo?q=%zz&q=%&q=%f HTTP/1.1\r\n{KEEP}\r\n", 200),
    ("raw non-ASCII bytes in the query", b"GET /echo?q=\xff HTTP/1.1\r\n" + KEEP.encode() + b"\r\n", 200),
    ("a 64 kB URL", f"GET /echo?q={'x' * 65536} HTTP/1.1\r\n{KEEP}\r\n", 414),
    # Headers
    ("HTTP/1.1 without a Host", "GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
    ("two Host headers", f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n{KEEP}\r\n", 400),
    ("a Host outside ALLOWED_HOSTS", "GET /echo HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 400),
    ("a Host that is no host name", "GET /echo HTTP/1.1\r\nHost: a b@c\r\nConnection: close\r\n\r\n", 400),
    ("1,000 headers within the size limit", f"GET /echo HTTP/1.1\r\n{KEEP}" + "".join(f"X-H{n}: {n}\r\n" for n in range(1000)) + "\r\n", 200),
    ("1,000 headers over the size limit", f"GET /echo HTTP/1.1\r\n{KEEP}" + "".join(f"X-H{n}: {'v' * 100}\r\n" for n in range(1000)) + "\r\n", 431),
    ("one 70 kB header", f"GET /echo HTTP/1.1\r\n{KEEP}X-Big: {'v' * 70000}\r\n\r\n", 431),
    ("a bare CR inside a header value", f"GET /echo HTTP/1.1\r\n{KEEP}X-A: a\rX-B: b\r\n\r\n", 400),
    ("a NUL inside a header value", f"GET /echo HTTP/1.1\r\n{KEEP}X-A: a\0b\r\n\r\n", 400),
    ("a space between header name and colon", f"GET /echo HTTP/1.1\r\n{KEEP}X-A : a\r\n\r\n", 400),
    ("a header line without a colon", f"GET /echo HTTP/1.1\r\n{KEEP}no colon here\r\n\r\n", 400),
    # RFC 9112 section 5.2: a server rejects a folded line or unfolds it (Tornado 6.5 rejects, 6.3 unfolds).
    ("a folded header line", f"GET /echo HTTP/1.1\r\n{KEEP}X-A: a\r\n folded\r\n\r\n", {200, 400}),
    ("an Upgrade to h2c", f"GET /echo HTTP/1.1\r\n{KEEP}Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", 200),
    ("an Expect this server cannot meet", f"GET /echo HTTP/1.1\r\n{KEEP}Expect: teapot\r\n\r\n", 417),
    ("HTTP/1.0 without a Host", "GET /echo HTTP/1.0\r\n\r\n", 200),
    # Bodies
    ("Content-Length too short for the body's fields", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 3\r\n\r\nf=abcdef", 200),
    ("conflicting Content-Length headers", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 3\r\nContent-Length: 4\r\n\r\nf=ab", 400),
    ("a repeated, equal Content-Length", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 3\r\nContent-Length: 3\r\n\r\nf=a", 200),
    ("a Content-Length that is no number", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: three\r\n\r\nf=a", 400),
    ("a negative Content-Length", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: -3\r\n\r\nf=a", 400),
    ("a Content-Length with a plus sign", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: +3\r\n\r\nf=a", 400),
    ("a Content-Length with an underscore", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 0_3\r\n\r\nf=a", 400),
    ("a Content-Length in non-ASCII digits", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: \u0663\r\n\r\nf=a".encode(), 400),
    ("a Content-Length in hexadecimal", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 0x3\r\n\r\nf=a", 400),
    ("Content-Length and chunked together", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked("f=a"), 400),
    ("an unknown Transfer-Encoding", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked("f=a"), 501),
    ("a chunk size that is no number", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\nzz\r\nf=a\r\n0\r\n\r\n", 400),
    pytest.param(
        f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n3\r\nf=abc0\r\n\r\n",
        400,
        marks=pytest.mark.xfail(
            tornado.version_info < (6, 4, 1), reason="Tornado 6.3 closes without an answer and logs an AssertionError", strict=True
        ),
        id="a chunk without its CR LF",
    ),
    # Tornado 6.5 refuses chunk extensions and trailers, 6.3 ignores them; it refuses a
    # chunk declared absurdly large before reading it (400).
    ("a chunk extension", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n3;name=value\r\nf=a\r\n0\r\n\r\n", {200, 400}),
    ("a chunked body with a trailer", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n3\r\nf=a\r\n0\r\nX-Trailer: 1\r\n\r\n", {200, 400}),
    ("a chunk size of 2**64", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nf=a\r\n", 400),
    ("a Content-Length over max_body_size", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 5000000\r\n\r\nf=a", 413),
    ("a chunked body growing past max_body_size", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n" + chunked(*["x" * 65536] * 64), 413),
    ("a chunk declared over twice max_body_size", f"POST /echo HTTP/1.1\r\n{POST}Transfer-Encoding: chunked\r\n\r\n895440\r\nf=a", 400),
    ("Expect: 100-continue", f"POST /echo HTTP/1.1\r\n{POST}Expect: 100-continue\r\nContent-Length: 3\r\n\r\nf=a", 200),
    ("Expect: 100-continue over max_body_size", f"POST /echo HTTP/1.1\r\n{POST}Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n", 413),
    ("invalid UTF-8 in a form field", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 8\r\n\r\nf=%ff%fe", 200),
    ("more form fields than Django allows", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 5889\r\n\r\n" + "&".join(["f=a"] * 1001) + "&" + "x" * 1885, 400),
    ("a form over Django's upload memory limit", f"POST /echo HTTP/1.1\r\n{POST}Content-Length: 3000002\r\n\r\nf=" + "x" * 3000000, 400),
    ("a multipart body without its boundary", f"POST /echo HTTP/1.1\r\n{KEEP}Content-Type: multipart/form-data\r\nContent-Length: 3\r\n\r\nf=a", 400),
    ("a multipart body that breaks off", f"POST /echo HTTP/1.1\r\n{KEEP}Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 40\r\n\r\n--XX\r\nContent-Disposition: form-data; na", 200),  # Django keeps what it could read
]


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [case if isinstance(case, type(pytest.param())) else pytest.param(*case[1:], id=case[0]) for case in HOSTILE_REQUESTS],
)
def test_a_hostile_request_gets_the_right_status_and_at_most_one_log_line(strict, request_bytes, expected):
    if isinstance(request_bytes, str):
        request_bytes = request_bytes.encode("latin-1")
    try:
        status, headers, body = exchange(strict.port, request_bytes, method=request_bytes.split(b" ", 1)[0].decode("latin-1"))
    finally:
        lines = log_lines_of_last_request(strict)  # and the server still serves
    assert status in (expected if isinstance(expected, set) else {expected}), body[:300]
    assert b"Traceback" not in body
    assert "evil" not in str(headers)  # nothing a client sent becomes a response header
    assert not any("Traceback" in line or "ERROR" in line for line in lines), lines
    assert len(lines) <= 1, lines


def test_a_spoofed_forwarded_for_and_proto_are_ignored_without_xheaders(strict):
    status, _, body = exchange(
        strict.port, f"GET /echo HTTP/1.1\r\n{KEEP}X-Forwarded-For: 203.0.113.9\r\nX-Real-Ip: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Scheme: https\r\n\r\n".encode()
    )
    assert status == 200
    assert json.loads(body) | {"remote_addr": "127.0.0.1", "secure": False} == json.loads(body)


def test_pipelined_requests_are_answered_in_order_on_one_connection(strict):
    pipeline = "".join(
        [
            "GET /echo?q=first HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "POST /echo?q=second HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\nf=b",
            "HEAD /echo?q=third HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            f"GET /echo?q=fourth HTTP/1.1\r\n{KEEP}\r\n",
        ]
    )
    with socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) as connection:
        connection.sendall(pipeline.encode())
        time.sleep(0.3)  # the four answers arrive together, as they may on a busy machine
        answers, answered = [], OneBuffer(connection)
        for method in ["GET", "POST", "HEAD", "GET"]:
            response = http.client.HTTPResponse(answered, method=method)
            response.begin()
            answers.append((response.status, response.read()))
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    assert json.loads(answers[0][1])["query"] == ["first"]
    assert json.loads(answers[1][1])["form"] == ["b"]
    assert answers[2][1] == b""
    assert json.loads(answers[3][1])["query"] == ["fourth"]


def test_http_1_0_keep_alive_is_honoured_and_plain_1_0_is_closed(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) as connection:
        for _ in range(2):
            connection.sendall(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = http.client.HTTPResponse(connection)
            response.begin()
            assert (response.status, response.getheader("Connection")) == (200, "Keep-Alive")
            response.read()
        connection.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        response.read()
        assert connection.recv(1) == b""  # closed after a plain HTTP/1.0 answer


@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
def test_the_413_reaches_a_client_still_sending_its_large_body(strict, framing):
    body = b"x" * 20_000_000
    data = body if framing == "Content-Length" else (body[start : start + 65536] for start in range(0, len(body), 65536))
    response = requests.post(strict.url("/echo"), data=data, timeout=TIMEOUT)
    assert response.status_code == 413
    assert response.headers["Connection"] == "close"
    assert requests.get(strict.url("/census"), timeout=TIMEOUT).json()["handlers"] == 0  # nothing left behind


def test_a_client_that_leaves_before_its_answer_is_logged_as_499(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) as connection:
        connection.sendall(b"GET /hold?leaving=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        deadline = time.monotonic() + TIMEOUT
        while requests.get(strict.url("/census"), timeout=TIMEOUT).json()["waiters"] == 0:  # parked
            assert time.monotonic() < deadline
    assert '"GET /hold?leaving=1 HTTP/1.1" 499' in strict.wait_for_line("/hold?leaving=1")


def test_slow_clients_neither_starve_a_normal_one_nor_outlive_their_timeouts(strict):
    head = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"x" * 100
    slow_heads = [socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) for _ in range(500)]
    slow_bodies = [socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) for _ in range(50)]
    for connection in slow_bodies:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    closed_after = {}
    slowest_normal = 0.0
    try:
        for second in range(7):  # one byte per second from each slow client
            for connection in slow_heads + slow_bodies:
                if connection not in closed_after:
                    with contextlib.suppress(OSError):  # closed by the server meanwhile
                        connection.send(head[second : second + 1] if connection in slow_heads else b"x")
            while time.monotonic() < started + second + 1:
                sent = time.monotonic()
                assert get(strict, "/echo").status_code == 200
                slowest_normal = max(slowest_normal, time.monotonic() - sent)
                readable, _, _ = select.select([c for c in slow_heads + slow_bodies if c not in closed_after], [], [], 0.1)
                for connection in readable:
                    with contextlib.suppress(OSError):
                        if connection.recv(1024) == b"":
                            closed_after[connection] = time.monotonic() - started
    finally:
        for connection in slow_heads + slow_bodies:
            connection.close()
    assert slowest_normal < 1
    heads_closed = [closed_after.get(connection, 99) for connection in slow_heads]
    bodies_closed = [closed_after.get(connection, 99) for connection in slow_bodies]
    assert 1.5 < min(heads_closed) and max(heads_closed) < 3.5  # header_timeout=2, not idle_timeout=4
    assert 2.5 < min(bodies_closed) and max(bodies_closed) < 4.5  # body_timeout=3


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=TIMEOUT) as connection:
        connection.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        response.read()
        answered = time.monotonic()
        assert connection.recv(1) == b""  # blocks until the server closes
        idle = time.monotonic() - answered
    assert 3.5 < idle < 6  # idle_timeout=4, not the 2 s header timeout of a new connection


# -- Faults: clients that leave, workers that die, shutdown under load ---------------


# What storm clients send, and what they wait for before leaving (None: leave at various moments).
PLAIN_READERS = [
    (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500, None),
    (b"GET /endless/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"x"),  # the stream has begun
    (b"GET /endless/async HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"x"),
    (b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", None),
]
CHANNEL_READERS = [
    (b"GET /news/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"retry: "),  # the event stream has begun
    (f"GET /news/poll?since={10**15} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(), None),
    (b"GET /news/listen HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", None),
]


async def disconnect_storm(port, clients, kinds=(*PLAIN_READERS, *CHANNEL_READERS)):
    """``clients`` connections that leave mid-body, mid-stream (sync, async, events) and mid-long-poll."""
    limit = asyncio.Semaphore(200)

    async def client(number):
        async with limit:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
            request_bytes, begun = kinds[number % len(kinds)]
            writer.write(request_bytes)
            await writer.drain()
            if begun is not None:
                await asyncio.wait_for(reader.readuntil(begun), TIMEOUT)
            else:
                await asyncio.sleep(0.002 * (number % 7))  # leave at various moments
            if number % 2:
                writer.transport.abort()  # a reset
            else:
                writer.close()  # a clean close

    await asyncio.gather(*(client(number) for number in range(clients)))


def census_when_settled(url):
    """The server's counts once everything in flight is gone (within 5 s), or fail."""
    deadline = time.monotonic() + 5
    while True:
        census = requests.get(url + "census", timeout=TIMEOUT).json()
        if not any(census[key] for key in ("waiters", "generators", "unclosed", "handlers", "readers", "sockets")):
            return census
        assert time.monotonic() < deadline, f"not back to zero 5 s after the storm: {census}"
        time.sleep(0.1)


def memory_growth_over_storms(url, storm, warm_ups=1, measured=1):
    """How much the server grew (RSS, bytes) over each of ``measured`` storms, after ``warm_ups`` storms.

    Every storm must leave nothing behind. CPython and the C allocator keep memory that was freed, and
    a thread pool keeps the threads of its busiest moment, so the server may grow whenever a storm
    sets a new peak; a leak grows it on every storm. The message says how the thread count moved.
    """
    censuses = []
    for _ in range(warm_ups + measured):
        asyncio.run(storm())
        censuses.append(census_when_settled(url))
    censuses = censuses[warm_ups - 1:]
    growths = [after["rss"] - before["rss"] for before, after in itertools.pairwise(censuses)]
    threads = [census["threads"] for census in censuses]
    return growths, f"grew {[round(growth / 2**20, 1) for growth in growths]} MiB with threads {threads}"


def test_disconnect_storms_leave_nothing_behind_and_memory_flat(project):
    with running(project, *runtornado("--threads", "4", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        (growth,), story = memory_growth_over_storms(url, lambda: disconnect_storm(port_of(url), 10_000))
        assert requests.get(url + "state", timeout=TIMEOUT).status_code == 200
        assert server.stop() == 0
    assert growth < 30 * 1024 * 1024, story
    assert not any("Traceback" in line for line in server.output)


class FaultyMiddleware:
    """Raises on the way in or out when the query asks it to."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "fail-in" in request.GET:
            raise RuntimeError("the middleware broke on the way in")
        response = self.get_response(request)
        if "fail-out" in request.GET:
            raise RuntimeError("the middleware broke on the way out")
        return response


@pytest.mark.parametrize("path", ["/fast", "/answer-at-once", "/coroutine", "/wait"])
@pytest.mark.parametrize("where", ["fail-in", "fail-out"])
def test_an_exception_in_middleware_ends_that_request_with_500_and_nothing_else(database, path, where):
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, f"{__name__}.FaultyMiddleware"]), LiveServer(make_app(threads=2)) as live:
        assert get(live, f"{path}?{where}=1").status_code == 500
        assert get(live, "/fast").status_code == 200
        wait_for(lambda: not live.app.django_bridge.active_handlers)  # a parked /wait did not stay parked
        assert waiters == []


def test_a_worker_killed_under_load_is_replaced_while_the_others_serve(project):
    with running(project, *runtornado("--processes", "2", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        outcomes = []  # (time, pid or None for an error)
        stop_load = threading.Event()

        def load():
            while not stop_load.is_set():
                try:
                    outcomes.append((time.monotonic(), requests.get(url + "state", timeout=TIMEOUT).json()["pid"]))
                except requests.RequestException:
                    outcomes.append((time.monotonic(), None))

        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            wait_for(lambda: len({pid for _, pid in outcomes} - {None}) == 2, TIMEOUT)
            victim = outcomes[-1][1]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            server.wait_for_line(f"(pid {victim}) exited with code -9; starting a new one")
            wait_for(lambda: len({pid for _, pid in outcomes if pid is not None} - {victim}) == 2, TIMEOUT)  # the replacement serves
        finally:
            stop_load.set()
            for client in clients:
                client.join(TIMEOUT)
        after_kill = [pid for at, pid in outcomes if at > killed]
        assert after_kill.count(None) <= 4  # at most the requests in flight on the killed worker
        assert len([pid for pid in after_kill if pid is not None]) > 10  # the other worker went on serving
        assert server.stop() == 0


def test_sigterm_under_load_answers_every_request_it_accepted_and_exits_0(project):
    with running(project, *runtornado("--grace-period", "5", "127.0.0.1:0")) as server:
        (url,) = server.wait_for_banner()
        answers, dropped = [], []
        stop_load = threading.Event()

        def call(path, client=requests):
            try:
                answers.append((path, client.get(url + path, timeout=TIMEOUT).status_code))
            except requests.RequestException as error:
                if "Connection refused" not in str(error):  # refused at connect: never accepted
                    dropped.append((path, repr(error)))
                return False
            return True

        def load(client):
            while call("state", client) and not stop_load.is_set():
                pass

        # New connections, and kept-alive ones (which get "Connection: close" once the server stops).
        clients = [threading.Thread(target=load, args=(requests.Session() if number % 2 else requests,)) for number in range(6)]
        clients += [threading.Thread(target=call, args=(path,)) for path in ["slow?seconds=1.5", "slow?seconds=1.5", "park", "park"]]
        for client in clients:
            client.start()
        server.wait_for_lines(*["slow view started", "long-poll parked"] * 2)
        started = time.monotonic()
        try:
            assert server.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < 5
        finally:
            stop_load.set()
            for client in clients:
                client.join(TIMEOUT)
    assert dropped == []
    assert sorted(status for path, status in answers if path != "state") == [200, 200, 503, 503]
    assert {status for path, status in answers if path == "state"} == {200}


# -- Live updates across processes: Redis, its outages, shutdown, slow readers, a browser --


@contextlib.contextmanager
def channel_server(project, channels_url, *args, environment=None):
    """A runtornado process whose ``news`` channel lives at ``channels_url``; yields (server, base URL)."""
    with running(project, *runtornado("--threads", "4", *args), environment={"TEST_CHANNELS_URL": channels_url, **(environment or {})}) as server:
        yield server, server.wait_for_banner()[0]


def census_of(base):
    return requests.get(base + "census", timeout=TIMEOUT).json()


def publish_over_http(base, text, **form):
    response = requests.post(base + "news/publish", data={"text": text, **form}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def publish_from_a_plain_process(project, channels_url, *texts, environment=None):
    """Publish from a separate Python process with no IOLoop, as a management command or a task would."""
    return subprocess.run(
        [sys.executable, "publish.py", *texts],
        cwd=project, capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={
            **os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(HERE)]), "DJANGO_SETTINGS_MODULE": "project_settings",
            "TEST_CHANNELS_URL": channels_url, **(environment or {}),
        },
    )


def open_event_stream(base, path="news/events", headers=()):
    """An event stream client, once the stream has opened (its ``retry:`` line has come)."""
    client = EventStreamClient(port_of(base), "/" + path, headers)
    assert client.next_frame() == {"retry": "2000"}
    return client


def test_with_redis_an_event_published_anywhere_reaches_every_kind_of_reader_in_every_process(project, redis_url):
    with (
        channel_server(project, redis_url, "127.0.0.1:0") as (_, first),
        channel_server(project, redis_url, "127.0.0.1:0") as (_, second),
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        bases = (first, second)
        pids = {census_of(base)["pid"] for base in bases}
        assert len(pids) == 2
        publishers = [
            ("the first server", lambda text: publish_over_http(first, text)),
            ("the second server", lambda text: publish_over_http(second, text)),
            ("a plain process", lambda text: int(publish_from_a_plain_process(project, redis_url, text).stdout)),
        ]
        since = now_stamp()
        for where, publish in publishers:
            streams = [open_event_stream(base) for base in bases]
            polls = [pool.submit(requests.get, base + f"news/poll?since={since}", timeout=TIMEOUT) for base in bases]
            listens = [pool.submit(requests.get, base + "news/listen", timeout=TIMEOUT) for base in bases]
            wait_for(lambda: all(census_of(base)["readers"] == 3 for base in bases))
            text = f"published by {where}"
            event_id = publish(text)
            try:
                for stream in streams:
                    event = stream.next_event()
                    assert (event["id"], json.loads(event["data"])["text"]) == (str(event_id), text), where
            finally:
                for stream in streams:
                    stream.close()
            for answer in [poll.result(TIMEOUT).json() for poll in polls]:
                assert [(event["id"], event["data"]["text"]) for event in answer["events"]] == [(event_id, text)], where
            assert {answer.result(TIMEOUT).json()["event"]["id"] for answer in listens} == {event_id}, where
            since = event_id


class RedisServer:
    """A real redis-server on a free loopback port; ``persistent`` keeps its data on disk across a restart."""

    def __init__(self, folder, persistent=False):
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it)"
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence, "--dir", str(folder)]
        self.process = None

    def start(self):
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)


@pytest.fixture
def restartable_redis(tmp_path):
    """A redis-server that a test can stop and start again on the same port, keeping its data on disk."""
    redis_server = RedisServer(tmp_path, persistent=True)
    redis_server.start()
    try:
        yield redis_server
    finally:
        redis_server.stop()


def test_readers_ride_out_a_redis_restart_and_the_publisher_hears_it_was_down(project, restartable_redis):
    url = restartable_redis.url
    with (
        channel_server(project, url, "127.0.0.1:0") as (first_server, first),
        channel_server(project, url, "127.0.0.1:0") as (second_server, second),
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        streams = [open_event_stream(base) for base in (first, second)]
        wait_for(lambda: census_of(first)["readers"] == census_of(second)["readers"] == 1)
        before = publish_over_http(first, "before")
        for stream in streams:
            assert json.loads(stream.next_event()["data"])["text"] == "before"
        polls = [pool.submit(requests.get, base + f"news/poll?since={before}", timeout=TIMEOUT) for base in (first, second)]
        wait_for(lambda: census_of(first)["readers"] == census_of(second)["readers"] == 2)

        restartable_redis.stop()
        refused = requests.post(first + "news/publish", data={"text": "lost"}, timeout=TIMEOUT)
        assert refused.status_code == 503
        assert "Redis at redis://127.0.0.1" in refused.json()["error"] and "unreachable" in refused.json()["error"]
        plain = publish_from_a_plain_process(project, url, "also lost")
        assert plain.returncode == 1
        assert plain.stderr.splitlines()[-1].startswith("ChannelUnavailable: can't publish to 'news': Redis at redis://127.0.0.1")
        first_server.wait_for_line("is unreachable")
        second_server.wait_for_line("is unreachable")

        restartable_redis.start()
        # Published before the servers are back on Redis: they find these in the backlog.
        assert publish_from_a_plain_process(project, url, "after 1", "after 2").returncode == 0
        publish_over_http(second, "after 3")
        for stream in streams:
            assert [json.loads(stream.next_event()["data"])["text"] for _ in range(3)] == ["after 1", "after 2", "after 3"]
        for poll in polls:
            assert poll.result(TIMEOUT).json()["events"][0]["data"]["text"] == "after 1"
        last = publish_over_http(first, "the end")
        for stream in streams:  # nothing came twice: the next event is the last one
            assert stream.next_event()["id"] == str(last)
            stream.close()
        for server in (first_server, second_server):
            server.wait_for_line("is reachable again")
        assert first_server.stop() == second_server.stop() == 0
    for server in (first_server, second_server):
        log = "".join(server.output)
        assert log.count("is unreachable") == 1 and log.count("reachable again") == 1  # one line per outage, not per request
        assert "Traceback" not in log


def test_sigterm_answers_channel_long_polls_with_no_events_and_ends_event_streams_cleanly(project):
    with channel_server(project, "memory://", "127.0.0.1:0") as (server, base), concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = open_event_stream(base)
        poll = pool.submit(requests.get, base + f"news/poll?since={now_stamp() + 10**9}", timeout=TIMEOUT)
        listen = pool.submit(requests.get, base + "news/listen", timeout=TIMEOUT)
        wait_for(lambda: census_of(base)["readers"] == 3)
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 5  # not the 30 s grace period: nothing is left waiting
        assert poll.result(TIMEOUT).json()["events"] == []
        assert listen.result(TIMEOUT).json()["event"] is None
        assert stream.next_frame() is None  # the final chunk: a clean end (an abrupt one raises IncompleteRead)
        stream.close()


def test_an_event_stream_whose_client_stops_reading_is_closed_at_its_bound_with_memory_flat(project):
    with channel_server(project, "memory://", "127.0.0.1:0", environment={"TEST_BACKLOG": "5"}) as (server, base):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
        reader.settimeout(TIMEOUT)
        reader.connect(("127.0.0.1", port_of(base)))
        reader.sendall(b"GET /news/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert reader.recv(64).startswith(b"HTTP/1.1 200")  # and then it reads no more
        wait_for(lambda: census_of(base)["readers"] == 1)
        rss_before = census_of(base)["rss"]
        with requests.Session() as publisher:
            for number in range(200):  # 20 MB of events, of which the backlog keeps the last 5
                publisher.post(base + "news/publish", data={"text": str(number), "padding": "100000"}, timeout=TIMEOUT)
        server.wait_for_line("bytes of events unread; closed")
        wait_for(lambda: census_of(base)["readers"] == 0)
        assert census_of(base)["rss"] - rss_before < 8 * 1024 * 1024
        reader.close()
        assert server.stop() == 0


def test_disconnect_storms_leave_no_channel_reader_or_redis_subscription_behind(project, redis_url):
    import redis

    with channel_server(project, redis_url, "127.0.0.1:0") as (server, base):
        # Measured on Python 3.10: the storm after the first still grows the server by 10-23 MiB, and
        # later ones by 0-2 MiB, or 7 when the waiting pool (where /news/listen's sync cycle waits)
        # reaches a new peak of threads. Leaking 8 KB per reader grows it by 14-19 MiB on each.
        growths, story = memory_growth_over_storms(
            base, lambda: disconnect_storm(port_of(base), 3_000, kinds=CHANNEL_READERS), warm_ups=2, measured=2,
        )
        subscriptions = redis.Redis.from_url(redis_url).pubsub_numsub("django_tornado:{news}")
        assert subscriptions[0][1] <= 1  # one per process, however many readers came and went
        assert server.stop() == 0
    assert min(growths) < 10 * 1024 * 1024, story
    assert not any("Traceback" in line for line in server.output)


def test_an_event_source_in_a_real_browser_loses_nothing_across_a_server_restart(project, redis_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    environment = {"TEST_BACKLOG": "5"}  # the publisher's backlog is the one kept
    publish = functools.partial(publish_from_a_plain_process, project, redis_url, environment=environment)

    def shown(page, texts):
        page.wait_for_function(f"document.querySelectorAll('#events li').length >= {len(texts)}")
        assert page.locator("#events li").all_inner_texts() == texts

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=CHROMIUM_ARGUMENTS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT * 1000)
            with channel_server(project, redis_url, address, environment=environment) as (server, base):
                page.goto(base + "news/page")
                page.wait_for_function("document.title === 'opened 1'")
                wait_for(lambda: census_of(base)["readers"] == 1)
                publish("one", "two", "three")
                shown(page, ["one", "two", "three"])
                assert server.stop() == 0  # mid-stream: the page's EventSource retries every 2 s
            publish("four", "five")  # while no server runs
            with channel_server(project, redis_url, address, environment=environment) as (server, base):
                page.wait_for_function("document.title === 'opened 2'")  # reconnected, with Last-Event-ID
                publish("six")
                shown(page, ["one", "two", "three", "four", "five", "six"])
                assert server.stop() == 0
            publish(*(f"lost {number}" for number in range(6)), "seven")  # more than the backlog of 5 keeps
            with channel_server(project, redis_url, address, environment=environment):
                page.wait_for_function("document.title === 'opened 3'")
                shown(page, ["one", "two", "three", "four", "five", "six", "reset", "lost 2", "lost 3", "lost 4", "lost 5", "seven"])
                page.screenshot(path=tmp_path / "event-source.png")
        finally:
            browser.close()
    print(f"event source screenshot: {tmp_path / 'event-source.png'}")


def open_news_socket(base, query=""):
    client = SocketClient(f"ws://127.0.0.1:{port_of(base)}/news/socket{query}")
    assert "pid" in client.receive()
    return client


def test_sigterm_closes_every_websocket_with_1001_after_what_was_sent_and_exits_0(project):
    with channel_server(project, "memory://", "127.0.0.1:0") as (server, base):
        clients = [open_news_socket(base) for _ in range(3)]
        wait_for(lambda: census_of(base)["sockets"] == 3)
        event_id = publish_over_http(base, "last words")
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 5
        for client in clients:
            assert client.receive()["id"] == event_id  # what was queued went first
            assert client.receive() is None
            assert client.close_code == 1001
            client.close()


def test_with_redis_a_channel_event_reaches_sockets_in_two_processes(project, redis_url):
    with channel_server(project, redis_url, "127.0.0.1:0") as (_, first), channel_server(project, redis_url, "127.0.0.1:0") as (_, second):
        clients = [open_news_socket(base) for base in (first, second) for _ in range(2)]
        wait_for(lambda: census_of(first)["sockets"] == census_of(second)["sockets"] == 2)
        event_id = publish_over_http(second, "to every socket")
        try:
            for client in clients:
                assert client.receive() == {"id": event_id, "data": {"text": "to every socket", "padding": ""}}
        finally:
            for client in clients:
                client.close()


async def vanishing_sockets(port, count):
    """``count`` WebSockets that open, maybe begin a message, then vanish without a close frame."""
    limit = asyncio.Semaphore(200)
    handshake = (b"GET /news/socket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    async def client(number):
        async with limit:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
            writer.write(handshake)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            if number % 3 == 1:
                writer.write(frame(0x1, b"half a message that never ends")[:12])  # mid-message
            elif number % 3 == 2:
                writer.write(frame(0x1, b"x" * 100, fin=False))  # the first of fragments that never come
            await writer.drain()
            if number % 2:
                writer.transport.abort()
            else:
                writer.close()

    await asyncio.gather(*(client(number) for number in range(count)))


def test_five_thousand_sockets_that_vanish_leave_nothing_behind_and_memory_flat(project):
    with channel_server(project, "memory://", "127.0.0.1:0") as (server, base):
        (growth,), story = memory_growth_over_storms(base, lambda: vanishing_sockets(port_of(base), 5_000))
        client = open_news_socket(base)  # and a new one works
        client.close()
        assert server.stop() == 0
    assert growth < 20 * 1024 * 1024, story
    assert not any("Traceback" in line for line in server.output)


def test_a_websocket_whose_client_stops_reading_is_closed_with_1008_at_its_bound_with_memory_flat(project):
    with channel_server(project, "memory://", "127.0.0.1:0", environment={"TEST_BACKLOG": "5"}) as (server, base):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(TIMEOUT)
        reader.connect(("127.0.0.1", port_of(base)))
        reader.sendall(b"GET /news/socket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert reader.recv(12) == b"HTTP/1.1 101"  # and then it reads no more
        wait_for(lambda: census_of(base)["readers"] == 1)
        rss_before = census_of(base)["rss"]
        with requests.Session() as publisher:
            for number in range(200):  # 20 MB to a socket that takes none of it
                publisher.post(base + "news/publish", data={"text": str(number), "padding": "100000"}, timeout=TIMEOUT)
        server.wait_for_line("unread; closing it with 1008")
        assert census_of(base)["rss"] - rss_before < 8 * 1024 * 1024
        wait_for(lambda: census_of(base)["sockets"] == 0, timeout=10)  # its close is not answered: dropped after 5 s
        reader.close()
        assert server.stop() == 0


# -- chat_example.py: node_chat's room, run as a newcomer runs it ---------------------


@pytest.fixture(scope="module")
def chat():
    """One chat room on two ports of one process; returns its two base URLs."""
    with running(HERE, "chat_example.py", "127.0.0.1:0", "127.0.0.1:0", settings_module="") as server:
        yield server.wait_for_banner()


def chat_get(base, path, **parameters):
    return requests.get(base + path, params=parameters, timeout=TIMEOUT)


def join(base, nick):
    response = chat_get(base, "join", nick=nick, _=str(time.time()))  # jQuery's cache-buster is ignored
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_speaks_node_chats_api_on_both_ports_of_one_room(chat):
    first, second = chat
    since = now_stamp()
    # The original client long-polls before joining, with an empty (or no) id.
    early = concurrent.futures.ThreadPoolExecutor(2)
    parked = [early.submit(chat_get, first, "recv", since=since, id=""), early.submit(chat_get, second, "recv", since=since)]
    session = join(second, "ada_-^!")
    assert session["nick"] == "ada_-^!"
    assert isinstance(session["rss"], int) and session["rss"] > 1_000_000  # the process's real memory
    assert abs(session["starttime"] - now_stamp()) < 3_600_000  # milliseconds since the epoch
    for waiting in parked:
        (message,) = waiting.result(TIMEOUT).json()["messages"]
        assert message["nick"] == "ada_-^!"
        assert message["type"] == "join"
        assert message["timestamp"] > since
    text = "<b>bold</b> & ünïcode ✓  spaced"
    assert chat_get(first, "send", id=session["id"], text=text).json().keys() == {"rss"}
    posted = requests.post(first + "send", data={"id": session["id"], "text": "by POST"}, timeout=TIMEOUT)
    assert posted.json().keys() == {"rss"}
    messages = chat_get(second, "recv", since=message["timestamp"], id=session["id"]).json()["messages"]
    assert [(m["type"], m["text"]) for m in messages] == [("msg", text), ("msg", "by POST")]  # exactly as sent
    assert messages[0]["timestamp"] < messages[1]["timestamp"]
    assert "ada_-^!" in chat_get(first, "who").json()["nicks"]
    assert chat_get(first, "part", id=session["id"]).json().keys() == {"rss"}
    assert "ada_-^!" not in chat_get(second, "who").json()["nicks"]
    last = chat_get(first, "recv", since=messages[1]["timestamp"]).json()["messages"]
    assert [(m["type"], m["nick"]) for m in last] == [("part", "ada_-^!")]


@pytest.mark.parametrize(
    ("path", "parameters", "error"),
    [
        ("recv", {}, "since"),
        ("recv", {"since": "yesterday"}, "since"),
        ("recv", {"since": "1", "id": "no-such-session"}, "No such session id."),
        ("send", {"id": "no-such-session", "text": "hi"}, "No such session id."),
        ("part", {"id": "no-such-session"}, "No such session id."),
        ("join", {}, "Bad nick."),
        ("join", {"nick": "x" * 51}, "Nick too long"),
        ("join", {"nick": "<img src=x onerror=alert(1)>"}, "Bad character in nick"),
        ("join", {"nick": "taken"}, "Nick in use."),
        ("send", {"text": ""}, "Empty message."),
        ("send", {"text": "x" * 2001}, "Message too long"),
    ],
)
def test_chat_answers_bad_input_with_400_and_an_error(chat, path, parameters, error):
    first, _ = chat
    with contextlib.suppress(AssertionError):
        join(first, "taken")
    if "text" in parameters and "id" not in parameters:
        parameters = {**parameters, "id": join(first, f"writer{time.monotonic_ns()}")["id"]}
    response = chat_get(first, path, **parameters)
    assert response.status_code == 400
    assert error in response.json()["error"]


def test_chat_answers_only_to_its_own_host_names(chat):
    first, _ = chat
    assert requests.get(first + "who", headers={"Host": "localhost"}, timeout=TIMEOUT).status_code == 200
    assert requests.get(first + "who", headers={"Host": "elsewhere.example"}, timeout=TIMEOUT).status_code == 400


def test_chat_accepts_the_longest_nick(chat):
    first, _ = chat
    assert join(first, "n" * 50)["nick"] == "n" * 50


def test_chat_loses_and_repeats_no_message_under_concurrent_senders(chat):
    first, second = chat
    since = now_stamp()
    senders = [join(first, f"sender{number}") for number in range(3)]
    expected = {f"{number}:{index}" for number in range(3) for index in range(300)}
    done = threading.Event()

    def receive(base):
        received, cursor = [], since
        with requests.Session() as client:
            while len(received) < len(expected) and not done.is_set():
                for message in client.get(base + "recv", params={"since": cursor}, timeout=TIMEOUT).json()["messages"]:
                    cursor = message["timestamp"]
                    if message["type"] == "msg":
                        received.append((message["timestamp"], message["text"]))
        return received

    def send(number):
        with requests.Session() as client:
            for index in range(300):
                client.get(second + "send", params={"id": senders[number]["id"], "text": f"{number}:{index}"}, timeout=TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(23) as pool:
        receivers = [pool.submit(receive, (first, second)[number % 2]) for number in range(20)]
        for sent in [pool.submit(send, number) for number in range(3)]:
            sent.result(60)
        try:
            results = [receiver.result(60) for receiver in receivers]
        finally:
            done.set()
    for received in results:
        texts = [text for _, text in received]
        assert len(texts) == len(expected) and set(texts) == expected  # all 900, none twice
        assert [stamp for stamp, _ in received] == sorted({stamp for stamp, _ in received})  # in stamp order
        for number in range(3):  # and each sender's in the order sent
            assert [text for text in texts if text.startswith(f"{number}:")] == [f"{number}:{index}" for index in range(300)]


def test_chat_bookkeeping_stays_bounded_over_ten_thousand_departures(chat):
    first, second = chat
    port = port_of(first)
    request = f"GET /recv?since={now_stamp() + 10**9}&id= HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    for _ in range(100):  # 100 rounds of 100 clients that park a long-poll and leave
        clients = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(100)]
        for client in clients:
            client.sendall(request)
        for client in clients:
            client.close()
    for number in range(200):  # and users who join and part
        session = join(second, f"visitor{number}")
        assert chat_get(first, "part", id=session["id"]).status_code == 200
    wait_for(lambda: chat_get(first, "stats").json()["waiters"] == 0, timeout=TIMEOUT)
    stats = chat_get(first, "stats").json()
    assert stats["sessions"] < 50  # only the other tests' users
    assert stats["messages"] <= 200  # the backlog is bounded


def test_chat_answers_parked_long_polls_with_no_messages_when_it_stops():
    with running(HERE, "chat_example.py", "127.0.0.1:0", settings_module="") as server:
        (base,) = server.wait_for_banner()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            parked = pool.submit(chat_get, base, "recv", since=now_stamp() + 10**9)
            wait_for(lambda: chat_get(base, "stats").json()["waiters"] == 1)
            assert server.stop() == 0
            answer = parked.result(TIMEOUT)
    assert answer.status_code == 200
    assert answer.json()["messages"] == []


def test_chat_refuses_worker_processes_without_redis():
    with running(HERE, "chat_example.py", "--processes", "2", "8000", settings_module="") as refused:
        code = refused.process.wait(TIMEOUT)
        refused.stop()
    assert code == 2
    assert "--processes needs --redis URL" in refused.output[-1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, for this module's tests."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    try:
        yield redis_server.url
    finally:
        redis_server.stop()


def test_chat_rooms_in_redis_are_one_room_across_processes(redis_url):
    with (
        running(HERE, "chat_example.py", "--redis", redis_url, "127.0.0.1:0", settings_module="") as worker_a,
        running(HERE, "chat_example.py", "--redis", redis_url, "--processes", "2", "127.0.0.1:0", settings_module="") as worker_b,
    ):
        (a,) = worker_a.wait_for_banner()
        (b,) = worker_b.wait_for_banner()
        session = join(a, "grace")
        since = now_stamp()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            parked = pool.submit(chat_get, b, "recv", since=since, id=session["id"])  # sessions live in Redis too
            wait_for(lambda: chat_get(b, "stats").json()["waiters"] >= 1)
            chat_get(a, "send", id=session["id"], text="across processes")
            (message,) = parked.result(TIMEOUT).json()["messages"]
        assert (message["nick"], message["text"]) == ("grace", "across processes")
        assert "grace" in chat_get(b, "who").json()["nicks"]
        assert chat_get(b, "join", nick="grace").json() == {"error": "Nick in use."}
        assert worker_a.stop() == 0
        # Worker A is gone; its user carries on through B.
        chat_get(b, "send", id=session["id"], text="still here")
        assert chat_get(b, "recv", since=message["timestamp"]).json()["messages"][0]["text"] == "still here"


def test_chat_socket_speaks_for_a_joined_session_and_refuses_other_sites(chat):
    first, second = chat
    since = now_stamp()
    listener = SocketClient(f"ws://127.0.0.1:{port_of(second)}/socket?since={since}")
    speaker = SocketClient(f"ws://127.0.0.1:{port_of(first)}/socket?since={since}")
    try:
        speaker.send(json.dumps({"text": "anonymous"}))
        assert speaker.receive() == {"error": "No such session id."}
        speaker.send("not json")
        assert "Send JSON" in speaker.receive()["error"]
        session = join(first, "socketeer")
        speaker.send(json.dumps({"id": session["id"]}))
        speaker.send(json.dumps({"text": "over the socket"}))
        heard = [listener.receive() for _ in range(2)]  # on the other port: the same room
        assert [(message["type"], message["nick"], message["text"]) for message in heard] == [
            ("join", "socketeer", None), ("msg", "socketeer", "over the socket"),
        ]
        long_polled = chat_get(first, "recv", since=since).json()["messages"]  # node_chat's clients hear it too
        assert [message["text"] for message in long_polled if message["type"] == "msg"] == ["over the socket"]
    finally:
        listener.close()
        speaker.close()
    assert handshake_refusal(f"ws://127.0.0.1:{port_of(first)}/socket?since=1", headers={"Origin": "http://evil.example"}) == 403
    assert handshake_refusal(f"ws://127.0.0.1:{port_of(first)}/socket?since=1&id=nobody") == 400


def test_chat_page_in_a_real_browser(chat, tmp_path):
    from playwright.sync_api import sync_playwright

    first, second = chat
    dialogs = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=CHROMIUM_ARGUMENTS)
        try:
            pages = []
            # Alice's page talks over a WebSocket; Bob's browser has none, so his long-polls (node_chat's API).
            for base, nick, transport in ((first, "alice", "WebSocket"), (second, "bob", "long-poll")):
                page = browser.new_page(viewport={"width": 900, "height": 520})
                page.set_default_timeout(TIMEOUT * 1000)
                page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
                if transport == "long-poll":
                    page.add_init_script("delete window.WebSocket")
                page.goto(base)
                page.fill("#nick", nick)
                page.click("#join")
                page.wait_for_selector("#toolbar:not([hidden])")
                page.wait_for_selector(f"#transport >> text={transport}")
                pages.append(page)
            alice, bob = pages
            alice.fill("#text", "hello bob")
            alice.press("#text", "Enter")
            bob.wait_for_selector(".message.msg >> text=hello bob")
            bob.fill("#text", "<img src=x onerror=alert(1)>")
            bob.press("#text", "Enter")
            alice.wait_for_selector(".message.msg >> text=<img src=x onerror=alert(1)>")  # shown as text
            alice.click("#users-toggle")
            alice.wait_for_selector("#users >> text=bob")
            assert "alice" in bob.inner_text("#users")
            assert alice.locator("#log img").count() == 0
            alice.screenshot(path=tmp_path / "chat.png")
        finally:
            browser.close()
    assert dialogs == []  # no script from a message ever ran
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    print(f"chat screenshot: {tmp_path / 'chat.png'}")
