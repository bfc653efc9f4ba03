"""Settings file & command (above the tabs): every setting as the YAML file `python -m p2d run`
takes, and the equivalent command line (``/show_command``, ``/save_config``, ``/apply_config``)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from p2d.errors import UserError

from ..form import FIELD_NAMES


def build(ctx) -> SimpleNamespace:
    c, st = SimpleNamespace(), ctx.studio
    with gr.Accordion("Settings file & equivalent command", open=False, elem_id="settings-accordion"):
        gr.Markdown("All settings of every tab as one YAML file, and the command line that runs the same "
                    "configuration from a shell (the run folder included). Edit the YAML here and press **Apply**, "
                    "or load a saved file.")
        with gr.Row():
            c.show_btn = gr.Button("Show YAML & command", elem_id="show-command")
            c.save_btn = gr.Button("Save settings (YAML)", elem_id="save-config")
            # no file_types: every upload reaches the handler, which reads it, checks it and never keeps it
            c.upload = gr.UploadButton("Load settings (YAML)", elem_id="load-config")
            c.apply_btn = gr.Button("Apply YAML below", elem_id="apply-config")
        c.status = gr.Markdown(elem_id="settings-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c.yaml = gr.Code(language="yaml", label="config.yaml", lines=12, interactive=True, elem_id="config-yaml")
            with gr.Column(scale=2):
                c.command = gr.Code(language="shell", label="Equivalent command", lines=4, interactive=False,
                                    elem_id="command", wrap_lines=True)
                c.file = gr.File(label="Saved settings file", interactive=False, visible=False, elem_id="config-file")
                ctx.form["out"].render()

    def show_command(request, settings):
        """The form as the YAML settings file and as the equivalent command (the config a job runs)."""
        cfg, _ = st.run_config(settings, st.workspace(request))
        yaml_text, command = st.shown_config(cfg)
        return {"yaml": yaml_text, "command": command}

    ctx.bind(c.show_btn.click, show_command, settings=True, outputs={"yaml": c.yaml, "command": c.command},
             status="command", api_name="show_command")

    def save_config(request, settings):
        """Save the form as a YAML settings file (offered for download)."""
        ws = st.workspace(request)
        cfg, _ = st.run_config(settings, ws)
        yaml_text, command = st.shown_config(cfg)
        path = st.offer_text(ws, "p2d-config.yaml", yaml_text)  # staged for download; the workspace is untouched
        return {"file": gr.File(value=path, visible=True), "yaml": yaml_text, "command": command,
                "status": "Saved: the file holds every setting; the command shown runs the same configuration "
                          "from a shell."}

    ctx.bind(c.save_btn.click, save_config, settings=True,
             outputs={"file": c.file, "yaml": c.yaml, "command": c.command, "status": c.status},
             status="status", api_name="save_config")

    form_out = {name: ctx.form[name] for name in FIELD_NAMES}

    def apply_config(request, text):
        """Fill the form from YAML settings (the demo caps applied)."""
        values, notes = st.form_from_yaml(text or "", st.workspace(request))
        return {**values, "status": "✓ settings applied" + (f" ({'; '.join(notes)})" if notes else "")
                + ". Press Load (or any stage button) to use them."}

    ctx.bind(c.apply_btn.click, apply_config, inputs={"text": c.yaml}, outputs={**form_out, "status": c.status},
             status="status", api_name="apply_config")

    def load_config_file(request, file):
        """Fill the form from an uploaded settings file (read, checked, not stored)."""
        def read(path):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"could not read the settings file: {exc}") from None
            ctx.limits.check_text("settings file", text, ctx.limits.max_settings_chars)
            return text

        if not file:
            return {}
        _, text = st.receive(st.workspace(request), "settings", file, check=read, store=False,
                             client=st.client(request))
        return {**apply_config(request, text), "yaml": text}

    ctx.bind(c.upload.upload, load_config_file, inputs={"file": c.upload},
             outputs={**form_out, "status": c.status, "yaml": c.yaml}, status="status", api_visibility="private")
    return c
