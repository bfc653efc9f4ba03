"""What the app guards below Gradio's event handlers: its upload route, its queue, and the client address.

`Guard` is an ASGI middleware of the served app (`p2d.studio.server.StudioBlocks.launch` installs it):

- ``POST /gradio_api/upload`` (Gradio stores files there before any handler runs): refused before a byte
  is stored when the request is over ``max_file_bytes`` (plus the form's overhead), when the client
  address has made ``max_uploads_per_ip_hour`` uploads or sent ``max_upload_bytes_per_ip_hour`` in the
  last hour, or when unclaimed uploads of all clients hold ``max_pending_upload_bytes``; an answer with
  more than ``max_upload_files`` files is deleted and refused. Every stored file is recorded in
  `Uploads` with the address that sent it: `p2d.studio.services.Studio.receive` takes (and deletes) only
  a file this address uploaded and no session has received yet, so a path learnt from elsewhere is never
  read or deleted; files nobody received are deleted after ``upload_ttl_s``.
- ``POST /gradio_api/queue/join`` and ``/gradio_api/call/...`` (a request entering Gradio's queue):
  refused (429) when the client address already has ``max_queued_per_ip`` requests waiting in the queue,
  so one client cannot fill it (``queue_size``) for everyone else.

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
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from .limits import client_ip

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
    """Files stored by Gradio's upload route that no session has received yet, with who sent them."""

    def __init__(self, limits, folder: Path):
        self.limits, self.folder = limits, Path(folder)
        self._pending: dict[str, Upload] = {}
        self._recent: dict[str, deque] = {}  # client -> (time, bytes) of its uploads in the last hour
        self._lock = threading.Lock()

    def admit(self, client: str, size: int) -> str | None:
        """Why an upload of ``size`` bytes from ``client`` is refused (None: admitted and counted)."""
        lim, now = self.limits, time.time()
        with self._lock:
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
            pending = sum(u.size for u in self._pending.values())
            if lim.max_pending_upload_bytes is not None and pending + size > lim.max_pending_upload_bytes:
                return "the server holds too many uploads right now: try again in a few minutes"
            recent.append((now, size))
        return None

    def record(self, path, client: str) -> None:
        p = Path(path).resolve()
        try:
            size = p.stat().st_size
        except OSError:
            return
        with self._lock:
            self._pending[str(p)] = Upload(p, client, size, time.time())

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
        now = time.time() if now is None else now
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
        """Requests of ``client`` waiting in Gradio's queue now (not yet running)."""
        queue = getattr(self.blocks, "_queue", None)
        hops = self.studio.limits.proxy_hops
        n = 0
        for events in list(getattr(queue, "event_queue_per_concurrency_id", {}).values()):
            for event in list(events.queue):
                if client_ip(event.request, hops) == client:
                    n += 1
        return n

    def _queue_refusal(self, client: str) -> str | None:
        cap = self.studio.limits.max_queued_per_ip
        if cap is None:
            return None
        n = self.queued(client) + self._joining[client]
        if n >= cap:
            return f"your address has {n} requests waiting in the queue, the most this server takes: wait for them"
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
            for p in paths:
                studio.uploads.record(p, client)
        headers = [(k, v) for k, v in head.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**head, "headers": headers})
        await send({"type": "http.response.body", "body": body})


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
