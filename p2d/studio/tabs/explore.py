"""Tab 6 - Explore: talk to the tuned model, open a head, compare head maps (``/chat``, ``/inspect_head``,
``/compare_heads``, ``/reuse_heads``).

Chat and "open a head" need the model, so they are jobs like the stages (one at a time; while training
runs they wait in the queue): chat streams both replies from ``job.live``. The conversation is kept per
session on the server (a ``gr.State``; API clients continue theirs on the next ``/chat`` call, and
``/chat_clear`` starts a new one); picking another run starts a new conversation. Comparing maps reads
two heads.json files only. Any of the session's run folders can be chosen; the current run is the default.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.chat import MAX_NEW_TOKENS, MAX_TURNS, check_sampling
from p2d.errors import UserError
from p2d.explore import compare_head_maps
from p2d.method.heads import HeadScores

from .. import charts, jobs, views
from ..lessons import LESSONS


def build(ctx) -> SimpleNamespace:
    c, st = SimpleNamespace(), ctx.studio
    max_tokens = min(MAX_NEW_TOKENS, ctx.limits.max_new_tokens or MAX_NEW_TOKENS)
    c.run_pick = gr.Dropdown(label="Run (default: the current one)", choices=[], allow_custom_value=True,
                             elem_id="explore-run")  # the server checks the name (this session's runs only)
    # -- chat and compare -------------------------------------------------------------------------
    gr.Markdown("### Chat and compare")
    with gr.Row(equal_height=True):
        c.prompt_pick = gr.Dropdown(label="Pick an eval prompt", choices=[], scale=2, allow_custom_value=True,
                                    elem_id="prompt-pick")
        c.max_new = gr.Slider(1, max_tokens, value=min(64, max_tokens), step=1, label="Max new tokens",
                              elem_id="chat-max-new")
        c.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                  elem_id="chat-temperature")
        c.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="chat-top-p")
        c.seed = gr.Number(0, precision=0, label="Seed", minimum=0, elem_id="chat-seed")
    with gr.Row():
        c.base = gr.Chatbot(label="Base model", height=340, elem_id="chat-base")
        c.tuned = gr.Chatbot(label="Base + trained heads", height=340, elem_id="chat-tuned")
    with gr.Row(equal_height=True):
        c.prompt = gr.Textbox(label="Message", lines=2, scale=4, placeholder="What is 27 + 15?", elem_id="chat-prompt")
        c.chat_btn = gr.Button("Send", variant="primary", scale=0, min_width=110, elem_id="chat-btn")
        c.clear_btn = gr.Button("Clear", scale=0, min_width=90, elem_id="chat-clear")
    c.chat_status = gr.Markdown(elem_id="chat-status")
    c.history = gr.State({"key": None, "turns": []})  # this session's conversation, kept on the server
    max_turns = 8 if ctx.limits.demo else MAX_TURNS  # the public demo keeps less per session
    gr.Markdown(LESSONS["chat"], elem_classes="p2d-lesson")
    # -- open a head ------------------------------------------------------------------------------
    gr.Markdown("### Open a head")
    c.grid_info = gr.Markdown(elem_id="head-grid-info")
    c.grid = gr.Dataframe(label="Head ranks (click a cell)", interactive=False, max_height=260, elem_id="head-grid")
    with gr.Row(equal_height=True):
        c.layer = gr.Number(0, precision=0, minimum=0, label="Layer", elem_id="head-layer")
        c.head = gr.Number(0, precision=0, minimum=0, label="Head", elem_id="head-head")
        c.row = gr.Number(0, precision=0, minimum=0, label="Sample row (eval set)", elem_id="head-row")
        c.head_btn = gr.Button("Open head", variant="primary", scale=0, min_width=140, elem_id="head-btn")
    c.head_status = gr.Markdown(elem_id="head-status")
    c.head_md = gr.Markdown(elem_id="head-md")
    c.pattern = gr.Plot(label="Attention pattern", elem_id="head-pattern")
    gr.Markdown(LESSONS["head"], elem_classes="p2d-lesson")
    # -- compare head maps ------------------------------------------------------------------------
    gr.Markdown("### Compare head maps")
    with gr.Row(equal_height=True):
        c.map_a = gr.Dropdown(label="Map a (a run's heads.json)", choices=[], allow_custom_value=True,
                              elem_id="map-a")
        c.map_b = gr.Dropdown(label="Map b", choices=[], allow_custom_value=True, elem_id="map-b")
        c.compare_btn = gr.Button("Compare", variant="primary", scale=0, min_width=120, elem_id="compare-btn")
        c.reuse_btn = gr.Button("Use map a's heads in the current run", scale=0, min_width=200, elem_id="reuse-btn")
    c.compare_status = gr.Markdown(elem_id="compare-status")
    c.compare_md = gr.Markdown(elem_id="compare-md")
    with gr.Row(equal_height=False):
        c.heat_a = gr.Plot(label="Map a", elem_id="map-a-plot")
        c.heat_b = gr.Plot(label="Map b", elem_id="map-b-plot")
    c.diff = gr.Plot(label="Rank difference", elem_id="map-diff")
    gr.Markdown(LESSONS["compare"], elem_classes="p2d-lesson")

    view = {"run_pick": c.run_pick, "prompt_pick": c.prompt_pick, "grid": c.grid, "grid_info": c.grid_info,
            "map_a": c.map_a, "map_b": c.map_b}
    ctx.register_view("explore", view)

    # -- events -----------------------------------------------------------------------------------
    c.prompt_pick.change(lambda text: text or gr.skip(), c.prompt_pick, c.prompt, api_visibility="private",
                         show_progress="hidden")

    def pick_head(evt: gr.SelectData):
        row, col = (evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, 0))
        if col == 0:  # the layer column
            return gr.skip(), gr.skip()
        return int(row), int(col) - 1

    c.grid.select(pick_head, None, [c.layer, c.head], api_visibility="private", show_progress="hidden")

    def messages(turns, side: str, live: tuple | None = None) -> list[dict]:
        """A side of the conversation as the Chatbot shows it (``live``: the turn being answered)."""
        out = []
        for turn in [*turns, *([dict(zip(("user", "base", "tuned"), live))] if live else [])]:
            out.append({"role": "user", "content": turn["user"]})
            answer = turn.get(side)
            out.append({"role": "assistant", "content": answer if answer is not None else "(no trained heads)"})
        return out

    def chat(request, run, prompt, max_new_tokens, temperature, top_p, seed, history):
        """The message answered by the base model and by base + the run's trained heads, each continuing its
        side of this session's conversation, streamed (greedy by default)."""
        sampling = {"max_new_tokens": int(max_new_tokens or 64), "temperature": float(temperature or 0.0),
                    "top_p": float(top_p if top_p is not None else 1.0), "seed": int(seed or 0)}
        prompt = str(prompt or "")
        check_sampling(prompt, sampling["max_new_tokens"], sampling["temperature"], sampling["top_p"],
                       sampling["seed"])
        ws = st.workspace(request)  # a session without runs has nothing to explore: submit refuses it
        key = f"{run or ''}|{ws.run.out.name if ws.run is not None else ''}"
        history = history if isinstance(history, dict) and history.get("key") == key else {"key": key, "turns": []}
        turns = list(history["turns"])[-max_turns:]
        job = st.submit(ws, "chat", jobs.chat(st, ws, run, prompt, sampling, turns), "Chat", request)
        yield {"status": views.job_line(st, job), "base": messages(turns, "base", (prompt, "", "")),
               "tuned": messages(turns, "tuned", (prompt, "", "")), "prompt": "", "history": history}
        shown = None
        while job.active:
            now = (prompt, job.live.get("base") or "", job.live.get("tuned") or "")
            if now != shown and job.status == "running":
                shown = now
                yield {"status": views.job_line(st, job), "base": messages(turns, "base", now),
                       "tuned": messages(turns, "tuned", now)}
            st.worker.wait(job, timeout=0.25)
        res = job.result if isinstance(job.result, dict) else dict(job.live)
        tuned = res.get("tuned")
        done = job.status == "done"
        if done:
            turns = [*turns, {"user": prompt, "base": res.get("base") or "", "tuned": tuned}][-max_turns:]
        live = None if done else (prompt, res.get("base") or "", tuned)
        yield {"status": views.job_line(st, job) if not done else
               ("✓ answered" if tuned is not None else "✓ answered (this run has no trained heads yet: base only)"),
               "base": messages(turns, "base", live), "tuned": messages(turns, "tuned", live),
               "history": {"key": key, "turns": turns}}

    ctx.bind(c.chat_btn.click, chat, inputs={"run": c.run_pick, "prompt": c.prompt, "max_new_tokens": c.max_new,
                                             "temperature": c.temperature, "top_p": c.top_p, "seed": c.seed,
                                             "history": c.history},
             outputs={"status": c.chat_status, "base": c.base, "tuned": c.tuned, "prompt": c.prompt,
                      "history": c.history}, status="status", api_name="chat", **ctx.job_event)

    def chat_clear(request):
        """Start a new conversation (this session's chat history is dropped)."""
        return {"status": "", "base": [], "tuned": [], "history": {"key": None, "turns": []}}

    ctx.bind(c.clear_btn.click, chat_clear, outputs={"status": c.chat_status, "base": c.base, "tuned": c.tuned,
                                                      "history": c.history}, status="status", api_name="chat_clear")

    def inspect_head(request, run, layer, head, row):
        """Open a head: its attention pattern on an eval row, its score and rank, and the probe answer loss
        change when it (and the whole selected set) is gated off."""
        ws = st.workspace(request)  # a session without runs has nothing to explore: submit refuses it
        job = st.submit(ws, "inspect", jobs.inspect_head(st, ws, run, int(layer or 0), int(head or 0),
                                                         int(row or 0)), "Open a head", request)
        for update in ctx.follow_job(job, ws, None):
            if not job.active and job.status == "done":
                update.update(info=views.head_md(job.result), pattern=charts.attention_heatmap(job.result["pattern"]),
                              result=job.result)
            yield update

    c.head_json = gr.JSON(visible=False)
    ctx.bind(c.head_btn.click, inspect_head, inputs={"run": c.run_pick, "layer": c.layer, "head": c.head,
                                                     "row": c.row},
             outputs={"status": c.head_status, "info": c.head_md, "pattern": c.pattern, "result": c.head_json},
             status="status", api_name="inspect_head", **ctx.job_event)

    def compare_heads(request, a, b):
        """Two head maps side by side: overlap of the selected sets (Jaccard), rank correlation (Spearman)
        and the rank-difference heatmap."""
        if not a or not b:
            raise UserError("pick two runs with head maps (map a and map b)")
        ws = st.workspace(request)
        maps = [HeadScores.load(st.run_folder(ws, name)) for name in (a, b)]
        out = compare_head_maps(*maps, name_a=str(a), name_b=str(b))
        return {"status": "", "info": views.compare_md(out), "heat_a": charts.heads_heatmap(maps[0].scores, maps[0].selected,
                                                                                      title=f"a: {a}"),
                "heat_b": charts.heads_heatmap(maps[1].scores, maps[1].selected, title=f"b: {b}"),
                "diff": charts.difference_heatmap(out["rank_difference"], str(a), str(b)), "result": out}

    c.compare_json = gr.JSON(visible=False)
    ctx.bind(c.compare_btn.click, compare_heads, inputs={"a": c.map_a, "b": c.map_b},
             outputs={"status": c.compare_status, "info": c.compare_md, "heat_a": c.heat_a, "heat_b": c.heat_b,
                      "diff": c.diff, "result": c.compare_json}, status="status", api_name="compare_heads")

    def reuse_heads(request, a):
        """Use map a's heads (another run's heads.json) in the current run: selection and training are then
        redone with them (a map found for one task, reused for another)."""
        if not a:
            raise UserError("pick the run whose heads to reuse (map a)")
        yield from ctx.run_job(request, "reuse", "Reuse heads", jobs.reuse_heads, "heads", source_run=str(a))

    ctx.bind(c.reuse_btn.click, reuse_heads, inputs={"a": c.map_a},
             outputs={"status": c.compare_status, **ctx.views["heads"], "job_end": ctx.job_end}, status="status",
             api_name="reuse_heads", **ctx.job_event)
    return c
