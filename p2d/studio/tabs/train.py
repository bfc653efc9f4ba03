"""Tab 4 - Train: training, evaluation and cost settings; start/stop, live progress, loss and AER charts
(``/train``, ``/train_status``, ``/stop``, ``/wait_job``).

Start returns at once; the page then polls once a second (``/train_status``) and sends only what
changed since its last poll: the loss chart only when new log lines arrived (the log is read
incrementally), the AER chart when a stage ended and every few seconds while training. Redrawing a
chart is what costs the browser most (measured with bench/studio_load.py).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from p2d.errors import UserError

from .. import jobs, views
from ..context import describe_error
from ..lessons import LESSONS

AER_EVERY = 5.0  # seconds between AER chart redraws during training (a redraw costs the browser more than a step)


def build(ctx) -> SimpleNamespace:
    f, c, st = ctx.form, SimpleNamespace(), ctx.studio
    gr.Markdown("Stage 3 trains only the selected heads (their q/k/v/o slices); everything else stays frozen. "
                "**Start training** runs any earlier stage not done yet, evaluates the base model, times full "
                "fine-tuning of the whole pool (the AER reference), trains, and evaluates the trained heads."
                + (f" Public demo: at most {ctx.limits.max_steps} steps." if ctx.limits.max_steps else ""))
    with gr.Row():
        for name in ("epochs", "steps", "lr", "batch_size"):
            f[name].render()
    f["projections"].render()
    with gr.Accordion("More training settings", open=False, elem_id="train-more"):
        with gr.Row():
            for name in ("grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm"):
                f[name].render()
        with gr.Row():
            f["adapter"].render()
            f["scheduler"].render()
            f["max_steps"].render()
            f["checkpoint_every"].render()
            f["gradient_checkpointing"].render()
        with gr.Row():
            f["val_ratio"].render()
            f["val_every"].render()
            f["report_to"].render()
            c.processes = gr.Number(1, precision=0, minimum=1, label="Training processes (accelerate launch)",
                                    info="above 1: the training runs as accelerate launch with this many processes "
                                         "(data parallel; batch size is per process)", visible=not ctx.limits.demo,
                                    elem_id="train-processes")
    with gr.Accordion("Evaluation and the cost reference (AER)", open=False, elem_id="train-cost"):
        with gr.Row():
            f["eval_limit"].render()
            f["max_new_tokens"].render()
        with gr.Row():
            f["reference_epochs"].render()
            f["full_ft"].render()
    with gr.Row():
        c.start_btn = gr.Button("Start training", variant="primary", elem_id="train-btn")
        c.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    c.status = gr.Markdown(elem_id="train-status")
    c.progress = gr.HTML(elem_id="train-progress")
    with gr.Row(equal_height=False):
        c.loss = gr.Plot(label="Loss", elem_id="loss-chart")
        c.aer = gr.Plot(label="AER", elem_id="aer-chart")
    gr.Markdown(LESSONS["train"], elem_classes="p2d-lesson")
    view = {"status": c.status, "progress": c.progress, "loss": c.loss, "aer": c.aer}
    ctx.register_view("train", view)

    def train(request, settings, processes):
        """Start training (returns at once; follow it with /train_status or /wait_job). ``processes`` > 1
        (not in the public demo) runs the training as ``accelerate launch`` with that many processes."""
        n = int(processes or 1)  # checked by the gate (p2d.studio.gate)
        ws = st.workspace(request, create=True)
        cfg, notes = st.run_config(settings, ws)
        job = st.submit(ws, "train", jobs.train(st, ws, cfg, processes=n),
                        "Training" + (f" ({n} processes)" if n > 1 else ""), request)
        return {"status": views.job_line(st, job, notes), "timer": gr.Timer(active=True),
                "progress": views.train_progress(st, ws, job, []), "banner": views.banner(st, ws)}

    ctx.bind(c.start_btn.click, train, settings=True, inputs={"processes": c.processes},
             outputs={"status": c.status, "timer": ctx.timer, "progress": c.progress, "banner": ctx.banner},
             status="status", api_name="train")

    def train_status(request, poll):
        """What changed since the last poll: banner, status, progress bar, loss and AER charts."""
        ws = st.workspace(request)
        job = st.current_job(ws)
        job_id = job.id if job is not None else None
        poll = dict(poll or {})
        sent = dict(poll.get("sent") or {}) if poll.get("job") == job_id else {}
        out: dict = {}

        def offer(name, key, make=None):
            """Send ``name`` only when its key (the value itself, or what it is made from) changed."""
            if sent.get(name) != key:
                sent[name] = key
                out[name] = make() if make is not None else key

        records = ws.log()
        run = ws.run
        active = job is not None and job.active
        offer("banner", views.banner(st, ws))
        offer("status", views.job_line(st, job, clock=False))  # the progress bar has the clock
        offer("progress", views.train_progress(st, ws, job, records))
        offer("loss", [len(records), views.planned_steps(run)], lambda: views.loss_figure(ws, records))
        # the AER chart: when a stage ended or started, and at most every AER_EVERY seconds as steps arrive
        stage_key = [job.status if job else None, job.phase if job else None,
                     run is not None and run.full is not None, run is not None and run.train_result is not None]
        if sent.get("aer") != stage_key or (sent.get("aer_steps") != len(records)
                                            and time.time() - sent.get("aer_at", 0) >= AER_EVERY):
            sent.update(aer=stage_key, aer_steps=len(records), aer_at=time.time())
            out["aer"] = views.aer_figure(st, ws, job, records)
        offer("timer", active, lambda: gr.Timer(active=active))
        if job is not None and not active and poll.get("ended") != job_id:
            poll["ended"] = job_id
            out["job_end"] = {"job": job_id, "rendered": "train"}
            if job.status == "failed":
                gr.Warning(st.gate.scrub(job.error or "failed"))
        out["poll"] = {**poll, "job": job_id, "sent": sent}
        return out

    ctx.bind(ctx.timer.tick, train_status, inputs={"poll": ctx.poll_state},
             outputs={"banner": ctx.banner, "status": c.status, "progress": c.progress, "loss": c.loss, "aer": c.aer,
                      "timer": ctx.timer, "poll": ctx.poll_state, "job_end": ctx.job_end},
             api_name="train_status", show_progress="hidden", concurrency_limit=None)

    def stop(request):
        """Stop this session's job (a queued one is cancelled; training keeps the heads trained so far)."""
        ws = st.workspace(request)
        job = st.current_job(ws)
        if st.worker.stop(job):
            msg = (f"■ Stop requested: {job.label} ends after the current step"
                   + (" (the heads trained so far are kept)" if job.kind == "train" else ""))
        else:
            msg = "Nothing is running in this session."
        return {"status": msg, "banner": views.banner(st, ws)}

    ctx.bind(c.stop_btn.click, stop, outputs={"status": c.status, "banner": ctx.banner}, status="status",
             api_name="stop", concurrency_limit=None)

    def wait_job(timeout: float = 600.0, request: gr.Request = None) -> dict:
        """Block until this session's job has ended, or ``timeout`` seconds (the server grants at most
        its own cap: 600 s locally, 30 s in the public demo; call again to keep waiting), or about a
        second while every slot for waiting calls is taken; the job's summary. In the public demo a
        session, and a client address, has only a few calls waiting at once (the gate's caps); more are
        refused at once."""
        try:
            st.gate.check("wait_job", {"timeout": timeout})
            granted = ctx.limits.wait_timeout(timeout)
            ws = st.workspace(request)
            job = st.current_job(ws)
            if job is not None and (job.active or not job.settled.is_set()):
                with st.gate.waiting(ws, st.client(request)):
                    st.worker.wait(job, timeout=granted, until=st.gate.crowded)
            return st.gate.outgoing({**views.job_summary(st, ws), "waited_at_most_s": granted})
        except UserError as exc:
            raise gr.Error(st.gate.scrub(describe_error(exc, st.client(request), "wait_job")),
                           print_exception=False) from None  # logged, within bounds, by describe_error

    gr.api(wait_job, api_name="wait_job", concurrency_limit=ctx.limits.wait_concurrency, concurrency_id="wait")
    return c
