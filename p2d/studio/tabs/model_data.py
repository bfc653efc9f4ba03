"""Tab 1 - Model & data: the model, the built-in pool, uploaded files or a dataset of the ``datasets`` library
(a hub id or a dataset folder, with its configs and splits listed by ``/dataset_options``; local mode only),
Load (``/load``, ``/upload_*``);
the runs of this session, to reopen or resume one (``/runs``, ``/open_run``, ``/resume_run``), and
``/attach`` (an API client's key to this session, to come back to it later)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from p2d.config import BUILTIN_POOLS, RunConfig
from p2d.errors import UserError

from .. import form, jobs, views
from ..context import describe_error

#: what the loader reads (shown to the visitor). Not passed as ``file_types``: Gradio would then refuse
#: other files in its preprocessing, before our handler, leaving its stored copy behind; the handler
#: validates every upload itself and deletes what it rejects.
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
            f["inference_precision"].render()
            f["trust_remote_code"].render()
        with gr.Column(scale=2):
            gr.Markdown("### Data")
            f["data_source"].render()
            builtin = f["data_source"].value in BUILTIN_POOLS
            with gr.Group(visible=f["data_source"].value == "hub") as c.hub_group:
                with gr.Row(equal_height=True):
                    c.ds_id = gr.Textbox(label="Dataset: hub id or dataset folder", scale=3, elem_id="ds-id",
                                         placeholder="e.g. openai/gsm8k")
                    c.ds_list = gr.Button("List configs and splits", scale=1, elem_id="ds-list")
                with gr.Row():
                    c.ds_config = gr.Dropdown([], label="Config", allow_custom_value=True, elem_id="ds-config")
                    c.ds_pool = gr.Dropdown([], label="Pool split", allow_custom_value=True, elem_id="ds-pool",
                                            info="a split, or a row range: train[100:]")
                    c.ds_probe = gr.Dropdown([], label="Probe split", allow_custom_value=True, elem_id="ds-probe",
                                             info="~100 target rows: train[:100]")
                    c.ds_eval = gr.Dropdown([], label="Eval split (optional)", allow_custom_value=True,
                                            elem_id="ds-eval", info="another split: test")
                c.ds_status = gr.Markdown(elem_id="ds-status")
                c.ds_options = gr.State(None)
            with gr.Group(visible=builtin) as c.builtin_group:
                f["target"].render()
                with gr.Row():
                    f["pool_size"].render()
                    f["probe_size"].render()
                    f["eval_size"].render()
                    f["other_eval_size"].render()
            with gr.Group(visible=not builtin) as c.files_group:
                with gr.Row():
                    c.pool_file = gr.File(label="Pool file", height=110, elem_id="pool-file")
                    c.probe_file = gr.File(label="Probe file (~100 target examples)", height=110, elem_id="probe-file")
                    c.eval_file = gr.File(label="Eval file (optional)", height=110, elem_id="eval-file")
                gr.Markdown(f"Files: {', '.join(DATA_TYPES)} (`.gz` of the text formats too)"
                            + (f"; up to {ctx.limits.max_file_bytes // (1024 * 1024)} MB each"
                               if ctx.limits.max_file_bytes else ""), elem_id="upload-note")
                with gr.Row():
                    f["pool_path"].render()
                    f["probe_path"].render()
                    f["eval_path"].render()
                f["columns"].render()
            with gr.Row():
                f["max_length"].render()
                f["seed"].render()
    with gr.Row():
        c.load_btn = gr.Button("Load model & data", variant="primary", elem_id="load-btn", scale=3)
        c.tour_btn = gr.Button("Quick tour: the whole pipeline in a few minutes", elem_id="tour-btn", scale=2)
    c.status = gr.Markdown(elem_id="md-status")
    c.info = gr.Markdown(elem_id="model-info")
    c.data_table = gr.Dataframe(label="Loaded sets", interactive=False, wrap=True, elem_id="data-table",
                                column_widths=["7%", "20%", "9%", "7%", "8%", "16%", "33%"])
    c.mix_plot = gr.Plot(label="Task mix", elem_id="pool-mix")
    with gr.Accordion("Runs of this session", open=False, elem_id="session-runs"):
        gr.Markdown("Every model/data setting of this session has its own run folder. **Open** shows a past run "
                    "in every tab (its charts, results and downloads; the model loads with the next stage); "
                    "**Resume** continues what it did not finish (a stopped or cut-off training from its last "
                    "checkpoint). They stay after a server restart.")
        with gr.Row(equal_height=True):
            c.run_pick = gr.Dropdown([], label="Run folder", elem_id="run-pick", scale=2, allow_custom_value=True)
            c.runs_btn = gr.Button("Refresh list", scale=0, min_width=120, elem_id="runs-refresh")
            c.open_btn = gr.Button("Open", scale=0, min_width=100, elem_id="run-open")
            c.resume_btn = gr.Button("Resume", scale=0, min_width=100, elem_id="run-resume")
        c.runs_status = gr.Markdown(elem_id="runs-status")
        c.runs_table = gr.Dataframe(headers=views.RUN_COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    view = {"info": c.info, "data_table": c.data_table, "mix_plot": c.mix_plot}
    ctx.register_view("model", view)
    ctx.register_view("runs", {"runs": c.runs_table, "run_pick": c.run_pick})
    st = ctx.studio

    def load(request, settings):
        """Load the model and the data (a new model/data setting starts a new run folder)."""
        yield from ctx.run_job(request, "load", "Load", jobs.load, "model", settings, create=True)

    ctx.bind(c.load_btn.click, load, settings=True, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="load", **ctx.job_event)

    def quick_tour(request):
        """The quick-tour preset (`p2d.config.PRESETS`: the embedded model, the built-in pool, target addition, small
        sizes) put in the form and run end to end as one training job: load, heads, selection, evaluation,
        reference, training, evaluation (follow it with /train_status or /wait_job, or on the Train tab)."""
        ws = st.workspace(request, create=True)
        values = form.to_values(RunConfig.preset("quick-tour"), out_auto=True)
        cfg, notes = st.run_config(values, ws)
        job = st.submit(ws, "train", jobs.train(st, ws, cfg), "Quick tour", request)
        return {**{f"form.{k}": v for k, v in values.items()}, "timer": gr.Timer(active=True),
                "banner": views.banner(st, ws),
                "status": views.job_line(st, job, notes) + "  \nFollow it on the **Train** tab; then walk the "
                          "tabs: heads, the data they picked, the loss, the results, and Explore."}

    ctx.bind(c.tour_btn.click, quick_tour, outputs={**{f"form.{k}": comp for k, comp in f.items()},
                                                     "timer": ctx.timer, "banner": ctx.banner, "status": c.status},
             status="status", api_name="quick_tour")

    def runs(request):
        """The run folders of this session (name, model, data, stages done and partial, last job)."""
        return {"status": "", **views.runs(st, st.workspace(request))}

    ctx.bind(c.runs_btn.click, runs, outputs={"status": c.runs_status, "runs": c.runs_table, "run_pick": c.run_pick},
             status="status", api_name="runs")

    def open_run(request, name):
        """Show the run folder ``name`` of this session in every tab (read back from its files)."""
        ws = st.workspace(request)
        run = st.open_run(ws, name)
        return {"status": f"✓ opened `{run.out.name}`", "job_end": {"opened": run.out.name, "at": time.time()},
                **views.runs(st, ws)}

    ctx.bind(c.open_btn.click, open_run, inputs={"name": c.run_pick},
             outputs={"status": c.runs_status, "runs": c.runs_table, "run_pick": c.run_pick, "job_end": ctx.job_end},
             status="status", api_name="open_run")

    def resume_run(request, name):
        """Resume the run folder ``name``: continue the stages it did not finish."""
        last = {}
        for update in ctx.run_job(request, "resume", "Resume", jobs.resume, None, name=str(name or "")):
            update.pop("job_end", None)
            last = update
            yield update
        ws = st.workspace(request)
        yield {**last, "job_end": {"job": ws.job_id, "at": time.time()}, **views.runs(st, ws)}

    ctx.bind(c.resume_btn.click, resume_run, inputs={"name": c.run_pick},
             outputs={"status": c.runs_status, "runs": c.runs_table, "run_pick": c.run_pick, "job_end": ctx.job_end},
             status="status", api_name="resume_run", **ctx.job_event)

    def attach(key: str = "", request: gr.Request = None) -> dict:
        """This API session's workspace key, to come back to it from another client or after a server
        restart (pass it here): given when this call makes the session's workspace (call it first) or
        when the key is sent; with a key, this session continues that workspace."""
        try:
            st.gate.check("attach", {"key": key})
            ws, told = st.attach_key(request, (key or "").strip() or None if isinstance(key, str) else None,
                                     page=False)
            if told is None:
                raise UserError("this session's workspace was made before /attach was called: its key is given only "
                                "to the call that makes it, or to a client that sends it (call /attach first in a "
                                "new session)")
            return st.gate.outgoing({"key": told, "run": ws.out.name if ws.out is not None else None,
                                     "runs": [r["run"] for r in st.runs_table(ws)]})
        except UserError as exc:
            raise gr.Error(st.gate.scrub(describe_error(exc, st.client(request), "attach")),
                           print_exception=False) from None  # logged, within bounds, by describe_error

    gr.api(attach, api_name="attach", concurrency_limit=ctx.limits.concurrency)

    for kind in ("pool", "probe", "eval"):
        def upload(request, file, columns, kind=kind):
            """Check an uploaded data file, store it in the session's workspace and describe what was
            read (a file the loader cannot read, or over the caps, is not stored)."""
            if not file:
                return {}
            path, message = st.upload(st.workspace(request, create=True), kind, file, columns, st.client(request))
            if path is None:
                return {"status": message}
            return {"path": path, "data_source": "files", "status": message}
        upload.__name__ = f"upload_{kind}"
        component = getattr(c, f"{kind}_file")
        ctx.bind(component.upload, upload, inputs={"file": component, "columns": f["columns"]},
                 outputs={"path": f[f"{kind}_path"], "data_source": f["data_source"], "status": c.status},
                 status="status", api_name=f"upload_{kind}")

    def show_source(source, target):
        """The inputs of the chosen data source; a built-in pool's own targets."""
        tasks = form.target_choices(source)
        return (gr.Group(visible=source in BUILTIN_POOLS), gr.Group(visible=source == "files"),
                gr.Group(visible=source == "hub"), gr.Dropdown(choices=tasks, value=target if target in tasks else tasks[0]))

    f["data_source"].change(show_source, [f["data_source"], f["target"]],
                            [c.builtin_group, c.files_group, c.hub_group, f["target"]], api_visibility="private",
                            show_progress="hidden")

    def dataset_options(request, dataset):
        """The configs of a dataset (hub id or local dataset folder) and the splits of each, through the
        ``datasets`` library (a hub id needs the network); the pickers get sensible defaults (pool: the train
        split from row 100, probe: its first 100 rows, eval: a test split)."""
        from p2d.data.read_datasets import dataset_options as options_of

        dataset = str(dataset or "").strip()
        if not dataset:
            raise UserError("type a dataset id (org/name) or a dataset folder")
        opts = options_of(dataset)
        config = opts["configs"][0] if opts["configs"] else None
        update = _split_pickers(opts, config)
        return {"status": f"✓ {len(opts['configs'])} config(s): {', '.join(opts['configs'])}", "options": opts,
                "config": gr.Dropdown(choices=opts["configs"], value=config), **update}

    def _split_pickers(opts: dict, config: str | None) -> dict:
        splits = list((opts or {}).get("splits", {}).get(config, []))
        train = "train" if "train" in splits else (splits[0] if splits else "train")
        held = next((s for s in ("test", "validation", "valid", "dev") if s in splits), "")
        choices = [*splits, f"{train}[100:]", f"{train}[:100]"]
        return {"pool": gr.Dropdown(choices=choices, value=f"{train}[100:]"),
                "probe": gr.Dropdown(choices=choices, value=f"{train}[:100]"),
                "eval": gr.Dropdown(choices=["", *splits], value=held)}

    ctx.bind(c.ds_list.click, dataset_options, inputs={"dataset": c.ds_id},
             outputs={"status": c.ds_status, "options": c.ds_options, "config": c.ds_config, "pool": c.ds_pool,
                      "probe": c.ds_probe, "eval": c.ds_eval}, status="status", api_name="dataset_options")
    c.ds_config.input(lambda opts, config: tuple(_split_pickers(opts, config).values()), [c.ds_options, c.ds_config],
                      [c.ds_pool, c.ds_probe, c.ds_eval], api_visibility="private", show_progress="hidden")

    def specs(dataset, config, pool, probe, ev):
        """The pool/probe/eval paths as dataset specs (ID:CONFIG@SPLIT), in the one syntax the loader reads."""
        from p2d.data.read_datasets import DatasetSpec, parse_dataset_spec

        dataset = str(dataset or "").strip()

        def one(split):
            split = str(split or "").strip()
            if not dataset or not split:
                return ""
            spec = parse_dataset_spec(f"{dataset}@{split}")
            if spec is None:
                return f"{dataset}{':' + config if config else ''}@{split}"  # the loader explains what is wrong
            return str(DatasetSpec(spec.path, str(config or "").strip() or None, spec.split, spec.start, spec.stop))
        return one(pool), one(probe), one(ev)

    for picker in (c.ds_id, c.ds_config, c.ds_pool, c.ds_probe, c.ds_eval):
        picker.change(specs, [c.ds_id, c.ds_config, c.ds_pool, c.ds_probe, c.ds_eval],
                      [f["pool_path"], f["probe_path"], f["eval_path"]], api_visibility="private",
                      show_progress="hidden")
    f["model_source"].change(lambda source: gr.Textbox(interactive=source != "embedded"), [f["model_source"]],
                             [f["model_name"]], api_visibility="private", show_progress="hidden")
    return c
