"""node_chat, the classic long-poll chat room, on Django and Tornado in one script.

    python chat_example.py 8000 8001          # one room, served on two ports
    python chat_example.py --reload 8000      # restart when this file changes
    python chat_example.py --redis redis://127.0.0.1:6379/0 --processes 4 8000

Then open http://127.0.0.1:8000/. The JSON API is node_chat's, so its original
browser client can talk to it: /join?nick=N, /part?id=I, /send?id=I&text=T,
/who, and the long-poll /recv?since=T&id=I (an ``@asynchronous`` view). The
messages are events on django_tornado's ``Channel("chat")``: the plain views
(run in the thread pool) publish to it, and /recv waits on it with ``query``.
The room itself only keeps who is in it. Without ``--redis`` both live in this
process's memory; with it, in Redis, so several worker processes (or machines
behind nginx) share one room.
"""

import argparse
import asyncio
import collections
import functools
import json
import os
import re
import secrets
import sys
import threading
import time

import tornado.ioloop
from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

import django_tornado
from django_tornado import Channel, WebSocket, asynchronous

MESSAGE_BACKLOG = 200  # messages kept for clients that catch up with ?since=
LONG_POLL_TIMEOUT = 30.0  # seconds before a quiet /recv answers with no messages, ahead of proxy timeouts
SESSION_TIMEOUT = 60.0  # seconds without a /recv before a user is parted
MAX_NICK_LENGTH = 50
MAX_TEXT_LENGTH = 2000
NICK_PATTERN = re.compile(r"[\w\-^!]+")  # node_chat's nick characters

STARTED_AT_MS = int(time.time() * 1000)


def configure_django(allowed_hosts: list[str], redis_url: str | None) -> None:
    """Settings for a database-free site whose urlconf is this script."""
    settings.configure(
        TORNADO_CHANNELS_URL=redis_url or "memory://",  # where the chat channel's messages live
        DEBUG=False,
        SECRET_KEY=secrets.token_urlsafe(32),  # nothing is signed that must outlive the process
        ALLOWED_HOSTS=allowed_hosts,
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",  # checks the Host header against ALLOWED_HOSTS
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )


def allowed_hosts(addresses: list[str], extra: list[str]) -> list[str]:
    """This machine's names, each address listened on and ``extra``; any host when listening on all."""
    hosts = ["localhost", "127.0.0.1", "[::1]", *extra]
    for address in addresses:
        host = address.rpartition(":")[0] if ":" in address else ""
        if host in ("0.0.0.0", "[::]"):
            return ["*"]  # reachable by any name this machine has; list them in a real deployment
        if host:
            hosts.append(host)
    return hosts


class ChatError(Exception):
    """Bad input or an unknown session: answered with 400 and ``{"error": ...}``."""


def resident_memory() -> int:
    """This process's resident set size in bytes (node_chat's ``rss``)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak, which is the best the standard library offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def check_nick(nick: str) -> None:
    if not nick:
        raise ChatError("Bad nick.")
    if len(nick) > MAX_NICK_LENGTH:
        raise ChatError(f"Nick too long: {MAX_NICK_LENGTH} characters at most.")
    if not NICK_PATTERN.fullmatch(nick):
        raise ChatError("Bad character in nick: letters, digits, '_', '-', '^' and '!' only.")


def check_text(text: str) -> None:
    if not text:
        raise ChatError("Empty message.")
    if len(text) > MAX_TEXT_LENGTH:
        raise ChatError(f"Message too long: {MAX_TEXT_LENGTH} characters at most.")


# -- The room: who is in it (sessions), and what is said (a Channel) --------------------

chat = Channel("chat", backlog=MESSAGE_BACKLOG)  # stamps, backlog, wake-ups (and Redis) are django_tornado's


class MemorySessions:
    """Who is in the room, in this process's memory: each session's nick and when it was last seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # plain views call it from pool threads
        self.nicks: dict[str, str] = {}  # session id -> nick
        self.ids: dict[str, str] = {}  # nick -> session id
        self.seen: dict[str, float] = {}  # session id -> time.time()

    def claim(self, nick: str, session_id: str) -> bool:
        with self.lock:
            if nick in self.ids:
                return False
            self.ids[nick], self.nicks[session_id], self.seen[session_id] = session_id, nick, time.time()
            return True

    def leave(self, session_id: str) -> str | None:
        """Remove a session; return its nick, or None if it is gone already."""
        with self.lock:
            nick = self.nicks.pop(session_id, None)
            if nick is not None:
                del self.ids[nick], self.seen[session_id]
            return nick

    def poke(self, session_id: str) -> str | None:
        """Note that a session is alive; return its nick (None: no such session)."""
        with self.lock:
            if session_id in self.seen:
                self.seen[session_id] = time.time()
            return self.nicks.get(session_id)

    def who(self) -> list[str]:
        with self.lock:
            return list(self.ids)

    def silent(self, seconds: float) -> list[str]:
        with self.lock:
            return [session_id for session_id, seen in self.seen.items() if time.time() - seen > seconds]

    def count(self) -> int:
        return len(self.nicks)


class RedisSessions:
    """The same in Redis, so that every worker process (or machine behind nginx) serves one room."""

    def __init__(self, url: str, prefix: str = "chat:") -> None:
        import redis  # only when asked for: django_tornado needs it for --redis anyway

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.nicks_key, self.ids_key, self.seen_key = prefix + "nicks", prefix + "ids", prefix + "seen"

    def claim(self, nick: str, session_id: str) -> bool:
        if not self.redis.hsetnx(self.ids_key, nick, session_id):
            return False
        with self.redis.pipeline() as pipeline:
            pipeline.hset(self.nicks_key, session_id, nick).zadd(self.seen_key, {session_id: time.time()}).execute()
        return True

    def leave(self, session_id: str) -> str | None:
        if not self.redis.zrem(self.seen_key, session_id):
            return None  # another request (or worker) parted it first
        nick = self.redis.hget(self.nicks_key, session_id)
        with self.redis.pipeline() as pipeline:
            pipeline.hdel(self.nicks_key, session_id).hdel(self.ids_key, nick).execute()
        return nick

    def poke(self, session_id: str) -> str | None:
        with self.redis.pipeline() as pipeline:  # one transaction: no part can come in between
            seen, _, nick = pipeline.zscore(self.seen_key, session_id).zadd(self.seen_key, {session_id: time.time()}, xx=True).hget(self.nicks_key, session_id).execute()
        return nick if seen is not None else None

    def who(self) -> list[str]:
        return self.redis.hvals(self.nicks_key)

    def silent(self, seconds: float) -> list[str]:
        return self.redis.zrangebyscore(self.seen_key, "-inf", time.time() - seconds)

    def count(self) -> int:
        return self.redis.hlen(self.nicks_key)


class Room:
    """node_chat's room: joining, parting and speaking are messages on the ``chat`` channel."""

    def __init__(self, sessions: MemorySessions | RedisSessions) -> None:
        self.sessions = sessions

    def join(self, nick: str) -> dict:
        check_nick(nick)
        session_id = secrets.token_hex(8)
        if not self.sessions.claim(nick, session_id):
            raise ChatError("Nick in use.")
        self.post(nick, "join")
        return {"id": session_id, "nick": nick}

    def part(self, session_id: str) -> None:
        nick = self.sessions.leave(session_id)
        if nick is None:
            raise ChatError("No such session id.")
        self.post(nick, "part")

    def send(self, session_id: str, text: str) -> None:
        check_text(text)
        self.post(self.poke(session_id), "msg", text)

    def poke(self, session_id: str) -> str:
        """Note that a session is alive; return its nick."""
        nick = self.sessions.poke(session_id)
        if nick is None:
            raise ChatError("No such session id.")
        return nick

    def post(self, nick: str, kind: str, text: str | None = None) -> None:
        chat.publish({"nick": nick, "type": kind, "text": text})

    def tidy(self) -> None:
        """Part the users silent for SESSION_TIMEOUT (every worker tries; one wins each)."""
        for session_id in list(sessions_with_sockets):  # a page with its socket open is there
            self.sessions.poke(session_id)
        for session_id in self.sessions.silent(SESSION_TIMEOUT):
            nick = self.sessions.leave(session_id)
            if nick is not None:
                self.post(nick, "part")


room = Room(MemorySessions())  # the one room every view serves: deliberate shared state (main() may put it in Redis)
parked: set = set()  # this process's waiting /recv requests, for /stats


def start_tidying() -> None:
    """Once the IOLoop runs: part silent users every second, in a thread (the sessions may be in Redis)."""
    loop = asyncio.get_running_loop()
    tornado.ioloop.PeriodicCallback(lambda: loop.run_in_executor(None, room.tidy), 1000).start()


def as_node_chat_message(event: dict) -> dict:
    """node_chat's message: the event's data, stamped with its id."""
    return {**event["data"], "timestamp": event["id"]}


# -- The JSON API: node_chat's, so its original client works ---------------------


def chat_view(view):
    """Answer ChatError with node_chat's 400 ``{"error": ...}``; accept GET or POST parameters."""

    @csrf_exempt
    def api_view(request):
        parameters = request.POST if request.method == "POST" else request.GET
        try:
            return JsonResponse({**view(parameters), "rss": resident_memory()})
        except ChatError as error:
            return JsonResponse({"error": str(error)}, status=400)

    return api_view


@chat_view
def join(parameters) -> dict:
    return {**room.join(parameters.get("nick", "")), "starttime": STARTED_AT_MS}


@chat_view
def part(parameters) -> dict:
    if parameters.get("id"):  # the original client parts on unload even before joining
        room.part(parameters["id"])
    return {}


@chat_view
def send(parameters) -> dict:
    room.send(parameters.get("id", ""), parameters.get("text", ""))
    return {}


@chat_view
def who(parameters) -> dict:
    return {"nicks": room.sessions.who()}


@chat_view
def stats(parameters) -> dict:
    """Not node_chat's: the room's bookkeeping, for monitoring and tests."""
    return {"waiters": len(parked), "sessions": room.sessions.count(), "messages": chat.size()}


def poke_first(view):
    """Check the ``since`` and ``id`` of /recv (or /socket), and note the session alive, before the view.

    A plain decorator outside ``@asynchronous`` runs like middleware, in a pool
    thread, so it may wait for Redis; the view itself runs on the IOLoop.
    """

    @functools.wraps(view)
    def checked(request):
        if not request.GET.get("since", "").isdigit():
            return JsonResponse({"error": "Must supply a numeric since parameter."}, status=400)
        session_id = request.GET.get("id", "")  # optional: the original client polls before it has joined
        if session_id:
            try:
                room.poke(session_id)
            except ChatError as error:
                return JsonResponse({"error": str(error)}, status=400)
        return view(request)

    return checked


@poke_first
@asynchronous
def recv(request, handler):
    """Long-poll: answer with the messages newer than ``since``, now or when one is posted (after 30 s, none)."""

    def answer(events):
        forget()
        handler.finish({"messages": [as_node_chat_message(event) for event in events], "rss": resident_memory()})

    def forget():
        parked.discard(handler)
        quiet.cancel()

    answer = handler.async_callback(answer)
    parked.add(handler)
    quiet = handler.loop.call_later(LONG_POLL_TIMEOUT, answer, [])
    handler.add_disconnect_callback(forget)
    chat.query(answer, int(request.GET["since"]))  # cancelled by itself when this request ends; on shutdown, answered with none


# -- The page's WebSocket: the same room, pushed -------------------------------------

sessions_with_sockets: collections.Counter = collections.Counter()  # session id -> sockets open here: alive


class ChatSocket(WebSocket):
    """One page's socket: the room's messages are pushed to it, and it speaks for its session.

    It sends node_chat's messages (and ``{"error": ...}``); it takes JSON:
    ``{"id": I}`` to speak for the session I (from /join), ``{"text": T}`` to
    say T. A Django view, so the origin of the page that opens it must be this
    site's. A session with a socket open is alive, without long-polls.
    """

    session_id = ""

    def open(self):
        self.subscribe(chat, since=int(self.request.GET["since"]))

    def on_event(self, event):
        self.send(as_node_chat_message(event))

    def on_message(self, message):
        try:
            said = json.loads(message)
        except ValueError:
            said = None
        if not isinstance(said, dict):
            self.send({"error": 'Send JSON: {"id": ...} or {"text": ...}.'})
            return
        try:
            if "id" in said:
                room.poke(str(said["id"]))
                self.speak_for(str(said["id"]))
            if "text" in said:
                room.send(self.session_id, str(said["text"]))
        except ChatError as error:
            self.send({"error": str(error)})

    def speak_for(self, session_id):
        sessions_with_sockets[session_id] += 1
        self.forget_session()
        self.session_id = session_id

    def forget_session(self):
        if self.session_id:
            sessions_with_sockets[self.session_id] -= 1
            if sessions_with_sockets[self.session_id] <= 0:
                del sessions_with_sockets[self.session_id]

    def on_close(self):
        self.forget_session()


# -- The page ------------------------------------------------------------------------


def page(request):
    return HttpResponse(PAGE_HTML)


def script(request):
    return HttpResponse(CLIENT_JS, content_type="text/javascript; charset=utf-8")


def stylesheet(request):
    return HttpResponse(STYLE_CSS, content_type="text/css; charset=utf-8")


PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>node chat</title>
<link rel="stylesheet" href="/style.css">
<script src="/client.js" defer></script>
</head>
<body>
<div id="app">
  <div id="log" aria-live="polite"></div>
  <form id="connect">
    <label for="nick">Nick</label>
    <input id="nick" name="nick" maxlength="50" autocomplete="nickname" autofocus>
    <button id="join" type="submit">Join</button>
    <p class="hint">Letters, digits, <code>_ - ^ !</code>; up to 50 characters.</p>
  </form>
  <div id="toolbar" hidden>
    <form id="entry"><input id="text" maxlength="2000" placeholder="Say something" autocomplete="off"></form>
    <ul id="status">
      <li><button id="users-toggle" type="button"><span id="usercount">0</span> users</button></li>
      <li>up <span id="uptime">-</span></li>
      <li><span id="rss">-</span> MB</li>
      <li id="transport">connecting</li>
    </ul>
  </div>
  <ul id="users" hidden></ul>
</div>
</body>
</html>
"""

STYLE_CSS = """
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; background: #000; color: #ccc;
  font: 14px/1.45 "DejaVu Sans Mono", Menlo, Consolas, monospace; }
#app { display: flex; flex-direction: column; height: 100%; }
#log { flex: 1; overflow-y: auto; padding: 1em 1em 0.5em; }
.message { display: grid; grid-template-columns: 5.5em 11em 1fr; gap: 0 1em; padding: 0.1em 0; }
.message .date { color: #555; }
.message .nick { color: #9cf; text-align: right; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.message .text { color: #eee; white-space: pre-wrap; overflow-wrap: anywhere; }
.message.mine .nick { color: #fc6; }
.message.join .text, .message.part .text { color: #6a6; font-style: italic; }
.message.part .text { color: #a66; }
.message.error .text { color: #f66; }
#connect { padding: 1.5em; border-top: 1px solid #222; background: #0a0a0a; }
#connect label { color: #9cf; margin-right: 0.5em; }
input { background: #111; color: #eee; border: 1px solid #333; padding: 0.5em; font: inherit; }
input:focus { outline: 1px solid #9cf; }
button { background: #234; color: #cde; border: 1px solid #345; padding: 0.5em 1em; font: inherit; cursor: pointer; }
.hint { color: #555; margin: 0.5em 0 0; }
#toolbar { display: flex; gap: 1em; align-items: center; padding: 0.6em 1em; border-top: 1px solid #222; background: #0a0a0a; }
#toolbar[hidden], #users[hidden] { display: none; }
#entry { flex: 1; }
#text { width: 100%; }
#status { display: flex; gap: 1.5em; list-style: none; margin: 0; padding: 0; color: #777; white-space: nowrap; }
#status button { background: none; border: 0; padding: 0; color: #9cf; }
#users { position: absolute; right: 1em; bottom: 3.5em; margin: 0; padding: 0.5em 1em; list-style: none;
  background: #111; border: 1px solid #333; max-height: 50%; overflow-y: auto; }
"""

CLIENT_JS = r"""
"use strict";
// node_chat's client, rewritten with fetch. Every string from the server goes
// into the page as text (textContent), never as HTML.
const CONFIG = { nick: null, id: null, since: 1, unread: 0, focused: true, starttime: null };
const nicks = new Set();
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, params, method = "GET") {
  const query = new URLSearchParams(params);
  const response = method === "GET"
    ? await fetch(`${path}?${query}`, { cache: "no-store" })
    : await fetch(path, { method, body: query });
  const data = await response.json();
  if (!response.ok) {
    const error = new Error(data.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  if (data.rss) $("rss").textContent = (data.rss / (1024 * 1024)).toFixed(1);
  return data;
}

function addMessage(nick, text, timestamp, kind) {
  const row = document.createElement("div");
  row.className = `message ${kind}` + (nick === CONFIG.nick && kind === "msg" ? " mine" : "");
  for (const [name, value] of [["date", timeString(new Date(timestamp))], ["nick", nick], ["text", text]]) {
    const cell = document.createElement("span");
    cell.className = name;
    cell.textContent = value;
    row.append(cell);
  }
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(row);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function timeString(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function showUsers() {
  $("usercount").textContent = nicks.size;
  const list = $("users");
  list.replaceChildren(...[...nicks].sort().map((nick) => {
    const item = document.createElement("li");
    item.textContent = nick;
    return item;
  }));
}

function updateTitle() {
  document.title = (CONFIG.unread ? `(${CONFIG.unread}) ` : "") + "node chat";
}

function updateUptime() {
  if (!CONFIG.starttime) return;
  const seconds = Math.floor((Date.now() - CONFIG.starttime) / 1000);
  const parts = [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]];
  const [size, unit] = parts.find(([size]) => seconds >= size) || [1, "s"];
  $("uptime").textContent = `${Math.floor(seconds / size)}${unit}`;
}

function handle(message) {
  if (message.timestamp > CONFIG.since) CONFIG.since = message.timestamp;
  if (message.type === "msg") {
    addMessage(message.nick, message.text, message.timestamp, "msg");
    if (!CONFIG.focused) CONFIG.unread += 1;
  } else if (message.type === "join") {
    nicks.add(message.nick);
    addMessage(message.nick, "joined", message.timestamp, "join");
  } else if (message.type === "part") {
    nicks.delete(message.nick);
    addMessage(message.nick, "left", message.timestamp, "part");
  }
}

// One WebSocket where the browser and the network allow it; node_chat's long-poll otherwise.
let socket = null;

function connectSocket(failures = 0) {
  if (!("WebSocket" in window)) return longPoll();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/socket?since=${CONFIG.since}`;
  const candidate = new WebSocket(url);
  let opened = false;
  candidate.onopen = () => {
    opened = true;
    socket = candidate;
    $("transport").textContent = "WebSocket";
    if (CONFIG.id) socket.send(JSON.stringify({ id: CONFIG.id }));
    who();
  };
  candidate.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.error) {
      addMessage("", data.error, Date.now(), "error");
      return;
    }
    handle(data);
    showUsers();
    updateTitle();
  };
  candidate.onclose = () => {
    socket = null;
    if (!opened) {
      longPoll();  // it never opened: a proxy or the browser won't have it
      return;
    }
    const delay = Math.min(30000, 500 * 2 ** failures);
    $("transport").textContent = "reconnecting";
    setTimeout(() => connectSocket(failures + 1), delay);
  };
}

function say(text) {
  if (socket) {
    socket.send(JSON.stringify({ text }));
    return Promise.resolve();
  }
  return api("/send", { id: CONFIG.id, text }, "POST");
}

async function longPoll() {
  $("transport").textContent = "long-poll";
  let failures = 0;
  let first = true;
  for (;;) {
    try {
      const data = await api("/recv", { since: CONFIG.since, id: CONFIG.id || "" });
      failures = 0;
      data.messages.forEach(handle);
      showUsers();
      updateTitle();
      if (first) { first = false; await who(); }
    } catch (error) {
      failures += 1;
      if (error.status === 400 && CONFIG.id) {  // our session expired, or the server restarted
        addMessage("", "Your session ended; join again.", Date.now(), "error");
        CONFIG.id = null;
        showConnect();
      }
      const delay = Math.min(30000, 500 * 2 ** failures);  // back off, up to 30 s
      addMessage("", `Connection problem (${error.message}); retrying in ${Math.round(delay / 1000)} s.`, Date.now(), "error");
      await sleep(delay);
    }
  }
}

async function who() {
  const data = await api("/who", {});
  nicks.clear();
  data.nicks.forEach((nick) => nicks.add(nick));
  showUsers();
}

function showConnect() {
  $("connect").hidden = false;
  $("toolbar").hidden = true;
  $("nick").focus();
}

function showChat() {
  $("connect").hidden = true;
  $("toolbar").hidden = false;
  $("text").focus();
}

$("connect").addEventListener("submit", async (event) => {
  event.preventDefault();
  const nick = $("nick").value.trim();
  try {
    const session = await api("/join", { nick });
    CONFIG.nick = session.nick;
    CONFIG.id = session.id;
    CONFIG.starttime = session.starttime;
    if (socket) socket.send(JSON.stringify({ id: CONFIG.id }));
    updateUptime();
    showChat();
  } catch (error) {
    addMessage("", `Could not join: ${error.message}`, Date.now(), "error");
  }
});

$("entry").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) return;
  $("text").value = "";
  try {
    await say(text);
  } catch (error) {
    addMessage("", `Not sent: ${error.message}`, Date.now(), "error");
  }
});

$("users-toggle").addEventListener("click", () => { $("users").hidden = !$("users").hidden; });
window.addEventListener("focus", () => { CONFIG.focused = true; CONFIG.unread = 0; updateTitle(); });
window.addEventListener("blur", () => { CONFIG.focused = false; });
window.addEventListener("pagehide", () => {
  if (CONFIG.id) navigator.sendBeacon("/part", new URLSearchParams({ id: CONFIG.id }));
});
setInterval(updateUptime, 10000);
connectSocket();
"""

urlpatterns = [
    path("", page),
    path("client.js", script),
    path("style.css", stylesheet),
    path("join", join),
    path("part", part),
    path("send", send),
    path("who", who),
    path("recv", recv),
    path("socket", poke_first(ChatSocket.as_view())),
    path("stats", stats),
]


def main(argv: list[str] | None = None) -> None:
    global room
    parser = argparse.ArgumentParser(prog="chat_example.py", description="The node_chat room on Django and Tornado.")
    parser.add_argument("addresses", nargs="*", default=["8000"], help="ports or address:port pairs (default: 127.0.0.1:8000)")
    parser.add_argument("--reload", action="store_true", help="restart when this file changes")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (needs --redis; 0: one per CPU)")
    parser.add_argument("--redis", metavar="URL", help="keep the room in Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another host name to answer to, e.g. behind a proxy (repeatable)")
    options = parser.parse_args(argv)
    if options.processes != 1 and not options.redis:
        parser.error("--processes needs --redis URL: without it every worker would hold a room of its own")
    configure_django(allowed_hosts(options.addresses, options.allowed_host), options.redis)
    if options.redis:
        try:
            room = Room(RedisSessions(options.redis))
        except ImportError:
            parser.error("--redis needs redis-py: pip install redis")
    try:
        django_tornado.serve(options.addresses, processes=options.processes, reload=options.reload, startup=[start_tidying])
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
