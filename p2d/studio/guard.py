"""What the app guards below Gradio's event handlers: its upload route, its queue, and the client address.

`Guard` is an ASGI middleware of the served app (`p2d.studio.server.StudioBlocks.launch` installs it):

- ``POST /gradio_api/upload`` (Gradio stores files there before any handler runs): refused before a byte
  is stored when the request is over ``max_file_bytes`` (plus the form's overhead), when the client
  address has made ``max_uploads_per_ip_hour`` uploads or sent ``max_upload_bytes_per_ip_hour`` in the
  last hour, or when its unclaimed uploads (and those still arriving) would pass its share of the pool
  (``max_pending_upload_share`` of ``max_pending_upload_bytes``). When the pool itself is full, the
  oldest unclaimed uploads of the address holding most of it are deleted first, so a newcomer within
  its share is not refused for what others left lying. An answer with more than ``max_upload_files``
  files is deleted and refused. Every stored file is moved to a folder of its own (Gradio names a
  file's folder after its bytes, so two visitors sending the same file would share one path) and
  recorded in `Uploads` with the address that sent it: `p2d.studio.services.Studio.receive` takes (and
  deletes) only a file this address uploaded and no session has received yet, so a path learnt from
  elsewhere is never read or deleted; files nobody received are deleted after ``upload_ttl_s``.
- ``POST /gradio_api/queue/join`` and ``/gradio_api/call/...`` (a request entering Gradio's queue):
  refused (429) when the client address already has ``max_queued_per_ip`` requests in it, waiting or
  running, so one client cannot fill it (``queue_size``), or hold its workers, for everyone else.
- Gradio's queue starts, in each concurrency group, the first waiting request of the address with the
  fewest requests running (`take_turns`; Gradio's own order is first come, first served), and at most
  ``max_running_per_ip`` of one address at once, so a newcomer's light request is the next to start
  however many another address has queued, and shares the CPU with few of its requests.

Requests without a body limit (no Content-Length) are refused on the upload route in the public demo, and
so is every request to Gradio's other file-taking route the app never uses (``process_recording``).
Local mode records uploads (so only real uploads are ever deleted) and applies no caps.

`forwarded_headers_untrusted()`: uvicorn rewrites the client address from X-Forwarded-For for every
connection from 127.0.0.1 (its ``proxy_headers``, on by default), which would let anyone behind a tunnel or
a local proxy choose their address. While the app starts, trusted forwarding addresses are set to none, so
the address is the connection's peer, and `p2d.studio.limits.client_ip` alone reads X-Forwarded-For for
the configured ``proxy_hops``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from .limits import client_ip
from .log import LOG

FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries around one file
#: Gradio routes that take files this app never asks for (a recording's video); refused in the public demo
UNUSED_UPLOAD_ROUTES = ("/gradio_api/process_recording",)
HOUR = 3600.0


def gradio_upload_folder() -> Path:
    """Where Gradio's upload route stores files (its served cache; `gradio.utils.get_upload_folder`)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


@dataclass
class Upload:
    path: Path
    client: str
    size: int
    at: float


class Uploads:
    """Files stored by Gradio's upload route that no session has received yet, with who sent them.
    ``clock``: what "now" is (tests move it)."""

    def __init__(self, limits, folder: Path, clock=time.time):
        self.limits, self.folder, self.clock = limits, Path(folder), clock
        self._pending: dict[str, Upload] = {}
        self._recent: dict[str, deque] = {}  # client -> (time, bytes) of its uploads in the last hour
        self._arriving: Counter = Counter()  # client -> bytes of its admitted uploads not recorded yet
        self._lock = threading.Lock()
        self.dropped = 0  # unclaimed uploads deleted to make room for others (for the bench and tests)

    def _held(self, client: str | None = None) -> int:
        """Bytes of unclaimed and arriving uploads (of ``client``; None: of everyone)."""
        if client is None:
            return sum(u.size for u in self._pending.values()) + sum(self._arriving.values())
        return sum(u.size for u in self._pending.values() if u.client == client) + self._arriving[client]

    def _make_room(self, size: int, cap: int) -> list[Upload]:
        """Take out the oldest unclaimed uploads of the address holding most, until ``size`` more bytes fit
        under ``cap`` (or nothing more can go); the uploads taken out."""
        dropped = []
        while self._held() + size > cap and self._pending:
            heaviest = max({u.client for u in self._pending.values()}, key=self._held)
            oldest = min((u for u in self._pending.values() if u.client == heaviest), key=lambda u: u.at, default=None)
            if oldest is None:
                break
            del self._pending[str(oldest.path)]
            dropped.append(oldest)
        return dropped

    def admit(self, client: str, size: int) -> str | None:
        """Why an upload of ``size`` bytes from ``client`` is refused (None: admitted and counted as arriving
        until `arrived`)."""
        now = self.clock()
        dropped: list[Upload] = []
        try:
            with self._lock:
                refusal = self._refusal(client, size, now, dropped)
                if refusal is None:
                    self._recent[client].append((now, size))
                    self._arriving[client] += size
                return refusal
        finally:
            for u in dropped:
                delete_upload(u.path, self.folder)
            self.dropped += len(dropped)

    def _refusal(self, client: str, size: int, now: float, dropped: list) -> str | None:
        """Why the upload is refused (None: it fits; what had to make room for it goes into ``dropped``)."""
        lim = self.limits
        recent = self._recent.setdefault(client, deque())
        while recent and recent[0][0] < now - HOUR:
            recent.popleft()
        if lim.max_file_bytes is not None and size > lim.max_file_bytes + FORM_OVERHEAD:
            return f"the file is over the {lim.max_file_bytes // 2**20} MB this server takes"
        if lim.max_uploads_per_ip_hour is not None and len(recent) >= lim.max_uploads_per_ip_hour:
            return (f"your address made {len(recent)} uploads in the last hour, the most this server takes: try "
                    "again later")
        sent = sum(n for _, n in recent)
        if lim.max_upload_bytes_per_ip_hour is not None and sent + size > lim.max_upload_bytes_per_ip_hour:
            return (f"your address uploaded {sent // 2**20} MB in the last hour; this server takes "
                    f"{lim.max_upload_bytes_per_ip_hour // 2**20} MB per hour: try again later")
        pool = lim.max_pending_upload_bytes
        if pool is not None:
            share = int(pool * lim.max_pending_upload_share) if lim.max_pending_upload_share else pool
            mine = self._held(client)
            if mine + size > share:
                return (f"your address holds {mine // 2**20} MB of uploads that no session has used yet (at most "
                        f"{share // 2**20} MB here): use them, or wait {(lim.upload_ttl_s or 0) / 60:g} minutes")
            dropped += self._make_room(size, pool)
            if self._held() + size > pool:
                return "the server holds too many uploads right now: try again in a few minutes"
        return None

    def arrived(self, client: str, size: int) -> None:
        """An admitted upload has been stored (and recorded) or has failed: no longer arriving."""
        with self._lock:
            self._arriving[client] -= size
            if self._arriving[client] <= 0:
                del self._arriving[client]

    def record(self, path, client: str) -> Path | None:
        """Move a file Gradio's upload route stored into a folder of its own and note who sent it; its new
        path (None: it is gone)."""
        p = Path(path).resolve()
        own = self.folder.resolve() / f"p2d-{secrets.token_hex(16)}" / p.name
        with self._lock:  # two identical uploads share Gradio's path: the first moves it, the second finds none
            try:
                if not p.is_relative_to(self.folder.resolve()) or not p.is_file():
                    return None
                own.parent.mkdir(parents=True)
                os.replace(p, own)
                size = own.stat().st_size
            except OSError:
                return None
            self._pending[str(own)] = Upload(own, client, size, self.clock())
        try:
            p.parent.rmdir()  # Gradio's folder for these bytes, now empty
        except OSError:
            pass
        return own

    def claim(self, path, client: str) -> bool:
        """Whether ``path`` is an upload ``client`` made that no session received yet (it is then
        no longer pending: the caller receives it, and deletes Gradio's copy)."""
        try:
            key = str(Path(str(path)).resolve())
        except OSError:
            return False
        with self._lock:
            up = self._pending.get(key)
            if up is None or up.client != client:
                return False
            del self._pending[key]
            return True

    def pending(self) -> list[Upload]:
        with self._lock:
            return list(self._pending.values())

    def sweep(self, now: float | None = None) -> list[Path]:
        """Delete the uploads no session received within ``upload_ttl_s``; their paths."""
        ttl = self.limits.upload_ttl_s
        if not ttl:
            return []
        now = self.clock() if now is None else now
        with self._lock:
            old = [u for u in self._pending.values() if u.at < now - ttl]
            for u in old:
                del self._pending[str(u.path)]
        for u in old:
            delete_upload(u.path, self.folder)
        return [u.path for u in old]


def delete_upload(path: Path, folder: Path) -> None:
    """Delete a file Gradio's upload route stored (only inside its upload ``folder``), and its folder when empty."""
    try:
        p = Path(path).resolve()
        if not p.is_relative_to(Path(folder).resolve()) or not p.is_file():
            return
        p.unlink()
        if p.parent != Path(folder).resolve():
            try:
                p.parent.rmdir()
            except OSError:
                pass
    except OSError:
        pass


class _Scope:
    """What `client_ip` reads, from an ASGI scope."""

    def __init__(self, scope):
        from starlette.datastructures import Headers

        self.headers = Headers(scope=scope)
        client = scope.get("client")
        self.client = type("Client", (), {"host": client[0] if client else None})()


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail, "error": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI middleware; see the module docstring. ``studio``: the app's `Studio`; ``blocks``: the app."""

    def __init__(self, app, studio=None, blocks=None):
        self.app, self.studio, self.blocks = app, studio, blocks
        self._joining: Counter = Counter()  # join requests of each address being handled (not yet in the queue)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or self.studio is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.endswith("/gradio_api/upload"):
            return await self._upload(scope, receive, send)
        if self.studio.limits.demo and path.endswith(UNUSED_UPLOAD_ROUTES):
            return await _reply(send, 404, "not used by this app")
        if path.endswith("/gradio_api/queue/join") or "/gradio_api/call/" in path:
            client = self.client(scope)
            refusal = self._queue_refusal(client)
            if refusal:
                return await _reply(send, 429, refusal)
            self._joining[client] += 1  # counted from the check on: concurrent joins cannot all pass it
            try:
                return await self.app(scope, receive, send)
            finally:
                self._joining[client] -= 1
                if self._joining[client] <= 0:
                    del self._joining[client]
        return await self.app(scope, receive, send)

    def client(self, scope) -> str:
        return client_ip(_Scope(scope), self.studio.limits.proxy_hops)

    # -- the queue ----------------------------------------------------------------------------------
    def queued(self, client: str) -> int:
        """Requests of ``client`` in Gradio's queue now: waiting or running."""
        queue = getattr(self.blocks, "_queue", None)
        if queue is None:
            return 0
        hops = self.studio.limits.proxy_hops
        return sum(1 for event in queued_events(queue) if event_client(event, hops) == client)

    def _queue_refusal(self, client: str) -> str | None:
        cap = self.studio.limits.max_queued_per_ip
        if cap is None:
            return None
        n = self.queued(client) + self._joining[client]
        if n >= cap:
            return (f"your address has {n} requests waiting or running, the most this server takes at once: wait for "
                    "them")
        return None

    # -- uploads ------------------------------------------------------------------------------------
    async def _upload(self, scope, receive, send):
        studio, lim = self.studio, self.studio.limits
        client = self.client(scope)
        headers = _Scope(scope).headers
        try:
            size = int(headers.get("content-length", ""))
        except ValueError:
            size = None
        if lim.demo:
            if size is None:
                return await _reply(send, 411, "an upload needs a Content-Length")
            refusal = studio.uploads.admit(client, size)
            if refusal:
                return await _reply(send, 413 if "over the" in refusal else 429, refusal)
        try:
            return await self._store(scope, receive, send, client)
        finally:
            if lim.demo:
                studio.uploads.arrived(client, size)

    async def _store(self, scope, receive, send, client: str):
        status, head, chunks = 0, None, []

        async def keep(message):  # the route's answer is held until its files are recorded
            nonlocal status, head
            if message["type"] == "http.response.start":
                status, head = message["status"], message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._answer(send, client, status, head, b"".join(chunks))

        await self.app(scope, receive, keep)

    async def _answer(self, send, client: str, status: int, head: dict, body: bytes) -> None:
        studio, lim = self.studio, self.studio.limits
        if status == 200:
            try:
                paths = [str(p) for p in json.loads(body)]
            except (ValueError, TypeError):
                paths = []
            if lim.max_upload_files is not None and len(paths) > lim.max_upload_files:
                for p in paths:
                    delete_upload(Path(p), studio.uploads.folder)
                return await _reply(send, 413, f"at most {lim.max_upload_files} file(s) per upload")
            moved = [studio.uploads.record(p, client) for p in paths]
            if None in moved:  # an identical upload took the same path at the same moment
                for p in moved:
                    if p is not None:
                        studio.uploads.claim(p, client)
                        delete_upload(p, studio.uploads.folder)
                return await _reply(send, 409, "the upload collided with another one: upload the file again")
            body = json.dumps([str(p) for p in moved]).encode()
        headers = [(k, v) for k, v in head.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**head, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def event_client(event, hops: int) -> str:
    """The client address of a request in Gradio's queue (read once per request)."""
    client = getattr(event, "_p2d_client", None)
    if client is None:
        client = event._p2d_client = client_ip(event.request, hops)
    return client


def queued_events(queue) -> list:
    """The requests in Gradio's queue: those waiting and those running."""
    waiting = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
    return waiting + [e for job in list(queue.active_jobs) if job for e in job]


def take_turns(queue, hops: int, max_running: int | None = None) -> None:
    """Make Gradio's queue start, in each concurrency group with a free slot, the first waiting request of
    the client address with the fewest requests running (Gradio takes the group's first request), and
    none of an address that has ``max_running`` running already (it waits its turn). Groups are visited
    in random order as Gradio does; batched functions (this app has none) keep Gradio's way."""
    original = queue.get_events

    def get_events():
        groups = list(queue.event_queue_per_concurrency_id.items())
        random.shuffle(groups)
        running = Counter(event_client(e, hops) for job in list(queue.active_jobs) if job for e in job)
        for group_id, group in groups:
            if not group.queue or (group.concurrency_limit is not None
                                   and group.current_concurrency >= group.concurrency_limit):
                continue
            if any(e.fn.batch for e in group.queue):
                return original()
            ready = [(running[event_client(e, hops)], i, e) for i, e in enumerate(group.queue)]
            ready = [r for r in ready if max_running is None or r[0] < max_running]
            if not ready:
                continue
            first = min(ready, key=lambda r: r[:2])[2]
            group.queue.remove(first)
            return [first], False, group_id
        return None

    queue.get_events = get_events


class _GradioTracebacks:
    """What Gradio's queue prints for an error in its own processing of a request (a slider value over its
    range, a malformed file argument: the sender's doing): one bounded line of the server log instead of a
    traceback per request (`quiet_gradio_tracebacks`). Everything else is the `traceback` module's."""

    def __getattr__(self, name):
        return getattr(traceback, name)

    @staticmethod
    def print_exc(*args, **kwargs):
        exc = sys.exc_info()[1]
        if exc is not None:
            LOG.user_error("", "gradio", f"{type(exc).__name__}: {exc}")


def quiet_gradio_tracebacks() -> None:
    """Route the tracebacks Gradio's queue prints through the bounded server log (`p2d.studio.log`)."""
    import gradio.queueing

    gradio.queueing.traceback = _GradioTracebacks()


@contextlib.contextmanager
def forwarded_headers_untrusted():
    """While the server starts (uvicorn reads this when it is configured): no address is a trusted proxy
    for uvicorn's own X-Forwarded-For rewriting (see the module docstring)."""
    before = os.environ.get("FORWARDED_ALLOW_IPS")
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FORWARDED_ALLOW_IPS", None)
        else:
            os.environ["FORWARDED_ALLOW_IPS"] = before
