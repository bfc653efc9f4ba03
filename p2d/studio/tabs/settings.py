"""Settings file & command (shown above the tabs): save/load all settings as the YAML file that
`python -m p2d run --config` takes, and the equivalent command line."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..limits import Limits


def build(limits: Limits) -> SimpleNamespace:
    c = SimpleNamespace()
    with gr.Accordion("Settings file & equivalent command", open=False, elem_id="settings-accordion"):
        gr.Markdown("All settings of every tab as one YAML file: the same file `python -m p2d run --config FILE` "
                    "takes. Edit it here and press **Apply**, or load a saved one.")
        with gr.Row():
            c.show_btn = gr.Button("Show YAML & command", elem_id="show-command")
            c.save_btn = gr.Button("Save settings (YAML)", elem_id="save-config")
            c.upload = gr.UploadButton("Load settings (YAML)", file_types=[".yaml", ".yml"], elem_id="load-config")
            c.apply_btn = gr.Button("Apply YAML below", elem_id="apply-config")
        c.status = gr.Markdown()
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c.yaml = gr.Code(language="yaml", label="config.yaml", lines=12, interactive=True, elem_id="config-yaml")
            with gr.Column(scale=2):
                c.command = gr.Code(language="shell", label="Equivalent command", lines=4, interactive=False,
                                    elem_id="command", wrap_lines=True)
                c.file = gr.File(label="Saved settings file", interactive=False, visible=False, elem_id="config-file")
                c.out = gr.Textbox("", label="Run folder (empty: a new folder per load under the studio's runs folder)",
                                   visible=not limits.demo, elem_id="run-folder")
    return c
