"""Tab 3 - Data: selection method and ratio; score histogram, task mix, paged preview, download."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.config import RunConfig
from p2d.selection import DEFAULT_SELECT_METHOD, SELECT_METHODS

from ..limits import Limits

METHOD_HELP = {
    "alignment": "alignment: cosine between a sample's head-gate gradient and the probe set's mean",
    "ablation": "ablation: answer loss with the selected heads gated off minus with them on",
    "activation": "activation: output norm of the selected heads on the answer tokens (one forward)",
    "random": "random: a seeded control",
}


def build(limits: Limits) -> SimpleNamespace:
    d = RunConfig()
    c = SimpleNamespace()
    gr.Markdown("Stage 2 scores every pool sample with the selected heads and keeps the best. "
                + " · ".join(METHOD_HELP[m] for m in SELECT_METHODS))
    with gr.Row(equal_height=True):
        c.select_method = gr.Dropdown(list(SELECT_METHODS), value=DEFAULT_SELECT_METHOD, label="Selection method",
                                      elem_id="select-method")
        c.data_ratio = gr.Slider(0.01, 1.0, value=d.data_ratio, step=0.01, label="Share of the pool to keep",
                                 info="0.1 = the top 10% of the pool")
        c.run_btn = gr.Button("Select data", variant="primary", elem_id="select-btn", scale=0, min_width=160)
    c.status = gr.Markdown(elem_id="data-status")
    c.info = gr.Markdown()
    with gr.Row(equal_height=False):
        c.hist = gr.Plot(label="Score histogram", elem_id="score-hist")
        c.mix = gr.Plot(label="Task mix", elem_id="task-mix")
    gr.Markdown("#### Selected samples")
    with gr.Row(equal_height=True):
        c.search = gr.Textbox(label="Search", placeholder="filter by prompt, answer or task", scale=3,
                              elem_id="preview-search")
        c.prev_btn = gr.Button("◀ Prev", scale=0, min_width=80)
        c.page = gr.Number(1, label="Page", precision=0, minimum=1, scale=0, min_width=90)
        c.next_btn = gr.Button("Next ▶", scale=0, min_width=80)
    c.page_label = gr.Markdown()
    c.preview = gr.Dataframe(headers=["rank", "score", "task", "prompt", "answer"], interactive=False, wrap=True,
                             column_widths=["6%", "9%", "12%", "45%", "28%"], max_height=520, elem_id="preview-table")
    c.download = gr.DownloadButton("Download selected set (JSONL)", value=None, interactive=False,
                                   elem_id="download-selected")
    return c
