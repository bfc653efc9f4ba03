"""Tab 4 - Train: steps/epochs, learning rate, batch size, projections; start/stop, live charts."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.adapter import PROJECTIONS
from p2d.config import RunConfig

from ..limits import Limits


def build(limits: Limits) -> SimpleNamespace:
    d = RunConfig()
    c = SimpleNamespace()
    gr.Markdown("Stage 3 trains only the selected heads (their q/k/v/o slices); everything else stays frozen. "
                "**Start** runs any stage not done yet, evaluates before and after, and times a few full "
                "fine-tuning steps as the AER reference." + (f" Demo limit: {limits.max_steps} steps."
                                                             if limits.max_steps else ""))
    with gr.Row():
        c.steps = gr.Number(min(d.steps or 0, limits.max_steps or 10**9), label="Steps (0 = from epochs)",
                            precision=0, minimum=0, maximum=limits.max_steps, elem_id="steps")
        c.epochs = gr.Number(d.epochs, label="Epochs (when steps is 0)", minimum=0)
        c.lr = gr.Number(d.lr, label="Learning rate", minimum=0)
        c.batch_size = gr.Number(d.batch_size, label="Batch size", elem_id="batch-size", precision=0, minimum=1, maximum=limits.max_batch)
        c.projections = gr.CheckboxGroup(list(PROJECTIONS), value=list(d.projections), label="Projections to train")
    with gr.Accordion("Evaluation and cost reference", open=False):
        with gr.Row():
            c.eval_limit = gr.Number(0, label="Evaluate on at most (0 = whole eval set)", precision=0, minimum=0)
            c.max_new_tokens = gr.Number(0, label="Max new tokens (0 = from gold answers)", precision=0, minimum=0)
            c.full_ft = gr.Radio([("estimate (time a few steps)", "estimate"), ("measure (run it all; slow)", "measure")],
                                 value="estimate", label="Full fine-tuning reference for AER",
                                 interactive=not limits.demo)
    with gr.Row():
        c.start_btn = gr.Button("Start training", variant="primary", elem_id="train-btn")
        c.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    c.status = gr.Markdown(elem_id="train-status")
    c.progress = gr.HTML(elem_id="train-progress")
    with gr.Row(equal_height=False):
        c.loss = gr.Plot(label="Loss", elem_id="loss-chart")
        c.aer = gr.Plot(label="AER", elem_id="aer-chart")
    c.timer = gr.Timer(1.0, active=False)
    return c
