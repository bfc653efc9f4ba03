"""Tab 1 - Model & data: the model, the built-in pool or uploaded files, Load (``/load``, ``/upload_*``)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import jobs

DATA_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".gz"]


def build(ctx) -> SimpleNamespace:
    f, c = ctx.form, SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Model")
            f["model_source"].render()
            f["model_name"].render()
            with gr.Row():
                f["device"].render()
                f["dtype"].render()
            f["quantize"].render()
            f["trust_remote_code"].render()
        with gr.Column(scale=2):
            gr.Markdown("### Data")
            f["data_source"].render()
            builtin = f["data_source"].value == "builtin"
            with gr.Group(visible=builtin) as c.builtin_group:
                f["target"].render()
                with gr.Row():
                    f["pool_size"].render()
                    f["probe_size"].render()
                    f["eval_size"].render()
            with gr.Group(visible=not builtin) as c.files_group:
                with gr.Row():
                    c.pool_file = gr.File(label="Pool file", file_types=DATA_TYPES, height=110, elem_id="pool-file")
                    c.probe_file = gr.File(label="Probe file (~100 target examples)", file_types=DATA_TYPES,
                                           height=110, elem_id="probe-file")
                    c.eval_file = gr.File(label="Eval file (optional)", file_types=DATA_TYPES, height=110,
                                          elem_id="eval-file")
                with gr.Row():
                    f["pool_path"].render()
                    f["probe_path"].render()
                    f["eval_path"].render()
                f["columns"].render()
            with gr.Row():
                f["max_length"].render()
                f["seed"].render()
    c.load_btn = gr.Button("Load model & data", variant="primary", elem_id="load-btn")
    c.status = gr.Markdown(elem_id="md-status")
    c.info = gr.Markdown(elem_id="model-info")
    c.data_table = gr.Dataframe(label="Loaded sets", interactive=False, wrap=True, elem_id="data-table",
                                column_widths=["7%", "20%", "9%", "7%", "8%", "16%", "33%"])
    c.mix_plot = gr.Plot(label="Task mix", elem_id="pool-mix")
    view = {"info": c.info, "data_table": c.data_table, "mix_plot": c.mix_plot}
    ctx.register_view("model", view)

    def load(request, settings):
        """Load the model and the data (a new model/data setting starts a new run folder)."""
        yield from ctx.run_job(request, "load", "Load", jobs.load, "model", settings)

    ctx.bind(c.load_btn.click, load, settings=True, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="load", concurrency_limit=None, show_progress="hidden")

    for kind in ("pool", "probe", "eval"):
        def upload(request, file, columns, kind=kind):
            """Store an uploaded data file in the session's workspace and describe what was read."""
            if not file:
                return {}
            path, message = ctx.studio.upload(ctx.studio.workspace(request), kind, file, columns)
            return {"path": path, "data_source": "files", "status": message}
        upload.__name__ = f"upload_{kind}"
        component = getattr(c, f"{kind}_file")
        ctx.bind(component.upload, upload, inputs={"file": component, "columns": f["columns"]},
                 outputs={"path": f[f"{kind}_path"], "data_source": f["data_source"], "status": c.status},
                 status="status", api_name=f"upload_{kind}")

    f["data_source"].change(lambda source: (gr.Group(visible=source != "files"), gr.Group(visible=source == "files")),
                            [f["data_source"]], [c.builtin_group, c.files_group], api_visibility="private",
                            show_progress="hidden")
    f["model_source"].change(lambda source: gr.Textbox(interactive=source != "embedded"), [f["model_source"]],
                             [f["model_name"]], api_visibility="private", show_progress="hidden")
    return c
