"""Tab 5 - Results & export: accuracy/loss before vs after, generations, downloads (head adapter zip,
PEFT-format adapter zip, metrics.json), merged model, a push to the Hugging Face Hub (``/results``,
``/evaluate``, ``/merge``, ``/export_peft``, ``/push``).

The push box is shown only where a Hugging Face token is available (``huggingface_hub.get_token()``)
and not in the public demo (the token is the host's); ``/push`` and ``/merge`` are refused in the demo
by the gate (`p2d.studio.gate`) whatever the page shows. On a Space whose README enables Hugging Face
OAuth (``hf_oauth: true``: the platform sets ``OAUTH_CLIENT_ID``), a second box has Gradio's login button,
and ``/push_login`` pushes the adapter and its card with the visitor's own token (``gr.OAuthToken``, this
request's only: handed to the push job once, never stored, logged or shown); it works in the public demo
too. Without OAuth that box and endpoint do not exist. Outside the demo ``/export_gguf`` writes the merged
model as GGUF for download (`p2d.gguf_export`). Merge and push are jobs like the others (one at a time,
stoppable before they start)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr

from p2d.errors import UserError

from .. import jobs, views
from ..lessons import LESSONS


def hub_token() -> str | None:
    """The Hugging Face token of the server (env HF_TOKEN or a saved login), if any."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file is no token
        return None


def hub_login_enabled() -> bool:
    """Gradio's Hugging Face login works here: a Space (SPACE_ID) whose README enables OAuth (OAUTH_CLIENT_ID)."""
    return bool(os.environ.get("SPACE_ID")) and bool(os.environ.get("OAUTH_CLIENT_ID"))


def check_repo_id(repo_id) -> str:
    repo_id = str(repo_id or "").strip()
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError("Repository id: type it as owner/name")
    return repo_id


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
    gr.Markdown(LESSONS["results"], elem_classes="p2d-lesson")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c.forgetting = gr.Plot(label="Other tasks", elem_id="forgetting-chart")
            c.forgetting_md = gr.Markdown(elem_id="forgetting-md")
            c.forgetting_btn = gr.Button("Refresh per-task accuracy", size="sm", elem_id="forgetting-btn")
            gr.Markdown(LESSONS["forgetting"], elem_classes="p2d-lesson")
        with gr.Column(scale=3):
            c.controls_chart = gr.Plot(label="Controls", elem_id="controls-chart")
            c.controls_md = gr.Markdown(elem_id="controls-md")
            with gr.Row():
                c.controls_btn = gr.Button("Run the controls", elem_id="controls-btn")
            c.controls_status = gr.Markdown(elem_id="controls-status")
            gr.Markdown(LESSONS["controls"], elem_classes="p2d-lesson")
    c.controls_table = gr.Dataframe(label="P2D vs its controls", interactive=False, elem_id="controls-table")
    with gr.Row():
        c.adapter_dl = gr.DownloadButton("Download head adapter (zip)", value=None, interactive=False,
                                         elem_id="download-adapter")
        c.metrics_dl = gr.DownloadButton("Download metrics.json", value=None, interactive=False,
                                         elem_id="download-metrics")
    with gr.Row():
        c.peft_btn = gr.Button("Export adapter in PEFT format", elem_id="export-peft")
        c.peft_dl = gr.DownloadButton("Download PEFT adapter (zip)", value=None, interactive=False,
                                      elem_id="download-peft")
    c.peft_status = gr.Markdown(elem_id="peft-status")
    if not ctx.limits.demo:
        from p2d.gguf_export import DEFAULT_TYPE, GGUF_TYPES

        with gr.Row(equal_height=True):
            c.gguf_type = gr.Dropdown(list(GGUF_TYPES), value=DEFAULT_TYPE, label="GGUF type", scale=1,
                                      elem_id="gguf-type", info="norms stay f32; for Q4_K_M etc. run llama.cpp's "
                                      "llama-quantize on the f16 file")
            c.gguf_btn = gr.Button("Export merged model as GGUF (llama.cpp, Ollama, LM Studio)", scale=2,
                                   elem_id="export-gguf")
            c.gguf_dl = gr.DownloadButton("Download GGUF", value=None, interactive=False, scale=1,
                                          elem_id="download-gguf")
        c.gguf_status = gr.Markdown(elem_id="gguf-status")
    with gr.Accordion("Save a merged model (base + trained heads) to a folder", open=False, visible=not ctx.limits.demo):
        with gr.Row(equal_height=True):
            c.merge_dir = gr.Textbox(label="Folder (must not exist or be empty)", placeholder="merged/my-model",
                                     scale=3, elem_id="merge-dir")
            c.merge_btn = gr.Button("Save merged model", scale=1, elem_id="merge-btn")
        c.merge_status = gr.Markdown(elem_id="merge-status")
    pushable = not ctx.limits.demo and hub_token() is not None
    with gr.Accordion("Push to the Hugging Face Hub", open=False, visible=pushable, elem_id="push-box"):
        gr.Markdown("Uploads the adapter in PEFT format with a model card (what was trained, on what, and what "
                    "it measured), and optionally the merged model in `merged/`, with this server's token.")
        with gr.Row(equal_height=True):
            c.repo_id = gr.Textbox(label="Repository id", placeholder="your-name/p2d-heads", scale=3,
                                   elem_id="push-repo")
            c.private = gr.Checkbox(True, label="Private", scale=0, min_width=100, elem_id="push-private")
            c.with_merged = gr.Checkbox(False, label="Include the merged model", scale=1, elem_id="push-merged")
            c.push_btn = gr.Button("Push", variant="primary", scale=0, min_width=100, elem_id="push-btn")
        c.push_status = gr.Markdown(elem_id="push-status")
    login = hub_login_enabled()
    if login:
        with gr.Accordion("Push to your Hugging Face account", open=False, elem_id="login-push-box"):
            gr.Markdown("Sign in with Hugging Face, then push this run's adapter (PEFT format) and its model card to a "
                        "repository of your own. Your login is used for this push only: it is not stored or logged.")
            c.login_btn = gr.LoginButton(elem_id="hf-login")
            with gr.Row(equal_height=True):
                c.login_repo = gr.Textbox(label="Repository id (yours)", placeholder="your-name/p2d-heads", scale=3,
                                          elem_id="login-repo")
                c.login_private = gr.Checkbox(True, label="Private", scale=0, min_width=100, elem_id="login-private")
                c.login_push_btn = gr.Button("Push with my account", variant="primary", scale=0, min_width=180,
                                             elem_id="login-push-btn")
            c.login_status = gr.Markdown(elem_id="login-push-status")
    base_view = {"summary": c.summary, "table": c.table, "chart": c.chart, "examples": c.examples,
                 "adapter_dl": c.adapter_dl, "metrics_dl": c.metrics_dl, "peft_dl": c.peft_dl}
    extra_view = {"forgetting": c.forgetting, "forgetting_md": c.forgetting_md, "controls_chart": c.controls_chart,
                  "controls_md": c.controls_md, "controls_table": c.controls_table}
    view = {**base_view, **extra_view}
    ctx.register_view("results", view)

    def results(request):
        """The results of this session's run (``/forgetting`` and ``/controls`` have the rest of the tab)."""
        return {"status": "", **views.results(st, st.workspace(request))}

    ctx.bind(c.refresh_btn.click, results, outputs={"status": c.status, **base_view}, status="status",
             api_name="results")

    def extras(request):
        ws = st.workspace(request)
        return {**views.forgetting(st, ws), **views.controls(st, ws)}

    ctx.bind(c.refresh_btn.click, extras, outputs=extra_view, api_visibility="private", show_progress="hidden")

    def evaluate(request):
        """Evaluate the base model (if not done) and the trained heads, also those of a stopped training."""
        yield from ctx.run_job(request, "evaluate", "Evaluation", jobs.evaluate, "results")

    ctx.bind(c.eval_btn.click, evaluate, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="evaluate", **ctx.job_event)

    def forgetting(request):
        """Accuracy per task before vs after training: the eval set's tasks and the pool's other tasks."""
        from p2d.explore import forgetting as rows_of

        ws = st.workspace(request)
        run = ws.run
        out = views.forgetting(st, ws)
        out["rows"] = rows_of(run.eval_before, run.eval_after) if run is not None else []
        return out

    c.rows = gr.JSON(visible=False)
    ctx.bind(c.forgetting_btn.click, forgetting, outputs={"forgetting": c.forgetting, "forgetting_md": c.forgetting_md,
                                                          "rows": c.rows}, api_name="forgetting")

    def controls(request):
        """Train random heads on P2D's data, P2D's heads on random data and LoRA on P2D's data at the same
        budget, and show them next to P2D (accuracy, trainable parameters, AER)."""
        yield from ctx.run_job(request, "controls", "Controls", jobs.controls, "results")

    ctx.bind(c.controls_btn.click, controls, outputs={"status": c.controls_status, **view, "job_end": ctx.job_end},
             status="status", api_name="controls", **ctx.job_event)

    def export_peft(request):
        """Export the trained heads as a PEFT LoRA adapter (zip) and offer it for download."""
        for update in ctx.run_job(request, "export", "PEFT export", jobs.export_peft, None):
            ws = st.workspace(request)
            job = st.current_job(ws)
            if not job.active and job.status == "done":
                update["peft_dl"] = st.download(ws, job.result)
                update["status"] = ("✓ PEFT adapter ready: `PeftModel.from_pretrained(base, folder)` loads the "
                                    "unzipped folder")
            yield update

    ctx.bind(c.peft_btn.click, export_peft, outputs={"status": c.peft_status, "peft_dl": c.peft_dl},
             status="status", api_name="export_peft", **ctx.job_event)

    def push(request, repo_id, private, merged):
        """Push the adapter (PEFT format), its model card and optionally the merged model to the Hub (refused
        in the public demo by the gate, `p2d.studio.gate.REFUSED_IN_DEMO`)."""
        repo_id = check_repo_id(repo_id)
        if hub_token() is None:
            raise UserError("pushing needs a Hugging Face token on the server: huggingface-cli login, or set HF_TOKEN")
        for update in ctx.run_job(request, "push", "Push to the Hub", jobs.push, None, repo_id=repo_id,
                                  private=bool(private), merged=bool(merged)):
            job = st.current_job(st.workspace(request))
            if not job.active and job.status == "done":
                update["status"] = f"✓ pushed to [{job.result['repo']}]({job.result['url']})"
            yield update

    ctx.bind(c.push_btn.click, push, inputs={"repo_id": c.repo_id, "private": c.private, "merged": c.with_merged},
             outputs={"status": c.push_status}, status="status", api_name="push", **ctx.job_event)

    if login:
        def push_login(request, repo_id, private, token=None):
            """Push the adapter (PEFT format) and its model card to a repository of the signed-in visitor, with
            their own Hugging Face token (this request's; not stored)."""
            if not token:
                raise UserError("sign in with Hugging Face first (the button above): the push uses your own account")
            repo_id = check_repo_id(repo_id)
            box = [token]
            try:
                for update in ctx.run_job(request, "push", "Push to your Hub account", jobs.push, None,
                                          repo_id=repo_id, private=bool(private), merged=False, token_box=box):
                    job = st.current_job(st.workspace(request))
                    if not job.active and job.status == "done":
                        update["status"] = f"✓ pushed to [{job.result['repo']}]({job.result['url']})"
                    yield update
            finally:
                box.clear()  # a job that never started leaves nothing behind either

        ctx.bind(c.login_push_btn.click, push_login, inputs={"repo_id": c.login_repo, "private": c.login_private},
                 outputs={"status": c.login_status}, status="status", api_name="push_login", oauth=True,
                 **ctx.job_event)

    if not ctx.limits.demo:
        def export_gguf(request, gguf_type):
            """The merged model (base + trained heads) as one GGUF file for download (Llama-family models)."""
            from p2d.gguf_export import GGUF_TYPES

            if gguf_type not in GGUF_TYPES:
                raise UserError(f"GGUF type: one of {', '.join(GGUF_TYPES)}")
            for update in ctx.run_job(request, "export", "GGUF export", jobs.export_gguf, None, outtype=gguf_type):
                ws = st.workspace(request)
                job = st.current_job(ws)
                if not job.active and job.status == "done":
                    update["gguf_dl"] = st.download(ws, job.result)
                    update["status"] = f"✓ GGUF ready ({gguf_type}): `{os.path.basename(job.result)}`"
                yield update

        ctx.bind(c.gguf_btn.click, export_gguf, inputs={"gguf_type": c.gguf_type},
                 outputs={"status": c.gguf_status, "gguf_dl": c.gguf_dl}, status="status", api_name="export_gguf",
                 **ctx.job_event)

    def merge(request, folder):
        """Save base model + trained heads as one model (save_pretrained) into ``folder`` (refused in the public
        demo by the gate)."""
        if not (folder or "").strip():
            raise UserError("type the folder to save the merged model to")
        for update in ctx.run_job(request, "merge", "Merged-model export", jobs.merge, None, folder=folder.strip()):
            job = st.current_job(st.workspace(request))
            if not job.active and job.status == "done":
                update["status"] = f"✓ merged model saved to `{job.result}`"
            yield update

    ctx.bind(c.merge_btn.click, merge, inputs={"folder": c.merge_dir}, outputs={"status": c.merge_status},
             status="status", api_name="merge", **ctx.job_event)
    return c
