"""`Studio`: the app-wide services every tab uses (no Gradio layout here).

- the job runner (one job at a time, the shared model cache) and the per-session workspaces;
- `run_config`: the form -> the RunConfig a job runs (demo caps applied once, run folder decided),
  which is also what the settings file and the equivalent command show;
- `receive` and `download`: the one way a file comes into a workspace (`upload` describes a data
  file after receiving it) and the one way a file is handed to the browser.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from p2d.config import RunConfig
from p2d.errors import UserError

from . import form
from .limits import Limits, check_paths
from .runner import Job, Runner
from .workspace import Registry, Workspace


class Studio:
    """App-wide state: limits, runner, workspaces and the settings the form starts with."""

    def __init__(self, limits: Limits, runs_root: Path, runner: Runner | None = None,
                 config: RunConfig | None = None):
        self.limits = limits
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.runner = runner or Runner(max_models=1)
        self.registry = Registry(self.runs_root)
        start, self.start_notes = limits.apply((config or RunConfig()).validate())
        check_paths(start, limits, None)
        self.initial = form.to_values(start, out_auto=limits.demo)

    # -- sessions ------------------------------------------------------------------------------
    def workspace(self, request) -> Workspace:
        return self.registry.for_session(getattr(request, "session_hash", None))

    def attach(self, request, browser_ws_id: str | None) -> Workspace:
        """Page load: the workspace this browser used before (kept in localStorage), else - locally -
        the workspace of the job that is running now, else a new one."""
        session = getattr(request, "session_hash", None)
        ws = self.registry.attach(session, browser_ws_id)
        if ws is None and not self.limits.demo:
            job = self.runner.latest()
            if job is not None and job.active:
                ws = self.registry.attach(session, job.owner)
        return ws or self.registry.for_session(session)

    def current_job(self, ws: Workspace) -> Job | None:
        return self.runner.get(ws.job_id)

    def submit(self, ws: Workspace, kind: str, body, label: str) -> Job:
        job = self.runner.submit(kind, ws.id, body, label=label)
        ws.job_id = job.id
        return job

    # -- settings ------------------------------------------------------------------------------
    def run_config(self, values: dict, ws: Workspace) -> tuple[RunConfig, list[str]]:
        """The form -> the RunConfig a job runs, with notes on values the demo capped.

        The run folder: the one typed in the form (local mode), else the session's current run folder
        while model and data stay the same, else a new ``run-NNN`` folder in the workspace."""
        cfg, notes = self.limits.apply(form.to_config(values))
        check_paths(cfg, self.limits, ws.upload_dir)
        typed = None if self.limits.demo else form.explicit_out(values)
        run = ws.run
        if typed:
            out = Path(typed).expanduser()
        elif run is not None and run.config.stage_settings("load") == cfg.stage_settings("load"):
            out = run.out
        else:
            out = ws.next_run_dir()
        return cfg.replace(out=str(out)), notes

    def form_from_yaml(self, text: str, ws: Workspace | None) -> tuple[dict, list[str]]:
        """A settings file -> form values (demo caps applied), with notes."""
        cfg, notes = self.limits.apply(RunConfig.from_yaml(text).validate())
        check_paths(cfg, self.limits, ws.upload_dir if ws is not None else None)
        return form.to_values(cfg, out_auto=self.limits.demo), notes

    def form_of_run(self, ws: Workspace) -> dict | None:
        """The form values of the workspace's current run (None before the first job)."""
        run = ws.run
        if run is None:
            return None
        auto = self.limits.demo or Path(run.out).parent == ws.root
        return form.to_values(run.config, out_auto=auto)

    # -- files in and out ----------------------------------------------------------------------
    def receive(self, ws: Workspace, kind: str, file) -> Path:
        """Every uploaded file comes in here: copied into the workspace's uploads folder."""
        src = Path(file)
        ws.upload_dir.mkdir(parents=True, exist_ok=True)
        dest = ws.upload_dir / f"{kind}-{time.strftime('%H%M%S')}-{src.name}"
        shutil.copyfile(src, dest)
        return dest

    def upload(self, ws: Workspace, kind: str, file, columns: str | None = None) -> tuple[str, str]:
        """Store an uploaded data file (`receive`) and describe it: (stored path, markdown). The
        description (format, rows, skipped rows, tasks) or the loader's error is the markdown."""
        from p2d.data.loading import load_data

        src = Path(file)
        dest = self.receive(ws, kind, file)
        try:
            mapping = RunConfig(columns=columns).columns
            summ = load_data(str(dest), mapping=mapping).summary()
        except UserError as exc:
            return str(dest), f"✗ **{kind}** `{src.name}`: {exc}"
        tasks = ", ".join(f"{k} {v}" for k, v in list(summ["tasks"].items())[:6]) or "no task labels"
        skipped = (f" ({', '.join(f'{n} {r}' for r, n in summ['skipped_reasons'].items())})"
                   if summ["skipped"] else "")
        return str(dest), (f"**{kind}** `{src.name}`: format **{summ['format']}**, {summ['rows']} rows, "
                           f"{summ['skipped']} skipped{skipped}; tasks: {tasks}")

    def download(self, ws: Workspace, path) -> str | None:
        """A file of this workspace's runs to offer for download (None: nothing to offer yet)."""
        if path is None:
            return None
        p = Path(path)
        return str(p) if p.is_file() else None

    def adapter_zip(self, ws: Workspace) -> Path | None:
        """The trained heads as a zip in the workspace's downloads folder (rebuilt when the adapter is
        newer than the zip); None before training."""
        run = ws.run
        trained = run.train_result if run is not None else None
        if trained is None:
            return None
        adapter = Path(trained.adapter_dir)
        files = [p for p in adapter.rglob("*") if p.is_file()] if adapter.is_dir() else []
        if not files:
            return None
        zip_path = ws.download_dir / f"{run.out.name}-adapter.zip"
        newest = max(p.stat().st_mtime for p in files)
        if not zip_path.exists() or zip_path.stat().st_mtime < newest:
            ws.download_dir.mkdir(parents=True, exist_ok=True)
            tmp = shutil.make_archive(str(ws.download_dir / ".adapter-tmp"), "zip", root_dir=adapter.parent,
                                      base_dir=adapter.name)
            Path(tmp).replace(zip_path)
        return zip_path
