"""The Django app bench/live.py serves: one channel, "news", read by long-polls and event streams.

Settings as in bench/app.py (DEBUG off, startproject's middleware, no access
log, no database). ``BENCH_LIVE`` picks what serves the channel:

- ``ours`` (default): django_tornado's Channel and EventStream; the backend is
  ``BENCH_CHANNELS_URL`` (``memory://`` by default, or ``redis://...``),
  given to django_tornado as ``TORNADO_CHANNELS_URL``. Served by django_tornado
  (bench/live_servers.py ``ours``).
- ``eventstream``: django-eventstream's own view on the channel "news", with
  ``EVENTSTREAM_REDIS`` on ``BENCH_REDIS_PORT`` (and, with
  ``BENCH_ES_STORAGE=redis``, its RedisStorage for replay). Served by daphne
  from ``asgi`` (bench/live_servers.py ``daphne``), as its README says.

Views:
  /sync       a small JSON answer (run.Server waits for it)
  /live       the event stream of "news" (Server-Sent Events)
  /poll       ours only: an @asynchronous long-poll, Channel.query() after ?since= (default: now)
  /publish    publish one event to "news" from this process; answers its id
  /waiting    readers of "news" in this process (long-polls and streams)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import django_settings

PEER = os.environ.get("BENCH_LIVE", "ours")
CHANNEL = "news"
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))

extra = {}
if PEER == "eventstream":
    extra["EVENTSTREAM_REDIS"] = {"host": "127.0.0.1", "port": REDIS_PORT, "db": 0}
    if os.environ.get("BENCH_ES_STORAGE") == "redis":
        extra["EVENTSTREAM_STORAGE_CLASS"] = "django_eventstream.storage.RedisStorage"
        extra["EVENTSTREAM_STORAGE_CONNECTION"] = {"host": "127.0.0.1", "port": REDIS_PORT, "db": 1}
    # daphne first, as django-eventstream's setup lists it
    extra["INSTALLED_APPS"] = ["daphne", *django_settings.CONTRIB_APPS, "django_eventstream"]
else:
    extra["TORNADO_CHANNELS_URL"] = os.environ.get("BENCH_CHANNELS_URL", "memory://")
django_settings.configure(__name__, **extra)

import django

django.setup()

from django.http import JsonResponse
from django.urls import include, path

ANSWER = {"hello": "world", "served_by": "django"}


def sync_json(request):
    return JsonResponse(ANSWER)


if PEER == "eventstream":
    import django_eventstream
    from django_eventstream import send_event
    from django_eventstream.views import get_listener_manager

    def publish(request):
        send_event(CHANNEL, "message", ANSWER)
        return JsonResponse({"sent": True})

    def waiting(request):
        manager = get_listener_manager()
        with manager.lock:
            return JsonResponse({"waiting": len(manager.listeners_by_channel.get(CHANNEL, ()))})

    urlpatterns = [
        path("sync", sync_json),
        path("live", include(django_eventstream.urls), {"channels": [CHANNEL]}),
        path("publish", publish),
        path("waiting", waiting),
    ]
else:
    import django_tornado
    from django_tornado import Channel, EventStream, asynchronous

    news = Channel(CHANNEL)

    def live(request):
        return EventStream(news, request)

    @asynchronous
    def poll(request, handler):
        since = int(request.GET.get("since") or time.time_ns() // 1_000_000)  # ids are the millisecond clock
        news.query(handler.async_callback(lambda events: handler.finish({"events": events})), since)

    def publish(request):
        return JsonResponse({"id": news.publish(ANSWER)})

    def waiting(request):
        # django_tornado's internals (no public count): the readers of "news" on this process's IOLoops.
        total = 0
        for backend in list(django_tornado._backends.values()):
            for hub in list(backend.hubs.values()):
                watch = hub.watches.get(CHANNEL)
                total += len(watch.readers) if watch is not None else 0
        return JsonResponse({"waiting": total})

    urlpatterns = [
        path("sync", sync_json),
        path("live", live),
        path("poll", poll),
        path("publish", publish),
        path("waiting", waiting),
    ]

from django.core.asgi import get_asgi_application

asgi = get_asgi_application()
