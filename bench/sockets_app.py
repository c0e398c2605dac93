"""The Django app bench/sockets.py serves: one channel or group, "news", read by WebSockets.

Settings as in bench/app.py (DEBUG off, startproject's middleware), plus a
SQLite file database (``BENCH_DB``, made by ``sockets_servers.py setup``) and
database sessions, Django's defaults, for the handshakes with a logged-in
user. ``BENCH_WS`` picks what serves the sockets:

- ``ours`` (default): django_tornado's WebSocket subscribed to a Channel; the
  channels' backend is ``BENCH_CHANNELS_URL`` (``memory://`` by default, or
  ``redis://...``), given to django_tornado as ``TORNADO_CHANNELS_URL``.
  Served by django_tornado (bench/sockets_servers.py ``ours``).
- ``channels``: Channels 4.x, a consumer that group_add's on connect and
  forwards the group's messages, behind AllowedHostsOriginValidator and
  AuthMiddlewareStack (Channels' tutorial stack). ``BENCH_LAYER`` picks the
  layer: ``memory`` (InMemoryChannelLayer), ``redis`` (channels_redis'
  RedisChannelLayer; its connection pool gets ``max_connections=1000``: with
  redis-py's default, handshakes are refused at 1,000 sockets) or ``pubsub``
  (RedisPubSubChannelLayer), on Redis at ``BENCH_REDIS_PORT``. Served by
  uvicorn or daphne from ``asgi``.

Endpoints (the same for both):
  GET  /sync       a small JSON answer (the bench waits for it)
  POST /publish    seq=N&t=T: one event {"seq": N, "t": T} to every socket; no CSRF token needed
  GET  /gc         this process's garbage collections that took 20 ms or more, and more (sockets_servers.gc_info)
  WS   /ws/feed    subscribes to "news", sends {"hello": PID}, then every event as {"id", "data"} JSON text
  WS   /ws/auth    the same behind login_required (Channels: refused unless scope["user"] is authenticated)
"""

import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # django_tornado.py
sys.path.insert(0, BENCH)

import django_settings
import sockets_servers  # gc_log (no Django)

PEER = os.environ.get("BENCH_WS", "ours")
LAYER = os.environ.get("BENCH_LAYER", "memory")
REDIS_URL = f"redis://127.0.0.1:{os.environ.get('BENCH_REDIS_PORT', '6379')}/0"
GROUP = "news"

extra = {}
if PEER == "channels":
    extra["CHANNEL_LAYERS"] = {"default": {
        "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
        # redis-py's asyncio pool refuses ("Too many connections") past its default size: 1,000 sockets need more.
        "redis": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                  "CONFIG": {"hosts": [{"address": REDIS_URL, "max_connections": 1000}]}},
        "pubsub": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}},
    }[LAYER]}
    extra["INSTALLED_APPS"] = [*django_settings.CONTRIB_APPS, "channels"]
else:
    extra["TORNADO_CHANNELS_URL"] = os.environ.get("BENCH_CHANNELS_URL", "memory://")
django_settings.configure(
    __name__,
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("BENCH_DB", os.path.join(BENCH, "sockets.sqlite3")),
                           "OPTIONS": {"timeout": 20}}},
    SESSION_ENGINE="django.contrib.sessions.backends.db",  # Django's default: the handshake reads the session row
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # the setup's one login
    USE_TZ=True,
    **extra,
)

import django

django.setup()

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

_hellos: dict[int, str] = {}


def hello() -> str:
    """What a socket gets first: this process's pid (computed after a fork: serve(processes=2) forks after the import)."""
    pid = os.getpid()
    text = _hellos.get(pid)
    if text is None:
        text = _hellos[pid] = json.dumps({"hello": pid})
    return text

GC_PAUSES = sockets_servers.gc_log()


def sync_json(request):
    return JsonResponse({"hello": "world", "served_by": "django"})


def gc_pauses(request):
    return JsonResponse(sockets_servers.gc_info(GC_PAUSES, bool(request.GET.get("objects")), bool(request.GET.get("collect"))))


def event_data(request) -> dict:
    return {"seq": int(request.POST["seq"]), "t": float(request.POST["t"])}


if PEER == "channels":
    from channels.auth import AuthMiddlewareStack
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.layers import get_channel_layer
    from channels.routing import ProtocolTypeRouter, URLRouter
    from channels.security.websocket import AllowedHostsOriginValidator
    from django.core.asgi import get_asgi_application

    published = [0]
    # Several processes (uvicorn --workers 2): ids from Redis, so that they order the events across processes as one counter would.
    ids = None
    if os.environ.get("BENCH_GLOBAL_IDS"):
        import redis.asyncio

        ids = redis.asyncio.Redis.from_url(REDIS_URL)

    class Feed(AsyncWebsocketConsumer):
        async def connect(self):
            await self.channel_layer.group_add(GROUP, self.channel_name)
            await self.accept()
            await self.send(text_data=hello())

        async def disconnect(self, code):
            await self.channel_layer.group_discard(GROUP, self.channel_name)

        async def news_event(self, event):  # {"type": "news.event", "text": ...}
            await self.send(text_data=event["text"])

    class AuthFeed(Feed):
        async def connect(self):
            if not self.scope["user"].is_authenticated:  # login_required's WebSocket form: the handshake gets 403
                await self.close()
                return
            await super().connect()

    @csrf_exempt
    async def publish(request):
        published[0] += 1
        event_id = published[0] if ids is None else await ids.incr("bench:ids")
        text = json.dumps({"id": event_id, "data": event_data(request)}, separators=(",", ":"))
        await get_channel_layer().group_send(GROUP, {"type": "news.event", "text": text})
        return JsonResponse({"id": event_id})

    urlpatterns = [path("sync", sync_json), path("publish", publish), path("gc", gc_pauses)]
    asgi = ProtocolTypeRouter({
        "http": get_asgi_application(),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter([
            path("ws/feed", Feed.as_asgi()),
            path("ws/auth", AuthFeed.as_asgi()),
        ]))),
    })
else:
    from django_tornado import Channel, WebSocket

    news = Channel(GROUP)

    class Feed(WebSocket):
        def open(self, **kwargs):
            self.subscribe(news)
            self.send(hello())  # after the subscription: both go to the IOLoop in this order

    @csrf_exempt
    def publish(request):
        return JsonResponse({"id": news.publish(event_data(request))})

    urlpatterns = [
        path("sync", sync_json),
        path("publish", publish),
        path("gc", gc_pauses),
        path("ws/feed", Feed.as_view()),
        path("ws/auth", login_required(Feed.as_view())),
    ]
