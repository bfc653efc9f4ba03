"""Tab 5 - Results & export: accuracy/loss before vs after, generations, downloads, merged model
(``/results``, ``/evaluate``, ``/merge``)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.errors import UserError

from .. import jobs, views


def build(ctx) -> SimpleNamespace:
    c, st = SimpleNamespace(), ctx.studio
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
    with gr.Accordion("Save a merged model (base + trained heads) to a folder", open=False, visible=not ctx.limits.demo):
        with gr.Row(equal_height=True):
            c.merge_dir = gr.Textbox(label="Folder (must not exist or be empty)", placeholder="merged/my-model",
                                     scale=3, elem_id="merge-dir")
            c.merge_btn = gr.Button("Save merged model", scale=1, elem_id="merge-btn")
        c.merge_status = gr.Markdown(elem_id="merge-status")
    view = {"summary": c.summary, "table": c.table, "chart": c.chart, "examples": c.examples,
            "adapter_dl": c.adapter_dl, "metrics_dl": c.metrics_dl}
    ctx.register_view("results", view)

    def results(request):
        """The results of this session's run."""
        return {"status": "", **views.results(st, st.workspace(request))}

    ctx.bind(c.refresh_btn.click, results, outputs={"status": c.status, **view}, status="status",
             api_name="results", concurrency_limit=None)

    def evaluate(request):
        """Evaluate the base model (if not done) and the trained heads, also those of a stopped training."""
        yield from ctx.run_job(request, "evaluate", "Evaluation", jobs.evaluate, "results")

    ctx.bind(c.eval_btn.click, evaluate, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="evaluate", concurrency_limit=None, show_progress="hidden")

    def merge(request, folder):
        """Save base model + trained heads as one model (save_pretrained) into ``folder``."""
        if ctx.limits.demo:
            raise UserError("saving a merged model to a folder is disabled in the public demo: download the head "
                            "adapter instead, or duplicate the Space")
        if not (folder or "").strip():
            raise UserError("type the folder to save the merged model to")
        for update in ctx.run_job(request, "merge", "Merged-model export", jobs.merge, None, folder=folder.strip()):
            job = st.current_job(st.workspace(request))
            if not job.active and job.status == "done":
                update["status"] = f"✓ merged model saved to `{job.result}`"
            yield update

    ctx.bind(c.merge_btn.click, merge, inputs={"folder": c.merge_dir}, outputs={"status": c.merge_status},
             status="status", api_name="merge", concurrency_limit=None, show_progress="hidden")
    return c
