"""Tab 1 - Model & data: the model spec, the built-in pool or uploaded files, Load."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.config import RunConfig
from p2d.data.builtin import DEFAULT_TARGET, available_tasks

from ..fields import DATA_SOURCES, MODEL_SOURCES
from ..limits import Limits

DATA_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".gz"]


def build(limits: Limits) -> SimpleNamespace:
    d = RunConfig()
    c = SimpleNamespace()
    local = limits.allow_local_paths
    model_choices = [m for m in MODEL_SOURCES if local or m[1] != "local"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Model")
            c.model_source = gr.Radio(model_choices, value="embedded", label="Model source", elem_id="model-source")
            c.model_name = gr.Textbox("", label="Hub id or local path" if local else "Hub id", interactive=True, elem_id="model-name",
                                      placeholder="e.g. HuggingFaceTB/SmolLM2-360M-Instruct"
                                      + (", /path/to/model or model.gguf" if local else ""),
                                      info="ignored for the embedded default")
            with gr.Row():
                c.device = gr.Dropdown(["auto", "cpu", "cuda", "mps"], value=d.device, label="Device",
                                       allow_custom_value=True, info="auto: CUDA, then Apple MPS, then CPU")
                c.dtype = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value=d.dtype, label="Precision",
                                      info="auto: bf16 on CUDA, else fp32")
            c.quantize = gr.Dropdown(["none", "8bit", "4bit"], value="none", label="Quantise frozen MLPs",
                                     info="bitsandbytes; saves GPU memory on larger models, slower on CPU")
            c.trust_remote_code = gr.Checkbox(value=False, label="Trust remote code (custom model code from the hub)",
                                              visible=local)
        with gr.Column(scale=2):
            gr.Markdown("### Data")
            c.data_source = gr.Radio(list(DATA_SOURCES), value="builtin", label="Data source", elem_id="data-source")
            with gr.Group(visible=True) as c.builtin_group:
                tasks = list(available_tasks())
                with gr.Row():
                    c.target = gr.Dropdown(tasks, value=DEFAULT_TARGET if DEFAULT_TARGET in tasks else tasks[0],
                                           label="Target task", info="the task to specialise on; the rest of the pool "
                                           "is distractor tasks", elem_id="target")
                    c.seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0)
                with gr.Row():
                    c.pool_size = gr.Number(min(d.pool_size, limits.max_pool or d.pool_size), label="Pool size", elem_id="pool-size",
                                            precision=0, minimum=1, maximum=limits.max_pool)
                    c.probe_size = gr.Number(min(d.probe_size, limits.max_probe or d.probe_size), label="Probe size", elem_id="probe-size",
                                             precision=0, minimum=1, maximum=limits.max_probe,
                                             info="target examples used to find heads")
                    c.eval_size = gr.Number(min(d.eval_size, limits.max_eval or d.eval_size), label="Eval size", elem_id="eval-size",
                                            precision=0, minimum=0, maximum=limits.max_eval)
            with gr.Group(visible=False) as c.files_group:
                with gr.Row():
                    c.pool_file = gr.File(label="Pool file", file_types=DATA_TYPES, height=110, elem_id="pool-file")
                    c.probe_file = gr.File(label="Probe file (~100 target examples)", file_types=DATA_TYPES,
                                           height=110)
                    c.eval_file = gr.File(label="Eval file (optional)", file_types=DATA_TYPES, height=110)
                with gr.Row():
                    c.pool_path = gr.Textbox("", label="Pool path", interactive=local, placeholder="upload or type a path"
                                             if local else "upload a file")
                    c.probe_path = gr.Textbox("", label="Probe path", interactive=local)
                    c.eval_path = gr.Textbox("", label="Eval path", interactive=local)
                c.columns = gr.Textbox("", label="Column mapping (optional)",
                                       placeholder="prompt=question, answer=reply, task=category",
                                       info="keys: prompt, input, answer, system, task, messages, text; formats "
                                            "are detected otherwise (alpaca, prompt/response, question/answer, "
                                            "messages, ShareGPT, text)")
            c.max_length = gr.Number(min(d.max_length, limits.max_length or d.max_length), label="Max tokens per sample",
                                     precision=0, minimum=8, maximum=limits.max_length)
    with gr.Row():
        c.load_btn = gr.Button("Load model & data", variant="primary", elem_id="load-btn")
    c.status = gr.Markdown(elem_id="md-status")
    c.info = gr.Markdown(elem_id="model-info")
    c.data_table = gr.Dataframe(label="Loaded sets", interactive=False, wrap=True, elem_id="data-table",
                                column_widths=["7%", "20%", "9%", "7%", "8%", "16%", "33%"])
    c.mix_plot = gr.Plot(label="Task mix", elem_id="pool-mix")
    return c
