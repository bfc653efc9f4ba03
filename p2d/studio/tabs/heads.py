"""Tab 2 - Heads: scoring method and ratio; heatmap of head scores, heads per layer, the list."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.config import RunConfig
from p2d.heads import DEFAULT_HEAD_METHOD, HEAD_METHODS

from ..limits import Limits

METHOD_HELP = {
    "gradient": "gradient: |dL/dgate| of a gate on each head, probe set contrasted with the pool (no weight update)",
    "shift": "shift: a short proxy fine-tune of all attention weights on the probe set; how far each head moved",
    "random": "random: a seeded control (falsification test)",
}


def build(limits: Limits) -> SimpleNamespace:
    d = RunConfig()
    c = SimpleNamespace()
    gr.Markdown("Stage 1 finds the attention heads that are most specific to the target task. "
                + " · ".join(METHOD_HELP[m] for m in HEAD_METHODS))
    with gr.Row(equal_height=True):
        c.head_method = gr.Dropdown(list(HEAD_METHODS), value=DEFAULT_HEAD_METHOD, label="Scoring method",
                                    elem_id="head-method")
        c.head_ratio = gr.Slider(0.01, 1.0, value=d.head_ratio, step=0.01, label="Share of heads to select",
                                 info="0.1 = the top 10% of all query heads")
        c.run_btn = gr.Button("Find heads", variant="primary", elem_id="heads-btn", scale=0, min_width=160)
    c.status = gr.Markdown(elem_id="heads-status")
    c.info = gr.Markdown()
    c.heatmap = gr.Plot(label="Head scores", elem_id="heads-heatmap")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c.per_layer = gr.Plot(label="Selected heads per layer", elem_id="heads-per-layer")
        with gr.Column(scale=2):
            c.table = gr.Dataframe(label="Selected heads (best first)", interactive=False, max_height=300,
                                   elem_id="heads-table")
    return c
