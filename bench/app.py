"""The one small Django app every server in the benchmark serves.

DEBUG off and Django's default middleware (``BENCH_MIDDLEWARE=minimal`` for
none but CommonMiddleware). ``wsgi`` and ``asgi`` are the application objects
the WSGI and ASGI servers load; django_tornado serves the same urlconf.

Views:
  /sync, /async        a small JSON answer, from a plain and an async def view
  /asynchronous        the same from an @asynchronous view answering at once
  /block               a plain view that blocks 20 ms (a slow query stand-in)
  /nap                 an async def view awaiting ?seconds= (2 by default)
  /stream/sync|async   5 chunks 0.5 s apart, from a sync or an async iterator
  /poll, /publish      park until /publish wakes every parked request
"""

import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import django_settings

django_settings.configure(
    __name__,
    **({"MIDDLEWARE": ["django.middleware.common.CommonMiddleware"]} if os.environ.get("BENCH_MIDDLEWARE") == "minimal" else {}),
)

import django

django.setup()

from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path

from django_tornado import asynchronous

ANSWER = {"hello": "world", "served_by": "django"}


def sync_json(request):
    return JsonResponse(ANSWER)


async def async_json(request):
    return JsonResponse(ANSWER)


@asynchronous
def asynchronous_json(request, handler):
    return JsonResponse(ANSWER)


def block(request):
    time.sleep(0.02)
    return JsonResponse(ANSWER)


async def nap(request):
    await asyncio.sleep(float(request.GET.get("seconds", "2")))
    return JsonResponse(ANSWER)


def stream_sync(request):
    def chunks():
        for number in range(5):
            yield f"chunk {number}\n"
            if number < 4:
                time.sleep(0.5)

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def stream_async(request):
    async def chunks():
        for number in range(5):
            yield f"chunk {number}\n"
            if number < 4:
                await asyncio.sleep(0.5)

    return StreamingHttpResponse(chunks(), content_type="text/plain")


# Long-poll fan-out. Under django_tornado /poll is @asynchronous and holds no
# thread; under ASGI servers (BENCH_POLL=asgi) it is an async def view awaiting
# an event. WSGI servers would hold a worker thread per waiter.
_waiters: list = []
_waiters_lock = threading.Lock()
_event = None
_parked_on_event = [0]


@asynchronous
def poll(request, handler):
    callback = handler.async_callback(handler.finish)
    with _waiters_lock:
        _waiters.append(callback)
    handler.add_disconnect_callback(lambda: _forget(callback))


def _forget(callback):
    with _waiters_lock:
        if callback in _waiters:
            _waiters.remove(callback)


def publish(request):
    with _waiters_lock:
        woken, _waiters[:] = list(_waiters), []
    for callback in woken:
        callback(ANSWER)
    return JsonResponse({"woken": len(woken)})


async def poll_asgi(request):
    global _event
    if _event is None:
        _event = asyncio.Event()
    event = _event
    _parked_on_event[0] += 1
    try:
        await event.wait()
    finally:
        _parked_on_event[0] -= 1
    return JsonResponse(ANSWER)


async def publish_asgi(request):
    global _event
    event, _event = _event, None
    if event is not None:
        event.set()
    return JsonResponse({"woken": True})


def waiting(request):
    with _waiters_lock:
        return JsonResponse({"waiting": len(_waiters) + _parked_on_event[0]})


ASGI_POLL = os.environ.get("BENCH_POLL") == "asgi"
urlpatterns = [
    path("sync", sync_json),
    path("async", async_json),
    path("asynchronous", asynchronous_json),
    path("block", block),
    path("nap", nap),
    path("stream/sync", stream_sync),
    path("stream/async", stream_async),
    path("poll", poll_asgi if ASGI_POLL else poll),
    path("publish", publish_asgi if ASGI_POLL else publish),
    path("waiting", waiting),
]

from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

wsgi = get_wsgi_application()
asgi = get_asgi_application()
