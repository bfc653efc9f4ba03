"""Tab 3 - Data: selection method and share; score histogram, task mix, paged preview, download
(``/select``, ``/preview``)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.method.selection import SELECT_METHOD_HELP, SELECT_METHODS

from .. import jobs, views
from ..lessons import LESSONS


def build(ctx) -> SimpleNamespace:
    f, c = ctx.form, SimpleNamespace()
    gr.Markdown("Stage 2 scores every pool sample with the selected heads and keeps the top share. "
                + " · ".join(SELECT_METHOD_HELP[m] for m in SELECT_METHODS))
    with gr.Row(equal_height=True):
        f["select_method"].render()
        f["data_ratio"].render()
        f["hidden_layer"].render()
        c.run_btn = gr.Button("Select data", variant="primary", elem_id="select-btn", scale=0, min_width=160)
    c.status = gr.Markdown(elem_id="data-status")
    c.info = gr.Markdown(elem_id="data-info")
    with gr.Row(equal_height=False):
        c.hist = gr.Plot(label="Score histogram", elem_id="score-hist")
        c.mix = gr.Plot(label="Task mix", elem_id="task-mix")
    gr.Markdown(LESSONS["data"], elem_classes="p2d-lesson")
    gr.Markdown("#### Selected samples")
    with gr.Row(equal_height=True):
        c.search = gr.Textbox(label="Search", placeholder="filter by prompt, answer or task", scale=3,
                              elem_id="preview-search")
        c.prev_btn = gr.Button("◀ Prev", scale=0, min_width=80)
        c.page = gr.Number(1, label="Page", precision=0, minimum=1, scale=0, min_width=90, elem_id="preview-page")
        c.next_btn = gr.Button("Next ▶", scale=0, min_width=80)
    c.page_label = gr.Markdown()
    c.preview = gr.Dataframe(headers=views.PREVIEW_COLUMNS, interactive=False, wrap=True,
                             column_widths=["6%", "9%", "12%", "45%", "28%"], max_height=520, elem_id="preview-table")
    c.download = gr.DownloadButton("Download selected set (JSONL)", value=None, interactive=False,
                                   elem_id="download-selected")
    view = {"info": c.info, "hist": c.hist, "mix": c.mix, "preview": c.preview, "page_label": c.page_label,
            "page": c.page, "download": c.download}
    ctx.register_view("data", view)

    def select(request, settings):
        """Select data (heads and loading first if needed); a new share only re-cuts the existing scores."""
        yield from ctx.run_job(request, "select", "Data selection", jobs.stage, "data", settings, create=True,
                               name="select")

    ctx.bind(c.run_btn.click, select, settings=True, outputs={"status": c.status, **view, "job_end": ctx.job_end},
             status="status", api_name="select", **ctx.job_event)

    page_out = {"preview": c.preview, "page_label": c.page_label, "page": c.page}

    def paging(step: int):
        def show(request, search, page):
            """One page of the selected samples whose prompt, answer or task contains ``search``."""
            page = 1 if step is None else int(page or 1) + step
            return views.preview(ctx.studio, ctx.studio.workspace(request), search, page)
        show.__name__ = "preview"
        return show

    inputs = {"search": c.search, "page": c.page}
    ctx.bind(c.page.submit, paging(0), inputs=inputs, outputs=page_out, status="page_label", api_name="preview")
    ctx.bind(c.search.submit, paging(None), inputs=inputs, outputs=page_out, status="page_label",
             api_visibility="private")
    ctx.bind(c.search.input, paging(None), inputs=inputs, outputs=page_out, status="page_label",
             api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    ctx.bind(c.prev_btn.click, paging(-1), inputs=inputs, outputs=page_out, status="page_label",
             api_visibility="private")
    ctx.bind(c.next_btn.click, paging(+1), inputs=inputs, outputs=page_out, status="page_label",
             api_visibility="private")
    return c
