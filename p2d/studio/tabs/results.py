"""Tab 5 - Results & export: accuracy/loss before vs after, generations, downloads, merged model."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..limits import Limits


def build(limits: Limits) -> SimpleNamespace:
    c = SimpleNamespace()
    with gr.Row():
        c.refresh_btn = gr.Button("Refresh results", elem_id="results-refresh")
        c.eval_btn = gr.Button("Evaluate now", elem_id="results-eval")
    c.status = gr.Markdown(elem_id="results-status")
    c.summary = gr.Markdown(elem_id="results-summary")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            c.table = gr.Dataframe(label="Eval set: before vs after training", interactive=False, elem_id="eval-table")
        with gr.Column(scale=3):
            c.chart = gr.Plot(label="Accuracy", elem_id="eval-chart")
    c.examples = gr.Dataframe(label="Generations before vs after (first eval rows)", interactive=False, wrap=True,
                              column_widths=["34%", "14%", "26%", "26%"], elem_id="examples-table")
    with gr.Row():
        c.adapter_dl = gr.DownloadButton("Download head adapter (zip)", value=None, interactive=False,
                                         elem_id="download-adapter")
        c.metrics_dl = gr.DownloadButton("Download metrics.json", value=None, interactive=False,
                                         elem_id="download-metrics")
    with gr.Accordion("Save a merged model (base + trained heads) to a folder", open=False, visible=not limits.demo):
        with gr.Row(equal_height=True):
            c.merge_dir = gr.Textbox(label="Folder (must not exist or be empty)", placeholder="merged/my-model",
                                     scale=3)
            c.merge_btn = gr.Button("Save merged model", scale=1)
        c.merge_status = gr.Markdown()
    return c
