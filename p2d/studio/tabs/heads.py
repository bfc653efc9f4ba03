"""Tab 2 - Heads: scoring method and share; heatmap of head scores, heads per layer, the list (``/heads``)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.method.heads import HEAD_METHOD_HELP, HEAD_METHODS

from .. import jobs
from ..lessons import LESSONS


def build(ctx) -> SimpleNamespace:
    f, c = ctx.form, SimpleNamespace()
    gr.Markdown("Stage 1 finds the attention heads that are most specific to the target task. "
                + " · ".join(HEAD_METHOD_HELP[m] for m in HEAD_METHODS))
    with gr.Row(equal_height=True):
        f["head_method"].render()
        f["head_ratio"].render()
        f["positions"].render()
        f["min_head_layer"].render()
        f["max_head_layer"].render()
        f["heads_precision"].render()
        c.run_btn = gr.Button("Find heads", variant="primary", elem_id="heads-btn", scale=0, min_width=160)
    c.status = gr.Markdown(elem_id="heads-status")
    c.info = gr.Markdown(elem_id="heads-info")
    c.heatmap = gr.Plot(label="Head scores", elem_id="heads-heatmap")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c.per_layer = gr.Plot(label="Selected heads per layer", elem_id="heads-per-layer")
        with gr.Column(scale=2):
            c.table = gr.Dataframe(label="Selected heads (best first)", interactive=False, max_height=300,
                                   elem_id="heads-table")
    gr.Markdown(LESSONS["heads"], elem_classes="p2d-lesson")
    view = {"info": c.info, "heatmap": c.heatmap, "per_layer": c.per_layer, "table": c.table}
    ctx.register_view("heads", view)

    def find_heads(request, settings):
        """Score the heads (loading first if needed); a new share only re-cuts the existing scores."""
        yield from ctx.run_job(request, "heads", "Head scoring", jobs.stage, "heads", settings, create=True,
                               name="heads")

    ctx.bind(c.run_btn.click, find_heads, settings=True, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="heads", **ctx.job_event)
    return c
