"""Job bodies: what the worker executes for each button (``make(...)`` returns ``body(job)``).

They drive `p2d.pipeline.Run` through its public API only: ``Run(...)``/``Run.open``, ``reconfigure``,
``reset_from``, ``run(stages)``, ``execute(stage, on_partial=True)``, ``require_loaded`` and the result
properties. The Run decides what to compute, reuse, re-cut or drop, and owns every file of its run
folder; the model comes through the worker's shared cache (``model_loader``). A stage that was
stopped ends ``partial`` in the Run and the job ``stopped``; the next press runs that stage again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from p2d.adapter import merge_and_save
from p2d.chat import compare_replies
from p2d.config import RunConfig
from p2d.controls import run_controls
from p2d.errors import UserError
from p2d.gguf_export import export_gguf as export_gguf_file
from p2d.gguf_export import gguf_name
from p2d.explore import check_head
from p2d.explore import inspect_head as inspect
from p2d.method.heads import HeadScores
from p2d.hub import push_run
from p2d.pipeline import CONFIG_FILE, LABELS, Run, upstream_closure

from .launcher import launch_training
from .worker import Job

#: what the Train button runs (the reference before training, so the AER chart is live)
TRAIN_STAGES = ["eval_before", "reference", "train", "eval_after"]


def session_run(studio, ws, cfg: RunConfig, job: Job) -> Run:
    """The workspace's Run for ``cfg`` (whose ``out`` is already decided, see `Studio.run_config`): the
    current Run reconfigured when model, data and folder are the same, else a Run in ``cfg.out`` (a
    new ``run-NNN`` folder, or a folder typed in the form, reopened if it holds a run)."""
    run = ws.run
    if run is not None and Path(cfg.out) == run.out and \
            run.config.stage_settings("load") == cfg.stage_settings("load"):
        run.reconfigure(cfg)
    else:
        out = Path(cfg.out)
        loader, limits = studio.worker.load_model, studio.limits.data_limits()
        if (out / CONFIG_FILE).is_file():
            run = Run.open(out, config=cfg, model_loader=loader, data_limits=limits)
        else:
            run = Run(cfg, model_loader=loader, data_limits=limits)
        with ws.lock:
            ws.claim_run_dir(out)
            ws.run = run
        studio.save(ws)
    job.info["run"] = run.out.name
    follow(job, run)
    studio.note_job(job)  # the job's run folder, on disk before the stages run
    return run


def follow(job: Job, run: Run, stages=None) -> None:
    """Bind the job's progress and stop flag to ``run``; with ``stages``, the job's phase names the
    stage being computed (found when the library's progress description changes)."""
    if stages is None:
        run.bind(job.progress, job.should_stop)
        return
    plan = [s for s in upstream_closure(stages) if not run.is_done(s)]
    last = {"desc": None}

    def progress(done: int, total: int, desc: str) -> None:
        if desc != last["desc"]:
            last["desc"] = desc
            current = next((s for s in plan if not run.is_done(s) and s not in run.stages_partial), None)
            if current is not None:
                job.phase = LABELS[current]
        job.progress(done, total, desc)

    job.phase = LABELS[plan[0]] if plan else ""
    job.info["plan"] = plan
    job.info["run"] = run.out.name
    run.bind(progress, job.should_stop)


def _settled(run: Run, stage: str) -> str:
    """How ``stage`` ended: done, partial (stopped part-way) or not run (stopped before it)."""
    return "done" if run.is_done(stage) else ("partial" if stage in run.stages_partial else "not run")


def load(studio, ws, cfg: RunConfig):
    def body(job: Job):
        run = session_run(studio, ws, cfg, job)
        follow(job, run, ["load"])
        run.run(["load"])
        run.require_loaded()  # a reopened or reconfigured run: the model and data in memory for the page
        return _settled(run, "load")
    return body


def stage(studio, ws, cfg: RunConfig, name: str):
    """Heads or Select: switch to the form's settings, then compute ``name`` (and whatever it needs)
    unless the Run already has it (a new share of heads or data only re-cuts the scores)."""
    def body(job: Job):
        run = session_run(studio, ws, cfg, job)
        follow(job, run, [name])
        run.run([name])
        if not job.should_stop():
            run.require_loaded()  # a reopened run with nothing left to compute: its data for the page
        return _settled(run, name)
    return body


def train(studio, ws, cfg: RunConfig, processes: int = 1):
    """Train: always a fresh training (and evaluation after it); heads, selection, the evaluation
    before and the AER reference are computed only when missing or out of date. With ``processes`` > 1
    the training itself runs as ``accelerate launch`` (`p2d.studio.launcher`); the rest in the app."""
    def body(job: Job):
        run = session_run(studio, ws, cfg, job)
        run.reset_from("train")
        if processes > 1:
            return _train_launched(studio, ws, run, job, processes)
        follow(job, run, TRAIN_STAGES)
        studio.note_job(job)  # with its plan: what Resume continues after a restart
        try:
            run.run(TRAIN_STAGES)
        finally:
            studio.adapter_zip(ws, make=True)  # the download, packed here rather than in a page request
        return _settled(run, "train")
    return body


def _train_launched(studio, ws, run: Run, job: Job, processes: int) -> str:
    before = ["select", "eval_before", "reference"]
    follow(job, run, before)
    run.run(before)
    if job.should_stop():
        return _settled(run, "reference")
    job.set_phase(f"training the heads in {processes} processes (accelerate launch)")
    job.info["processes"] = processes
    run.launch_processes = processes  # the progress bar plans with the global batch
    try:
        launch_training(run, processes, job)
    finally:
        run.launch_processes = 1
    run = studio.open_run(ws, run.out.name, in_job=True)  # what the processes wrote
    if not run.is_done("train"):
        return _settled(run, "train")
    studio.adapter_zip(ws, make=True)
    follow(job, run, ["eval_after"])
    run.run(["eval_after"])
    return _settled(run, "train")


def evaluate(studio, ws):
    """Evaluate now: the base model when its result is missing, and the trained heads - also those
    of a stopped training (the result is marked partial, as the training is)."""
    def body(job: Job):
        run = ws.run
        if run is None:
            raise UserError("nothing loaded yet: press Load on the Model & data tab first")
        follow(job, run, ["eval_before"])
        run.run(["eval_before"])
        if job.should_stop():
            return _settled(run, "eval_before")
        if run.eval_before is None and run.is_done("eval_before"):
            raise UserError("this run has no eval set: add an eval file, or an eval size above 0, on the Model & "
                            "data tab")
        if run.train_result is None:
            return "before only"
        if run.is_done("train"):
            follow(job, run, ["eval_after"])
            run.run(["eval_after"])
            return "after" if run.is_done("eval_after") else _settled(run, "eval_after")
        job.phase = LABELS["eval_after"] + " (of the stopped training)"
        follow(job, run)
        run.execute("eval_after", on_partial=True)
        return "after (stopped training)"
    return body


def _trained(ws):
    run = ws.run
    trained = run.train_result if run is not None else None
    if trained is None:
        raise UserError("no trained heads yet: train on the Train tab first")
    return run, trained


def merge(studio, ws, folder: str):
    def body(job: Job):
        run, trained = _trained(ws)
        job.set_phase("merging the trained heads into the model and saving it")
        lm = studio.worker.load_model(run.config)
        return str(merge_and_save(lm, trained.adapter_dir, Path(folder).expanduser()))
    return body


def export_peft(studio, ws):
    """The trained heads as a PEFT LoRA adapter, zipped in the workspace's downloads folder (made
    again only when the adapter is newer than the zip); the zip's path."""
    def body(job: Job):
        run, trained = _trained(ws)
        job.set_phase("exporting the adapter in PEFT format")
        return str(studio.peft_zip(ws, run, trained, make=True))
    return body


def export_gguf(studio, ws, outtype: str):
    """The merged model as GGUF (`p2d.gguf_export`) in the workspace's downloads folder; the file's path."""
    def body(job: Job):
        run, trained = _trained(ws)
        job.set_phase(f"writing the merged model as GGUF ({outtype})")
        lm = studio.worker.load_model(run.config)
        target = ws.download_dir / f"{run.out.name}-{gguf_name(outtype)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="p2d-gguf-", dir=ws.download_dir) as tmp:
            out = export_gguf_file(lm, trained.adapter_dir, Path(tmp) / "gguf", outtype, name=run.out.name)
            shutil.move(str(out / gguf_name(outtype)), target)
        return str(target)
    return body


def push(studio, ws, repo_id: str, private: bool, merged: bool, token_box: list | None = None):
    """Upload the run's adapter (PEFT format, optionally the merged model) and its model card. With
    ``token_box`` (a visitor's login): the token in it is taken out once and used for this push only, never
    the server's own."""
    def body(job: Job):
        token = token_box.pop() if token_box else None  # handed over once: nothing keeps it after this push
        if token_box is not None and not token:
            raise UserError("sign in with Hugging Face first: the push uses your own account")
        run, _ = _trained(ws)
        job.set_phase(f"pushing to the Hugging Face Hub ({repo_id})")
        lm = studio.worker.load_model(run.config)
        return push_run(run.out, repo_id, lm=lm, merged=merged, private=private, token=token)
    return body


def resume(studio, ws, name: str):
    """Reopen the run folder ``name`` of the workspace and continue what it did not finish: the
    stages of its last job that ended early (stopped, failed, cut off by a server restart) and any
    partial stage; training continues from its last checkpoint."""
    def body(job: Job):
        run = studio.open_run(ws, name, in_job=True)
        stages = studio.unfinished_stages(ws, run)
        if not stages:
            raise UserError(f"nothing to resume in {name}: every stage it started has finished")
        run.resume = True
        try:
            follow(job, run, stages)
            studio.note_job(job)
            run.run(stages)
        finally:
            run.resume = False
            studio.adapter_zip(ws, make=True)
        return _settled(run, stages[-1])
    return body


# -- explore and teach ---------------------------------------------------------------------------
def chat(studio, ws, run_name: str | None, prompt: str, sampling: dict, history: list | None = None):
    """The prompt answered by the run's base model and by base + its trained heads, each continuing its side
    of ``history`` (`p2d.chat.compare_replies`); the replies so far are in ``job.live`` ("base", "tuned")."""
    def body(job: Job):
        run = studio.explore_run(ws, run_name)
        adapter = run.train_result.adapter_dir if run.train_result is not None else None
        job.set_phase("answering with the base model" + (" and the trained heads" if adapter else ""))
        lm = studio.worker.load_model(run.config)
        studio.limits.check_prompt_tokens(lm.tokenizer, prompt)
        last = {"base": "", "tuned": None}
        for last in compare_replies(lm, adapter, prompt, history or (), **sampling):
            job.live.update(last)
            if job.should_stop():
                break
        return dict(last, run=run.out.name, adapter=bool(adapter))
    return body


def inspect_head(studio, ws, run_name: str | None, layer: int, head: int, row: int):
    """`p2d.explore.inspect_head` on the run's eval row ``row`` (the probe set when it has no eval set)."""
    def body(job: Job):
        run = studio.explore_run(ws, run_name)
        if run.heads is None:
            raise UserError("no head scores in this run yet: press Find heads on the Heads tab first")
        check_head(run.heads.n_layers, run.heads.n_q_heads, layer, head)
        job.set_phase(f"opening layer {layer}, head {head}")
        run.require_loaded()
        rows = run.data.eval.samples if run.data.eval is not None else run.data.probe.samples
        if not 0 <= int(row) < len(rows):
            raise UserError(f"Sample row must be between 0 and {len(rows) - 1}")
        out = inspect(run.lm, run.heads, layer, head, rows[int(row)], run.data.probe.samples,
                      max_length=run.config.max_length)
        return dict(out, run=run.out.name, row=int(row))
    return body


def controls(studio, ws):
    """`p2d.controls.run_controls` for the current run (its training and evaluation done first if missing)."""
    def body(job: Job):
        run = ws.run
        if run is None or run.train_result is None:
            raise UserError("no trained heads yet: train on the Train tab first, then run the controls")
        follow(job, run, ["eval_after"])
        run.run(["eval_after"])
        if not run.is_done("eval_after"):
            return _settled(run, "eval_after")
        job.set_phase("training the controls (random heads, random data, TF-IDF data, answer-shape data, LoRA)")
        run_controls(run, progress=job.progress, should_stop=job.should_stop)
        return "done"
    return body


def reuse_heads(studio, ws, source_run: str):
    """The head map of the session's run folder ``source_run`` becomes the current run's heads (selection and
    training are then redone with them: the transfer question)."""
    def body(job: Job):
        run = ws.run
        if run is None:
            raise UserError("no current run: load a model and data first")
        folder = studio.run_folder(ws, source_run)
        if Path(folder) == Path(run.out):
            raise UserError("that is the current run's own head map: pick another run")
        job.set_phase(f"using the heads of {folder.name}")
        run.use_heads(HeadScores.load(folder), source=folder.name)
        return "done"
    return body
