"""Per-session workspaces: each browser session works in its own folder with its own `p2d.pipeline.Run`.

A workspace folder holds the session's run folders (``run-001``, ``run-002``, ...: a new one for
every new model/data setting), its uploads (``uploads/``), what the app made for download
(``downloads/``) and ``workspace.json`` (its current run and its jobs, so a restarted server finds
them). The app never writes into a run folder itself: the `Run` owns it. No folder here is served
over HTTP: files leave only through `p2d.studio.services.Studio.download`.

Keys: a workspace is identified by a secret key (``secrets.token_urlsafe``, 192 bits) that the page
keeps in the browser's localStorage (``gr.BrowserState``) and sends back on a page load; the key is
never a path. The folder name is derived from it (``ws-`` + 24 hex digits of its SHA-256), so the
server finds a workspace on disk after a restart without storing keys, and a folder name (shown in
the page) gives no access. Each Gradio session (one page, or one gradio_client) is mapped to a key.

The `Registry` keeps at most ``max_workspaces`` workspaces in memory. Evicting one drops only its
in-memory state (its files stay; the key reopens it from disk); a workspace with a queued or running
job is never evicted. Only a page load, an API ``/attach`` and the job/upload endpoints create a
workspace, at most ``max_workspaces_per_ip`` per client address in memory (an address over it evicts
its own least recently used idle workspace, never another address's) and at most
``max_new_workspaces_per_ip_hour`` new ones per address per hour. In the public demo, workspaces
unused for ``workspace_ttl_s`` are deleted with their files (`Registry.sweep`).

The disk (public demo): the runs folder holds at most ``max_disk_bytes``; when a new file would pass it
(`Registry.room`, before an upload is stored or a job starts, and on every sweep) the idle workspaces
go with their files, least recently used first, never one with a job queued or running. One client
address stores at most ``max_disk_bytes_per_ip_day`` in 24 hours (`Registry.charge` counts what its
uploads and jobs added; files deleted since still count). Time comes from ``clock`` (tests move it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from p2d.errors import UserError
from p2d.files import read_json, write_json
from p2d.pipeline import CONFIG_FILE
from p2d.training import LOG_NAME

from .log import LOG

WORKSPACE_FILE = "workspace.json"
KEEP_JOBS = 20          # job summaries kept per workspace
SAVE_TOUCH_EVERY = 60.0  # seconds between writes of a workspace's last use
MAX_SESSIONS = 4096     # Gradio sessions mapped to a key (older ones reload the page to re-attach)
DISK_MEASURE_EVERY = 5.0  # seconds a measure of the runs folder's size is reused
DAY = 24 * 3600.0
MB = 1024 * 1024


def new_key() -> str:
    """A new workspace key: 192 random bits, URL-safe text."""
    return secrets.token_urlsafe(24)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def folder_name(key: str) -> str:
    """The workspace folder of ``key`` (derived, so the key itself is never a path)."""
    return "ws-" + key_digest(key)[:24]


class LogTail:
    """The records of a growing JSONL file (train_log.jsonl), read incrementally: each `read` parses
    only the bytes added since the last one (a half-written last line waits for the next read)."""

    def __init__(self, path: Path, key=None):
        self.path, self.key = Path(path), key
        self.records: list[dict] = []
        self._offset = 0
        self._inode = None
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                self.records, self._offset, self._inode = [], 0, None
                return self.records
            if st.st_ino != self._inode or st.st_size < self._offset:  # a new file: start over
                self.records, self._offset, self._inode = [], 0, st.st_ino
            if st.st_size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
                end = chunk.rfind(b"\n") + 1
                for line in chunk[:end].splitlines():
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        pass
                self._offset += end
                self.records = list(self.records)  # a new list: readers holding the old one keep theirs
            return self.records


@dataclass
class Workspace:
    key: str                             # the secret the page keeps (never a path, never shown)
    id: str                              # the folder name (derived from the key); owner of its jobs
    root: Path
    ip: str = ""
    run: Any = None                      # the session's p2d.pipeline.Run (set by a job)
    run_index: int = 0
    job_id: str | None = None            # latest job of this workspace
    jobs: list = field(default_factory=list)  # summaries of its latest jobs (persisted)
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.time)
    saved_at: float = 0.0
    blank: bool = False                  # the stand-in for a request without a workspace (never stored)
    refused_bytes: int = 0               # uploads refused so far (they count against the session's total too)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # derived values (random-pick counts, log tails)

    @property
    def upload_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def download_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def out(self) -> Path | None:
        return Path(self.run.out) if self.run is not None else None

    def next_run_dir(self) -> Path:
        """The folder the next new run gets (not created)."""
        i = self.run_index + 1
        while (self.root / f"run-{i:03d}").exists():
            i += 1
        return self.root / f"run-{i:03d}"

    def claim_run_dir(self, path: Path) -> None:
        """Note that ``path`` (from `next_run_dir`) is used now."""
        name = Path(path).name
        if Path(path).parent == self.root and name.startswith("run-") and name[4:].isdigit():
            self.run_index = max(self.run_index, int(name[4:]))

    def run_dirs(self) -> list[Path]:
        """The run folders of this workspace (``run-NNN`` holding a config.yaml), oldest first."""
        if self.blank or not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("run-*") if p.is_dir() and (p / CONFIG_FILE).is_file())

    def upload_bytes(self) -> int:
        """Bytes of the uploads stored so far."""
        if not self.upload_dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.upload_dir.iterdir() if p.is_file())

    def log(self) -> list[dict]:
        """The training log records of the current run (read incrementally; read afresh after each
        new job, since a new training starts a new log)."""
        if self.run is None:
            return []
        path = self.out / LOG_NAME
        tail = self.cache.get("log")
        if tail is None or tail.path != path or tail.key != self.job_id:
            tail = self.cache["log"] = LogTail(path, self.job_id)
        return tail.read()

    # -- on disk ---------------------------------------------------------------------------------
    def record_job(self, summary: dict) -> None:
        """Keep ``summary`` (a job's, by id) among the workspace's latest jobs."""
        with self.lock:
            self.jobs = [j for j in self.jobs if j.get("id") != summary.get("id")] + [summary]
            self.jobs = self.jobs[-KEEP_JOBS:]

    def save(self) -> None:
        """Write workspace.json (its current run, its jobs; the key only as a digest)."""
        if self.blank:
            return
        with self.lock:
            run = None
            if self.run is not None:
                out = Path(self.run.out)
                run = out.name if out.parent == self.root else str(out)
            data = {"format": 1, "key_sha256": key_digest(self.key), "created": self.created, "touched": self.touched,
                    "run": run, "run_index": self.run_index, "jobs": self.jobs}
            write_json(self.root / WORKSPACE_FILE, data)
            self.saved_at = time.time()

    @classmethod
    def load(cls, root: Path, key: str) -> "Workspace | None":
        """The workspace saved in ``root`` if ``key`` is its key (None otherwise); its run is not
        opened here (see `p2d.studio.services.Studio.restore`)."""
        data = read_json(Path(root) / WORKSPACE_FILE)
        if not isinstance(data, dict) or data.get("key_sha256") != key_digest(key):
            return None
        ws = cls(key=key, id=Path(root).name, root=Path(root), created=float(data.get("created") or time.time()),
                 run_index=int(data.get("run_index") or 0), jobs=list(data.get("jobs") or []))
        ws.cache["saved_run"] = data.get("run")
        ws.saved_at = time.time()
        return ws


def saved_touch(root: Path) -> float | None:
    """When the workspace in ``root`` was last used, from its file (None: no workspace.json)."""
    data = read_json(Path(root) / WORKSPACE_FILE)
    if not isinstance(data, dict):
        return None
    try:
        return float(data.get("touched"))
    except (TypeError, ValueError):
        return None


class Registry:
    """Workspaces by key and id, which workspace each Gradio session uses, and the caps on them.

    ``busy(ws)`` says whether a workspace has a queued or running job (never evicted or expired);
    ``restore(ws)`` finishes a workspace read back from disk (its run, its jobs)."""

    def __init__(self, root: Path, limits=None, busy: Callable[[Workspace], bool] | None = None,
                 restore: Callable[[Workspace], None] | None = None, clock: Callable[[], float] = time.time):
        from .limits import LOCAL

        self.clock = clock
        self._stored: dict[str, deque] = {}  # client address -> (time, bytes) it stored in the last day
        self._usage: tuple[float, int] | None = None  # (when, bytes) of the last measure of the runs folder
        self.root = Path(root)
        self.limits = limits or LOCAL
        self.max = self.limits.max_workspaces
        self.busy = busy or (lambda ws: False)
        self.restore = restore
        self._by_id: OrderedDict[str, Workspace] = OrderedDict()  # least recently used first
        self._sessions: OrderedDict[tuple, str] = OrderedDict()   # (Gradio session, address) -> workspace key
        self._new_by_ip: dict[str, deque] = {}
        self._lock = threading.RLock()
        self.blank = Workspace(key="", id="", root=self.root / ".no-session", blank=True)
        self.evicted = 0  # workspaces dropped from memory so far (for the bench and tests)
        self.freed = 0    # idle workspaces deleted to keep the disk within its cap

    # -- creating -------------------------------------------------------------------------------
    def create(self, ip: str = "") -> Workspace:
        """A new workspace for a client at ``ip`` (UserError when its caps say no)."""
        lim = self.limits
        with self._lock:
            now = self.clock()
            if lim.max_new_workspaces_per_ip_hour is not None:
                recent = self._new_by_ip.setdefault(ip, deque())
                while recent and recent[0] < now - 3600:
                    recent.popleft()
                if len(recent) >= lim.max_new_workspaces_per_ip_hour:
                    raise UserError("too many new sessions from your address in the last hour: keep using an open "
                                    "tab (or reload it), or try again later")
                recent.append(now)
            if lim.max_workspaces_per_ip is not None:
                mine = [w for w in self._by_id.values() if w.ip == ip]
                while len(mine) >= lim.max_workspaces_per_ip:
                    idle = [w for w in mine if not self.busy(w)]
                    if not idle:
                        raise UserError(f"your address already has {len(mine)} sessions with jobs queued or running: "
                                        "wait for one to finish")
                    self._drop(idle[0])
                    mine.remove(idle[0])
            key = new_key()
            ws = Workspace(key=key, id=folder_name(key), root=self.root / folder_name(key), ip=ip, created=now, touched=now)
            self._by_id[ws.id] = ws
            try:
                self._evict_over_max(keep=ws)
            except UserError:
                self._by_id.pop(ws.id, None)
                raise
            return ws

    def _evict_over_max(self, keep: Workspace) -> None:
        while len(self._by_id) > self.max:
            victim = next((w for w in self._by_id.values() if w is not keep and not self.busy(w)), None)
            if victim is None:
                raise UserError(f"the server is full ({len(self._by_id) - 1} sessions with jobs queued or running): "
                                "try again in a few minutes")
            self._drop(victim)

    def _drop(self, ws: Workspace) -> None:
        """Forget ``ws`` in memory (its files and its key stay valid: `by_key` reads it back)."""
        if ws.run is not None or ws.jobs:
            try:
                ws.save()
            except OSError:
                pass
        self._by_id.pop(ws.id, None)
        self.evicted += 1

    # -- finding --------------------------------------------------------------------------------
    def by_key(self, key: str | None) -> Workspace | None:
        """The workspace of ``key``: in memory, else read back from disk (None: unknown key)."""
        if not key or not isinstance(key, str) or len(key) > 200:
            return None
        name = folder_name(key)
        with self._lock:
            ws = self._by_id.get(name)
            if ws is not None:
                if ws.key != key:
                    return None
                self._by_id.move_to_end(name)
                return ws
        ws = Workspace.load(self.root / name, key)
        if ws is None:
            return None
        ws.touched = self.clock()
        if self.restore is not None:
            try:
                self.restore(ws)
            except Exception as exc:  # noqa: BLE001 - a damaged run folder must not lock the visitor out
                LOG.note(f"could not reopen the run of workspace {name}: {exc}")
        with self._lock:
            current = self._by_id.get(name)
            if current is not None:  # restored by another request meanwhile
                return current
            self._by_id[name] = ws
            self._evict_over_max(keep=ws)
        return ws

    def get(self, ws_id: str | None) -> Workspace | None:
        """A workspace in memory by its id (folder name)."""
        return self._by_id.get(ws_id) if ws_id else None

    def _session_key(self, session: str, client: str | None) -> tuple:
        """Sessions are told apart by address too in the public demo (see the module docstring)."""
        return (session, client or "") if self.limits.demo else (session, "")

    def for_session(self, session: str | None, client: str | None = None) -> Workspace | None:
        """The workspace the Gradio ``session`` (from ``client``) uses (None: none yet)."""
        if not session:
            return None
        sk = self._session_key(session, client)
        with self._lock:
            key = self._sessions.get(sk)
            if key is not None:
                self._sessions.move_to_end(sk)
        ws = self.by_key(key) if key else None
        if ws is not None:
            self.touch(ws)
        return ws

    def bind(self, session: str | None, ws: Workspace, client: str | None = None) -> None:
        """Point ``session`` (from ``client``) at ``ws``."""
        if not session or ws.blank:
            return
        sk = self._session_key(session, client)
        with self._lock:
            self._sessions[sk] = ws.key
            self._sessions.move_to_end(sk)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        self.touch(ws)

    def touch(self, ws: Workspace) -> None:
        if ws.blank:
            return
        ws.touched = self.clock()
        with self._lock:
            if ws.id in self._by_id:
                self._by_id.move_to_end(ws.id)
        if ws.saved_at and ws.touched - ws.saved_at > SAVE_TOUCH_EVERY:
            try:
                ws.save()
            except OSError:
                pass

    def all(self) -> list[Workspace]:
        return list(self._by_id.values())

    # -- expiry ---------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the workspaces (in memory and on disk) unused for ``workspace_ttl_s`` and without a
        job queued or running; their ids."""
        ttl = self.limits.workspace_ttl_s
        if not ttl:
            return []
        now = self.clock() if now is None else now
        gone = []
        with self._lock:
            for ws in list(self._by_id.values()):
                if ws.touched < now - ttl and not self.busy(ws):
                    self._by_id.pop(ws.id, None)
                    shutil.rmtree(ws.root, ignore_errors=True)
                    gone.append(ws.id)
            for session, key in list(self._sessions.items()):
                if folder_name(key) in gone:
                    self._sessions.pop(session, None)
            live = set(self._by_id)
        if self.root.is_dir():
            for folder in self.root.glob("ws-*"):
                if folder.name in live or not folder.is_dir():
                    continue
                touched = saved_touch(folder)
                if touched is None:
                    try:
                        touched = folder.stat().st_mtime
                    except OSError:
                        continue
                if touched < now - ttl:
                    shutil.rmtree(folder, ignore_errors=True)
                    gone.append(folder.name)
        return gone

    # -- the disk -------------------------------------------------------------------------------
    def disk_used(self, fresh: bool = False) -> int:
        """Bytes under the runs folder (measured at most every few seconds unless ``fresh``)."""
        now = time.monotonic()
        if not fresh and self._usage is not None and now - self._usage[0] < DISK_MEASURE_EVERY:
            return self._usage[1]
        used = folder_bytes(self.root)
        self._usage = (now, used)
        return used

    def stored_today(self, ip: str) -> int:
        """Bytes ``ip`` stored in the last 24 hours (`charge`)."""
        with self._lock:
            recent = self._stored.get(ip)
            if not recent:
                return 0
            while recent and recent[0][0] < self.clock() - DAY:
                recent.popleft()
            return sum(n for _, n in recent)

    def charge(self, ip: str, nbytes: int) -> None:
        """Count ``nbytes`` stored by ``ip`` (its uploads, what its jobs wrote) against its daily cap."""
        if nbytes > 0:
            with self._lock:
                self._stored.setdefault(ip, deque()).append((self.clock(), int(nbytes)))
                self._usage = None

    def room(self, ip: str, nbytes: int = 0, keep: Workspace | None = None) -> None:
        """Make sure ``ip`` may store ``nbytes`` more: within its daily cap (else a UserError), and within the
        total cap after idle workspaces other than ``keep`` made room (else a UserError)."""
        lim = self.limits
        if lim.max_disk_bytes_per_ip_day is not None:
            today = self.stored_today(ip)
            if today + nbytes > lim.max_disk_bytes_per_ip_day:
                raise UserError(f"your address stored {today / MB:.0f} MB here in the last 24 hours, the most this "
                                f"server keeps per address is {lim.max_disk_bytes_per_ip_day / MB:.0f} MB: try again "
                                "tomorrow, or duplicate the Space")
        if lim.max_disk_bytes is not None:
            self.free(lim.max_disk_bytes - nbytes, keep=keep)
            if self.disk_used() + nbytes > lim.max_disk_bytes:
                raise UserError("the server's disk is full with sessions that have jobs running: try again in a few "
                                "minutes")

    def free(self, target: int, keep: Workspace | None = None) -> list[str]:
        """Delete idle workspaces (in memory and on disk), least recently used first, until the runs folder
        holds at most ``target`` bytes; never one with a job queued or running, nor ``keep``. Their ids."""
        gone: list[str] = []
        used = self.disk_used(fresh=True)
        if used <= target:
            return gone
        with self._lock:
            live = {w.id: w for w in self._by_id.values()}
            folders = []
            for folder in self.root.glob("ws-*") if self.root.is_dir() else []:
                ws = live.get(folder.name)
                if ws is not None and (ws is keep or self.busy(ws)) or not folder.is_dir():
                    continue
                touched = ws.touched if ws is not None else (saved_touch(folder) or 0.0)
                folders.append((touched, folder))
            for _, folder in sorted(folders):
                if used <= target:
                    break
                used -= folder_bytes(folder)
                self._delete(folder.name)
                gone.append(folder.name)
        return gone

    def _delete(self, ws_id: str) -> None:
        """Forget a workspace and delete its folder (the caller holds the lock)."""
        self._by_id.pop(ws_id, None)
        for session, key in list(self._sessions.items()):
            if folder_name(key) == ws_id:
                self._sessions.pop(session, None)
        shutil.rmtree(self.root / ws_id, ignore_errors=True)
        self._usage = None
        self.freed += 1


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is missing)."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total
