"""`Studio`: the app-wide services every tab uses (no Gradio layout here).

- the job worker (one job at a time, the shared model cache) and the per-session workspaces: which
  requests may create one (`workspace` with ``create=True``: the job and upload endpoints; `attach`:
  a page load or ``/attach``), the client address caps, and the job registry kept on disk
  (each workspace's ``workspace.json``; `restore` reads it back after a restart);
- `run_config`: the form -> the RunConfig a job runs (demo caps applied once, the model allowlist and
  paths checked, run folder decided), which is also what the settings file and the equivalent
  command show;
- `receive` and `download`: the one way a file comes into a workspace (only an upload this client made
  through Gradio's upload route and no session received yet, `p2d.studio.guard.Uploads`; checked and
  validated before it is stored; Gradio's own copy is deleted) and the one way a file is handed to the
  browser (only a file of the requesting session, copied to a private staging folder Gradio takes it
  from; in the public demo a text file without server paths);
- `gate` (`p2d.studio.gate.Gate`): the checks every endpoint's call and response pass;
- past runs of a session: `runs_table`, `open_run`, `unfinished_stages` (what Resume continues).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from p2d.config import STAGES, RunConfig
from p2d.data.loading import load_data
from p2d.errors import UserError, shown
from p2d.export import export_peft
from p2d.files import read_json
from p2d.hub import base_name
from p2d.pipeline import CONFIG_FILE, MANIFEST_FILE, Run

from . import form
from .gate import Gate
from .guard import Uploads, delete_upload, gradio_upload_folder
from .limits import Limits, client_ip
from .log import LOG
from .worker import ACTIVE, Job, Worker
from .workspace import Registry, Workspace, folder_bytes

INTERRUPTED = "interrupted: the server restarted while it ran (Resume it under Runs of this session)"
OUTBOX_KEEP_S = 3600.0  # staged downloads older than this are deleted (Gradio has its own copy by then)
#: downloads the app writes with paths in them (metrics.json, settings), staged without server paths in the demo;
#: data files (the selected set) are handed out as they are
TEXT_FILES = (".json", ".yaml", ".yml", ".txt", ".md", ".log")


def session_of(request) -> str | None:
    return getattr(request, "session_hash", None) or None


def fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def safe_name(name: str) -> str:
    """A file name with only letters, digits, dot, dash and underscore (at most 80 characters)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name)).name).lstrip(".") or "file"
    return cleaned[-80:]


class Studio:
    """App-wide state: limits, the job worker, workspaces and the settings the form starts with."""

    def __init__(self, limits: Limits, runs_root: Path, worker: Worker | None = None,
                 config: RunConfig | None = None, clock=time.time):
        self.limits = limits
        self.runs_root = Path(runs_root).resolve()
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.worker = worker or Worker(max_models=1, max_job_s=limits.max_job_s)
        self.worker.on_change = self._job_changed
        self.registry = Registry(self.runs_root, limits, busy=self._busy, restore=self.restore, clock=clock)
        self._sizes: dict[str, int] = {}  # job id -> bytes of its workspace when it was submitted (demo)
        self.outbox = Path(tempfile.mkdtemp(prefix="p2d-studio-out-"))  # not served; Gradio copies from it
        self._staged: dict[str, tuple] = {}
        self._owners: dict[str, Workspace] = {}  # job id -> its workspace, until the job is recorded
        self.gate = Gate(self)
        self.uploads = Uploads(limits, gradio_upload_folder(), clock=clock)
        start, self.start_notes = limits.apply((config or RunConfig()).validate())
        limits.check(start, None)
        self.initial = form.to_values(start, out_auto=limits.demo)
        self._closed = threading.Event()
        if limits.workspace_ttl_s or limits.upload_ttl_s or limits.max_disk_bytes:
            every = limits.sweep_every_s or max(1.0, min(300.0, *(t / 4 for t in (limits.workspace_ttl_s,
                                                                                   limits.upload_ttl_s) if t)))
            threading.Thread(target=self._sweeper, args=(every,), name="p2d-studio-sweeper", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.worker.close()
        shutil.rmtree(self.outbox, ignore_errors=True)

    def _sweeper(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - the sweeper must keep running
                LOG.note(f"sweep failed: {exc}")

    def sweep(self) -> None:
        """What the sweeper does every ``sweep_every_s``: idle workspaces past their expiry, uploads nobody
        received, old staged downloads, and idle workspaces beyond the disk cap."""
        self.registry.sweep()
        self.uploads.sweep()
        self._prune_outbox()
        if self.limits.max_disk_bytes is not None:
            self.registry.free(self.limits.max_disk_bytes)

    # -- sessions ------------------------------------------------------------------------------
    def client(self, request) -> str:
        return client_ip(request, self.limits.proxy_hops)

    def workspace(self, request, create: bool = False) -> Workspace:
        """The workspace of the request's session. Without one: a new one with ``create`` (the job and
        upload endpoints, within the client address caps), else the blank stand-in (light endpoints
        never create one)."""
        session, client = session_of(request), self.client(request)
        ws = self.registry.for_session(session, client)
        if ws is None:
            if not create:
                return self.registry.blank
            ws = self.registry.create(client)
            self.save(ws)  # on disk from the start: an eviction from memory never loses a key
            self.registry.bind(session, ws, client)
        return ws

    def attach(self, request, key: str | None, page: bool = True) -> Workspace:
        """`attach_key`'s workspace."""
        return self.attach_key(request, key, page)[0]

    def attach_key(self, request, key: str | None, page: bool = True) -> tuple[Workspace, str | None]:
        """Page load (or ``/attach`` with ``page=False``): the workspace of the key this browser kept
        (also after a server restart, from disk), else - on a page load in local mode - the workspace
        of the job that is running now, else the session's own, else a new one; and the key this
        request may be told: the key it sent, or the key of a workspace made for it now (locally also
        the running job's). Never the key of a workspace found by the session hash alone."""
        session, client = session_of(request), self.client(request)
        ws = self.registry.by_key(key) if key else None
        told = key if ws is not None else None
        if ws is None and page and not self.limits.demo:
            job = self.worker.latest()
            if job is not None and job.active:
                ws = self.registry.get(job.owner)
                told = ws.key if ws is not None else None
        if ws is None:
            ws = self.registry.for_session(session, client)
        if ws is None:
            ws = self.registry.create(client)
            self.save(ws)  # on disk from the start: an eviction from memory never loses a key
            told = ws.key
        self.registry.bind(session, ws, client)
        return ws, told

    def _busy(self, ws: Workspace) -> bool:
        return self.worker.active_job(ws.id) is not None

    def current_job(self, ws: Workspace) -> Job | None:
        return self.worker.get(ws.job_id)

    def submit(self, ws: Workspace, kind: str, body, label: str, request=None) -> Job:
        if ws.blank:
            raise UserError("this session has nothing to work on yet: press Load on the Model & data tab (or reload "
                            "the page)")
        client = self.client(request) if request else ws.ip
        counted = self.limits.max_disk_bytes_per_ip_day is not None
        if counted:
            self.registry.room(client, keep=ws)
        with ws.lock:
            job = self.worker.submit(kind, ws.id, body, label=label, client=client,
                                     max_per_client=self.limits.max_jobs_per_ip)
            ws.job_id = job.id
            self._owners[job.id] = ws
        if counted:
            self._sizes[job.id] = folder_bytes(ws.root)
        return job

    def save(self, ws: Workspace) -> None:
        try:
            ws.save()
        except OSError as exc:
            LOG.note(f"could not save workspace {ws.id}: {exc}")

    def note_job(self, job: Job) -> None:
        """Record ``job`` in its workspace's file now (a job body calls this once it knows its run)."""
        self._job_changed(job)

    def _job_changed(self, job: Job) -> None:
        """The worker's callback: keep the job in its workspace's file (a restart finds it)."""
        ws = self._owners.get(job.id) or self.registry.get(job.owner)
        if not job.active:
            self._owners.pop(job.id, None)
            before = self._sizes.pop(job.id, None)
            if before is not None and ws is not None:  # what the job wrote counts against its address's day
                self.registry.charge(job.client, folder_bytes(ws.root) - before)
        if ws is None:
            return
        summary = job.summary()
        summary.update(created=job.created, started=job.started, finished=job.finished)
        ws.record_job(summary)
        self.save(ws)

    def restore(self, ws: Workspace) -> None:
        """A workspace read back from disk (after a restart or an eviction): its jobs back into the
        worker's registry (one that was queued or running is marked interrupted), its current run
        reopened (results and data, not the model)."""
        for d in ws.jobs:
            job = self.worker.get(d.get("id"))
            if job is None:
                status, error = d.get("status", "done"), d.get("error")
                if status in ACTIVE:
                    status, error = "stopped", INTERRUPTED
                    d.update(status=status, error=error)
                job = Job(id=str(d.get("id")), kind=str(d.get("kind", "")), owner=ws.id, label=str(d.get("label", "")),
                          fn=None, status=status, created=d.get("created") or time.time(), started=d.get("started"),
                          finished=d.get("finished") or d.get("started"), phase=str(d.get("phase") or ""),
                          done=int(d.get("done") or 0), total=int(d.get("total") or 0), error=error,
                          info={k: d[k] for k in ("plan", "run") if k in d})
                self.worker.adopt(job)
            ws.job_id = job.id
        saved = ws.cache.pop("saved_run", None)
        if saved:
            ws.run = self._open(ws, saved)
            ws.claim_run_dir(Path(ws.run.out))

    # -- settings ------------------------------------------------------------------------------
    def run_config(self, values: dict, ws: Workspace) -> tuple[RunConfig, list[str]]:
        """The form -> the RunConfig a job runs, with notes on values the demo capped.

        The run folder: the one typed in the form (local mode), else the session's current run folder
        while model and data stay the same, else a new ``run-NNN`` folder in the workspace."""
        cfg, notes = self.limits.apply(self._in_workspace(form.to_config(values), ws))
        self.limits.check(cfg, ws.upload_dir)
        typed = None if self.limits.demo else form.explicit_out(values)
        run = ws.run
        if typed:
            out = Path(typed).expanduser()
        elif run is not None and run.config.stage_settings("load") == cfg.stage_settings("load"):
            out = run.out
        else:
            out = ws.next_run_dir()
        return cfg.replace(out=str(out)), notes

    def _in_workspace(self, cfg: RunConfig, ws: Workspace) -> RunConfig:
        """In the public demo, data paths are relative to the session's folder (``uploads/pool-....jsonl``,
        what the page is shown); they become the server's paths here (`Limits.check` then keeps them to
        the session's uploads)."""
        if not self.limits.demo or ws.blank:
            return cfg
        changes = {name: str(ws.root / value) for name in ("pool", "probe", "eval")
                   if (value := getattr(cfg, name)) and not Path(value).is_absolute()}
        return cfg.replace(**changes) if changes else cfg

    def shown_config(self, cfg: RunConfig) -> tuple[str, str]:
        """A RunConfig as the page shows it: its YAML and its command (no server paths in the demo)."""
        return self.gate.scrub(cfg.to_yaml()), self.gate.scrub(cfg.to_command())

    def form_from_yaml(self, text: str, ws: Workspace | None) -> tuple[dict, list[str]]:
        """A settings file -> form values (demo caps applied), with notes."""
        self.limits.check_text("settings", text, self.limits.max_settings_chars)
        cfg = RunConfig.from_yaml(text).validate()
        if ws is not None:
            cfg = self._in_workspace(cfg, ws)
        cfg, notes = self.limits.apply(cfg)
        self.limits.check(cfg, ws.upload_dir if ws is not None else None)
        return form.to_values(cfg, out_auto=self.limits.demo), notes

    def form_of_run(self, ws: Workspace) -> dict | None:
        """The form values of the workspace's current run (None before the first job)."""
        run = ws.run
        if run is None:
            return None
        auto = self.limits.demo or Path(run.out).parent == ws.root
        return form.to_values(run.config, out_auto=auto)

    # -- past runs -----------------------------------------------------------------------------
    def run_folder(self, ws: Workspace, name: str) -> Path:
        """The run folder ``name`` of ``ws`` (a ``run-NNN`` of its own; locally also the current run's
        folder by its full path)."""
        name = str(name or "").strip()
        if not self.limits.demo:  # local mode: also a run folder typed in the form, by its full path
            if ws.run is not None and name in (str(ws.run.out), ws.run.out.name):
                return Path(ws.run.out)
            if Path(name).is_absolute() and (Path(name) / CONFIG_FILE).is_file():
                return Path(name)
        if not re.fullmatch(r"run-\d{3,6}", name) or not (ws.root / name / CONFIG_FILE).is_file():
            raise UserError(f"no run folder {shown(name)} in this session: pick one from the list")
        return ws.root / name

    def _open(self, ws: Workspace, name: str):
        folder = self.run_folder(ws, name)
        cfg, _ = self.limits.apply(RunConfig.load(folder / CONFIG_FILE))
        self.limits.check(cfg, ws.upload_dir)
        run = Run.open(folder, config=cfg.replace(out=str(folder)), model_loader=self.worker.load_model,
                       data_limits=self.limits.data_limits())
        try:
            run.require_data()  # the data (not the model): enough for every tab's view
        except UserError as exc:
            LOG.note(f"the data of {folder} could not be read back: {exc}")
        return run

    def open_run(self, ws: Workspace, name: str, in_job: bool = False):
        """Make the run folder ``name`` the session's current run (read back, no model loaded)."""
        if not in_job and self._busy(ws):
            raise UserError("this session has a job queued or running: wait for it or press Stop, then open the run")
        run = self._open(ws, name)
        with ws.lock:
            ws.run = run
            ws.claim_run_dir(Path(run.out))
            ws.cache.pop("log", None)
        self.save(ws)
        return run

    def explore_run(self, ws: Workspace, name: str | None):
        """The run a view of the Explore tab reads: the current one (``name`` empty or its own name), else the
        session's run folder ``name`` read back without becoming current."""
        name = str(name or "").strip()
        if not name or (ws.run is not None and name in (ws.run.out.name, str(ws.run.out))):
            if ws.run is None:
                raise UserError("no run yet: load a model and data on the Model & data tab first")
            return ws.run
        return self._open(ws, name)

    def unfinished_stages(self, ws: Workspace, run) -> list[str]:
        """What Resume continues: the stages of the run's last job if it did not end done, and any
        stage left partial; those not done, in order."""
        last = next((j for j in reversed(ws.jobs) if j.get("run") == run.out.name), None)
        want = set(run.stages_partial)
        if last is not None and last.get("status") != "done":
            want.update(last.get("plan") or [])
        return [s for s in STAGES if s in want and not run.is_done(s)]

    def runs_table(self, ws: Workspace) -> list[dict]:
        """One row per run folder of the session: name, model, data, stages done and partial, last job."""
        rows = []
        for folder in ws.run_dirs():
            manifest = (read_json(folder / MANIFEST_FILE) or {}).get("stages") or {}
            try:
                cfg = RunConfig.load(folder / CONFIG_FILE)
                model = cfg.model
                data = Path(cfg.pool).name.split("-", 2)[-1] if cfg.pool else f"built-in ({cfg.target})"
            except UserError:
                model, data = "?", "?"
            last = next((j for j in reversed(ws.jobs) if j.get("run") == folder.name), None)
            rows.append({"run": folder.name, "model": model, "data": data,
                         "done": ", ".join(s for s in STAGES if s in manifest and not manifest[s].get("partial")),
                         "partial": ", ".join(s for s in STAGES if manifest.get(s, {}).get("partial")),
                         "last job": f"{last.get('label')}: {last.get('status')}" if last else "",
                         "current": ws.run is not None and Path(ws.run.out) == folder})
        return rows

    # -- files in and out ----------------------------------------------------------------------
    def receive(self, ws: Workspace, kind: str, file, check=None, store: bool = True, client: str | None = None):
        """Every uploaded file comes in here: in the public demo only an upload ``client`` made through
        Gradio's upload route that no session received yet (any other path is refused and left alone);
        its size checked (per file, per session: refused files count too), ``check(path)`` run on it where
        Gradio put it (a UserError rejects it), then - with ``store`` - copied into the workspace's uploads
        folder (not served). Gradio's copy of a received upload is deleted in every case, so it is never
        left in a folder the server serves. Returns (stored path or None, check's result)."""
        src = Path(str(file))
        name = safe_name(src.name)
        lim = self.limits
        claimed = self.uploads.claim(src, client if client is not None else "unknown")
        if lim.demo and not claimed:
            raise UserError("the upload did not arrive: upload the file again")
        size = 0
        try:
            if not src.is_file():
                raise UserError("the upload did not arrive: upload the file again")
            size = src.stat().st_size
            if lim.max_file_bytes is not None and size > lim.max_file_bytes:
                raise UserError(f"{name} is {fmt_mb(size)}: this server takes files up to {fmt_mb(lim.max_file_bytes)}")
            if lim.max_session_bytes is not None and \
                    ws.upload_bytes() + ws.refused_bytes + size > lim.max_session_bytes:
                raise UserError(f"this session's uploads would pass {fmt_mb(lim.max_session_bytes)} (refused files "
                                "count too): start a new session (another tab) for other files")
            checked = check(src) if check is not None else None
            dest = None
            if store:
                if ws.blank:
                    raise UserError("this session has no workspace: reload the page")
                if lim.demo:
                    self.registry.room(client or ws.ip, size, keep=ws)
                ws.upload_dir.mkdir(parents=True, exist_ok=True)
                dest = ws.upload_dir / f"{kind}-{secrets.token_hex(4)}-{name}"
                tmp = dest.with_name(f".{dest.name}.part")
                try:
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
        except UserError:
            ws.refused_bytes += size
            raise
        finally:
            if claimed:
                delete_upload(src, gradio_upload_folder())
        if store:
            self.registry.charge(client or ws.ip, size)
            self.save(ws)
        return dest, checked

    def upload(self, ws: Workspace, kind: str, file, columns: str | None = None,
               client: str | None = None) -> tuple[str | None, str]:
        """Validate, store and describe an uploaded data file: (stored path or None when rejected,
        markdown). The description (format, rows, skipped rows, tasks) or the loader's error. In the
        public demo the path is relative to the session's folder (``uploads/pool-....jsonl``)."""
        display = safe_name(Path(str(file)).name)
        rows_cap = self.limits.data_rows().get(kind) if self.limits.demo else None

        def check(path: Path) -> dict:
            mapping = RunConfig(columns=columns).columns
            return load_data(str(path), mapping=mapping, max_rows=rows_cap, max_bytes=self.limits.max_data_bytes,
                             max_field_chars=self.limits.max_field_chars).summary()

        try:
            dest, summ = self.receive(ws, kind, file, check, client=client)
        except UserError as exc:
            text = str(exc)
            for where in {str(file), str(Path(str(file)).resolve())}:  # no server paths in the message
                text = text.replace(where, display)
            return None, f"✗ **{kind}** `{display}` was not stored: {text}"
        tasks = ", ".join(f"{k} {v}" for k, v in list(summ["tasks"].items())[:6]) or "no task labels"
        skipped = (f" ({', '.join(f'{n} {r}' for r, n in summ['skipped_reasons'].items())})"
                   if summ["skipped"] else "")
        cut = (f"; only the first {rows_cap} rows are used in the public demo" if summ.get("truncated") and rows_cap
               else "")
        shown = dest.relative_to(ws.root) if self.limits.demo else dest
        return str(shown), (f"**{kind}** `{display}`: format **{summ['format']}**, {summ['rows']} rows, "
                           f"{summ['skipped']} skipped{skipped}; tasks: {tasks}{cut}")

    def _owns(self, ws: Workspace, path: Path) -> bool:
        """Whether ``path`` is a file of this workspace (its folder, or - locally - its run folder)."""
        if ws.blank:
            return False
        try:
            p = path.resolve()
            roots = [ws.root.resolve()]
            if ws.run is not None and not self.limits.demo:
                roots.append(Path(ws.run.out).resolve())
            return any(p.is_relative_to(r) for r in roots)
        except OSError:
            return False

    def download(self, ws: Workspace, path) -> str | None:
        """A file of this workspace to hand to the browser (None: nothing to offer). Only files of the
        requesting session pass; the file is staged in a private folder (not served) from which
        Gradio copies it into its cache under a secret-seeded hash."""
        if path is None:
            return None
        p = Path(path)
        if not p.is_file():
            return None
        if not self._owns(ws, p):
            LOG.note(f"refused to hand out {p}: not a file of workspace {ws.id or '(none)'}")
            return None
        st = p.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._staged.get(str(p))
        if cached is not None and cached[0] == stamp and Path(cached[1]).is_file():
            return cached[1]
        folder = self.outbox / secrets.token_hex(16)
        folder.mkdir(parents=True)
        staged = folder / p.name
        if self.limits.demo and p.suffix.lower() in TEXT_FILES:  # no server paths in what leaves the demo
            text = p.read_text(encoding="utf-8", errors="replace")
            staged.write_text(self.gate.scrub(text), encoding="utf-8")
        else:
            shutil.copyfile(p, staged)
        self._staged[str(p)] = (stamp, str(staged))
        self._prune_outbox()
        return str(staged)

    def offer_text(self, ws: Workspace, name: str, text: str) -> str:
        """A text made for download (e.g. the settings file), staged without touching the workspace."""
        folder = self.outbox / secrets.token_hex(16)
        folder.mkdir(parents=True)
        path = folder / safe_name(name)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def _prune_outbox(self) -> None:
        cutoff = time.time() - OUTBOX_KEEP_S
        for folder in list(self.outbox.iterdir()) if self.outbox.is_dir() else []:
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass

    def adapter_zip(self, ws: Workspace, make: bool = False) -> Path | None:
        """The trained heads as a zip in the workspace's downloads folder; None before training. ``make``
        (the jobs that train, in the worker): build it when missing or older than the adapter; without
        ``make`` (the page's requests) only an up-to-date zip, so that no request packs files."""
        run = ws.run
        trained = run.train_result if run is not None else None
        if trained is None:
            return None
        adapter = Path(trained.adapter_dir)
        return self._zip(ws, adapter, ws.download_dir / f"{run.out.name}-adapter.zip",
                         (lambda tmp: shutil.make_archive(tmp, "zip", root_dir=adapter.parent, base_dir=adapter.name))
                         if make else None)

    def peft_zip(self, ws: Workspace, run=None, trained=None, make: bool = False) -> Path | None:
        """The PEFT-format export of the trained heads as a zip (``make``: export it when missing or
        older than the adapter, which needs the model; without ``make`` only an up-to-date zip)."""
        run = run or ws.run
        trained = trained or (run.train_result if run is not None else None)
        if trained is None:
            return None
        adapter = Path(trained.adapter_dir)
        zip_path = ws.download_dir / f"{run.out.name}-adapter-peft.zip"

        def build(tmp: str) -> str:
            lm = self.worker.load_model(run.config)
            with tempfile.TemporaryDirectory(prefix="p2d-peft-") as folder:
                out = export_peft(lm, adapter, Path(folder) / f"{run.out.name}-peft",
                                  base_model_name=base_name(run.config.model))
                return shutil.make_archive(tmp, "zip", root_dir=out.parent, base_dir=out.name)
        return self._zip(ws, adapter, zip_path, build if make else None)

    @staticmethod
    def _zip(ws: Workspace, adapter: Path, zip_path: Path, build) -> Path | None:
        files = [p for p in adapter.rglob("*") if p.is_file()] if adapter.is_dir() else []
        if not files:
            return None
        newest = max(p.stat().st_mtime for p in files)
        if zip_path.exists() and zip_path.stat().st_mtime >= newest:
            return zip_path
        if build is None:
            return None
        ws.download_dir.mkdir(parents=True, exist_ok=True)
        tmp = build(str(ws.download_dir / f".{zip_path.stem}-{secrets.token_hex(3)}"))
        Path(tmp).replace(zip_path)
        return zip_path
