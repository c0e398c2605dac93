"""node_chat, the classic long-poll chat room, on Django and Tornado in one script.

    python chat_example.py 8000 8001          # one room, served on two ports
    python chat_example.py --reload 8000      # restart when this file changes
    python chat_example.py --redis redis://127.0.0.1:6379/0 --processes 4 8000

Then open http://127.0.0.1:8000/. The JSON API is node_chat's, so its original
browser client can talk to it: /join?nick=N, /part?id=I, /send?id=I&text=T,
/who, and the long-poll /recv?since=T&id=I (an ``@asynchronous`` view). Plain
views run in django_tornado's thread pool; they wake the parked long-polls
through ``handler.async_callback``. Without ``--redis`` the room lives in this
process's memory; with it, in Redis, so several worker processes (or machines
behind nginx) share one room.
"""

import argparse
import json
import os
import re
import secrets
import sys
import threading
import time

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

import django_tornado
from django_tornado import asynchronous

MESSAGE_BACKLOG = 200  # messages kept for clients that catch up with ?since=
LONG_POLL_TIMEOUT = 30.0  # seconds before a quiet /recv answers with no messages, ahead of proxy timeouts
SESSION_TIMEOUT = 60.0  # seconds without a /recv before a user is parted
MAX_NICK_LENGTH = 50
MAX_TEXT_LENGTH = 2000
NICK_PATTERN = re.compile(r"[\w\-^!]+")  # node_chat's nick characters

STARTED_AT_MS = int(time.time() * 1000)


def configure_django(allowed_hosts: list[str]) -> None:
    """Settings for a database-free site whose urlconf is this script."""
    settings.configure(
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


def now_ms() -> int:
    return int(time.time() * 1000)


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


# -- The room, in this process's memory -------------------------------------------


class MemoryRoom:
    """Sessions, nicks, the message backlog and the parked long-polls of one room.

    Plain views call it from pool threads and ``/recv`` from the IOLoop, so one
    lock guards everything. Waiters are answered through the callbacks
    ``/recv`` gives, which ``handler.async_callback`` makes safe from any thread.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[dict] = []
        self.last_stamp = 0
        self.sessions: dict[str, dict] = {}  # id -> {"nick", "seen"}
        self.nicks: dict[str, str] = {}  # nick -> id
        self.waiters: dict[object, tuple[int, callable, float]] = {}  # token -> (since, answer, parked at)

    def start(self) -> None:
        """Once the IOLoop runs: answer quiet long-polls and part silent users, every second."""
        import tornado.ioloop

        tornado.ioloop.PeriodicCallback(self.tidy, 1000).start()

    def join(self, nick: str) -> dict:
        check_nick(nick)
        with self.lock:
            if nick in self.nicks:
                raise ChatError("Nick in use.")
            session_id = secrets.token_hex(8)
            self.sessions[session_id] = {"nick": nick, "seen": time.monotonic()}
            self.nicks[nick] = session_id
        self.post(nick, "join")
        return {"id": session_id, "nick": nick}

    def part(self, session_id: str) -> None:
        with self.lock:
            session = self.sessions.pop(session_id, None)
            if session is None:
                raise ChatError("No such session id.")
            del self.nicks[session["nick"]]
        self.post(session["nick"], "part")

    def send(self, session_id: str, text: str) -> None:
        check_text(text)
        self.post(self.poke(session_id), "msg", text)

    def poke(self, session_id: str) -> str:
        """Note that a session is alive; return its nick."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise ChatError("No such session id.")
            session["seen"] = time.monotonic()
            return session["nick"]

    def who(self) -> list[str]:
        with self.lock:
            return list(self.nicks)

    def post(self, nick: str, kind: str, text: str | None = None) -> None:
        """Add a message with a stamp later than every other, and wake the long-polls."""
        with self.lock:
            # Milliseconds, bumped on ties, so "since" never loses or repeats a message.
            self.last_stamp = max(now_ms(), self.last_stamp + 1)
            message = {"nick": nick, "type": kind, "text": text, "timestamp": self.last_stamp}
            self.messages.append(message)
            del self.messages[:-MESSAGE_BACKLOG]
            woken = [token for token, (since, _, _) in self.waiters.items() if since < self.last_stamp]
            answers = [self.waiters.pop(token)[1] for token in woken]
        for answer in answers:
            answer([message])

    def wait(self, since: int, session_id: str, answer: callable, refuse: callable) -> callable:
        """Answer with the messages newer than ``since``, now or when one comes.

        Returns a function that forgets the waiter (for a client that left).
        """
        token = object()
        try:
            if session_id:
                self.poke(session_id)
        except ChatError as error:
            refuse(str(error))
            return lambda: None
        with self.lock:
            newer = [message for message in self.messages if message["timestamp"] > since]
            if not newer:
                self.waiters[token] = (since, answer, time.monotonic())
        if newer:
            answer(newer)
        return lambda: self.forget(token)

    def forget(self, token: object) -> None:
        with self.lock:
            self.waiters.pop(token, None)

    def tidy(self) -> None:
        """Answer long-polls quiet for LONG_POLL_TIMEOUT; part users silent for SESSION_TIMEOUT."""
        now = time.monotonic()
        with self.lock:
            quiet = [token for token, (_, _, parked) in self.waiters.items() if now - parked > LONG_POLL_TIMEOUT]
            answers = [self.waiters.pop(token)[1] for token in quiet]
            silent = [session_id for session_id, session in self.sessions.items() if now - session["seen"] > SESSION_TIMEOUT]
        for answer in answers:
            answer([])
        for session_id in silent:
            try:
                self.part(session_id)
            except ChatError:
                pass  # parted meanwhile

    def stats(self) -> dict:
        with self.lock:
            return {"waiters": len(self.waiters), "sessions": len(self.sessions), "messages": len(self.messages)}


# -- The room, in Redis -------------------------------------------------------------


class RedisRoom:
    """The same room kept in Redis, so every worker process serves one room.

    Sessions, nicks and the stamped backlog live in Redis; a client may land on
    another worker for each request. Pub/sub only wakes each worker's parked
    long-polls, which then read the backlog: it is the truth, so a lost wake-up
    delays a message at worst until the next one, never loses it. All Redis I/O
    runs on the worker's IOLoop (redis-py's asyncio client); plain views in pool
    threads wait for it there.
    """

    # Stamp, store, trim and announce a message in one step.
    POST = """
        local stamp = math.max(tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or 0) + 1)
        redis.call('SET', KEYS[1], stamp)
        local message = {nick = ARGV[2], type = ARGV[3], timestamp = stamp, text = cjson.null}
        if ARGV[4] ~= '' then message.text = ARGV[4] end
        redis.call('ZADD', KEYS[2], stamp, cjson.encode(message))
        redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[5]))
        redis.call('PUBLISH', KEYS[3], stamp)
        return stamp
    """
    JOIN = """
        if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
        redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
        redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
        return 1
    """
    # Remove a session once, whoever asks first (part, or expiry on any worker); return its nick.
    LEAVE = """
        if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return false end
        local nick = redis.call('HGET', KEYS[2], ARGV[1])
        redis.call('HDEL', KEYS[2], ARGV[1])
        redis.call('HDEL', KEYS[1], nick)
        return nick
    """
    POKE = """
        if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return false end
        redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
        return redis.call('HGET', KEYS[2], ARGV[1])
    """

    def __init__(self, url: str, prefix: str = "chat:") -> None:
        import redis.asyncio  # only when asked for: not a dependency of django_tornado

        self.redis_module = redis.asyncio
        self.url = url
        self.keys = {name: prefix + name for name in ("stamp", "backlog", "wake", "nicks", "sessions", "seen")}
        self.waiters: dict[object, tuple[int, callable, float]] = {}  # this worker's parked long-polls

    def start(self) -> None:
        """In each worker, once its IOLoop runs: connect, listen for wake-ups, tidy every second."""
        import asyncio

        import tornado.ioloop

        self.loop = asyncio.get_running_loop()
        self.redis = self.redis_module.Redis.from_url(self.url, decode_responses=True)
        self.scripts = {name: self.redis.register_script(getattr(self, name)) for name in ("POST", "JOIN", "LEAVE", "POKE")}
        self.listener = self.loop.create_task(self.listen())
        tornado.ioloop.PeriodicCallback(self.tidy, 1000).start()

    def run(self, coroutine):
        """Run a Redis coroutine on the IOLoop and wait for it (called from a pool thread)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def script(self, name: str, keys: tuple[str, ...], *args):
        return self.scripts[name](keys=[self.keys[key] for key in keys], args=args)

    def join(self, nick: str) -> dict:
        check_nick(nick)
        session_id = secrets.token_hex(8)
        if not self.run(self.script("JOIN", ("nicks", "sessions", "seen"), nick, session_id, now_ms())):
            raise ChatError("Nick in use.")
        self.run(self.post(nick, "join"))
        return {"id": session_id, "nick": nick}

    def part(self, session_id: str) -> None:
        nick = self.run(self.script("LEAVE", ("nicks", "sessions", "seen"), session_id))
        if nick is None:
            raise ChatError("No such session id.")
        self.run(self.post(nick, "part"))

    def send(self, session_id: str, text: str) -> None:
        check_text(text)
        nick = self.run(self.poke(session_id))
        self.run(self.post(nick, "msg", text))

    async def poke(self, session_id: str) -> str:
        nick = await self.script("POKE", ("seen", "sessions"), session_id, now_ms())
        if nick is None:
            raise ChatError("No such session id.")
        return nick

    def who(self) -> list[str]:
        return self.run(self.redis.hvals(self.keys["sessions"]))

    async def post(self, nick: str, kind: str, text: str | None = None) -> None:
        await self.script("POST", ("stamp", "backlog", "wake"), now_ms(), nick, kind, text or "", MESSAGE_BACKLOG)

    async def newer_than(self, since: int) -> list[dict]:
        return [json.loads(entry) for entry in await self.redis.zrangebyscore(self.keys["backlog"], f"({since}", "+inf")]

    def wait(self, since: int, session_id: str, answer: callable, refuse: callable) -> callable:
        """Park a long-poll in this worker (called on the IOLoop), then check the backlog."""
        token = object()
        self.waiters[token] = (since, answer, time.monotonic())
        self.loop.create_task(self.check(token, session_id, refuse))
        return lambda: self.waiters.pop(token, None)

    async def check(self, token: object, session_id: str, refuse: callable) -> None:
        try:
            if session_id:
                await self.poke(session_id)
        except ChatError as error:
            if self.waiters.pop(token, None):
                refuse(str(error))
            return
        await self.wake([token])

    async def wake(self, tokens=None) -> None:
        """Answer the given (or all) parked long-polls that have newer messages."""
        waiting = {token: self.waiters[token] for token in (tokens or list(self.waiters)) if token in self.waiters}
        if not waiting:
            return
        messages = await self.newer_than(min(since for since, _, _ in waiting.values()))
        for token, (since, answer, _) in waiting.items():
            newer = [message for message in messages if message["timestamp"] > since]
            if newer and self.waiters.pop(token, None):
                answer(newer)

    async def listen(self) -> None:
        """Wake this worker's long-polls on every published stamp, reconnecting after errors."""
        import asyncio
        import logging

        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys["wake"])
                    await self.wake()  # anything posted while not subscribed
                    async for event in pubsub.listen():
                        if event["type"] == "message":
                            await self.wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                logging.getLogger(__name__).exception("Redis subscription lost; retrying in 1 s")
                await asyncio.sleep(1)

    async def tidy(self) -> None:
        now = time.monotonic()
        for token in [token for token, (_, _, parked) in self.waiters.items() if now - parked > LONG_POLL_TIMEOUT]:
            self.waiters.pop(token)[1]([])
        silent = await self.redis.zrangebyscore(self.keys["seen"], "-inf", now_ms() - SESSION_TIMEOUT * 1000)
        for session_id in silent:
            nick = await self.script("LEAVE", ("nicks", "sessions", "seen"), session_id)
            if nick is not None:  # this worker won the race to part it
                await self.post(nick, "part")

    def stats(self) -> dict:
        return {
            "waiters": len(self.waiters),
            "sessions": self.run(self.redis.hlen(self.keys["sessions"])),
            "messages": self.run(self.redis.zcard(self.keys["backlog"])),
        }


room: MemoryRoom | RedisRoom = MemoryRoom()  # the one room every view serves: deliberate shared state (main() may swap in Redis)


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
    return {"nicks": room.who()}


@chat_view
def stats(parameters) -> dict:
    """Not node_chat's: the room's bookkeeping, for monitoring and tests."""
    return room.stats()


@asynchronous
def recv(request, handler):
    """Long-poll: answer with the messages newer than ``since``, now or when one is posted."""
    since = request.GET.get("since", "")
    if not since.isdigit():
        return JsonResponse({"error": "Must supply a numeric since parameter."}, status=400)

    def answer(messages):
        handler.finish({"messages": messages, "rss": resident_memory()})

    def refuse(error):
        handler.set_status(400)
        handler.finish({"error": error})

    def on_end():
        forget()
        if not handler.request.connection.stream.closed():
            answer([])  # the server is stopping: an empty answer, and the client polls again (elsewhere)

    # The id is optional: the original client polls before it has joined.
    forget = room.wait(int(since), request.GET.get("id", ""), handler.async_callback(answer), handler.async_callback(refuse))
    handler.add_disconnect_callback(on_end)


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

async function longPoll() {
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
    await api("/send", { id: CONFIG.id, text }, "POST");
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
longPoll();
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
    configure_django(allowed_hosts(options.addresses, options.allowed_host))
    if options.redis:
        try:
            room = RedisRoom(options.redis)
        except ImportError:
            parser.error("--redis needs redis-py: pip install redis")
    try:
        django_tornado.serve(options.addresses, processes=options.processes, reload=options.reload, startup=[room.start])
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
