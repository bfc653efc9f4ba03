"""Issue 10, the app side: the training options of the form reach the run, the loss chart shows the
validation loss, and the Results tab pushes to the Hugging Face Hub (shown only with a token and
outside the public demo).

The push goes through the real `p2d.hub.push_run` (PEFT export, model card, merged model) with
``huggingface_hub.HfApi`` replaced by a recorder at the network boundary (no network here): the test
sees what would be uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from p2d.config import RunConfig
from studio_helpers import close, form_kw as _kw, serve, wait_job as _wait

TRAINING_OPTIONS = dict(scheduler="linear", gradient_checkpointing=True, val_ratio=0.25, val_every=2,
                        report_to="tensorboard", grad_accum=2, warmup_ratio=0.2, weight_decay=0.05, max_grad_norm=0.5,
                        steps=6, lr=0.002, projections=["q", "v"], checkpoint_every=3)


_serve, _close = serve, close


def _visible(app, elem_id: str) -> bool:
    comp = next(c for c in app.config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    return comp["props"].get("visible", True) is not False


@pytest.fixture()
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


@pytest.mark.slow
def test_training_options_reach_the_run_and_the_chart(tmp_path, tiny_llama_dir, no_token):
    from gradio_client import Client

    served = _serve(tmp_path / "runs")
    try:
        c = Client(served.url, verbose=False)
        c.predict("", api_name="/attach")  # what the page load does: this session's workspace
        kw = _kw(tiny_llama_dir, **TRAINING_OPTIONS)
        yaml_text, command = c.predict(**kw, api_name="/show_command")
        shown = RunConfig.from_yaml(yaml_text)
        c.predict(**kw, api_name="/train")
        summary = _wait(c)
        assert summary["status"] == "done", summary
        run_dir = Path(summary["run_dir"])
        ran = RunConfig.load(run_dir / "config.yaml")
        assert ran == shown  # the YAML shown is the config the job ran with, every field
        for name, value in TRAINING_OPTIONS.items():
            assert getattr(ran, name) == value, name
        from p2d.cli import COMMAND_GROUPS, _group_fields, build_parser, config_from_args
        import shlex

        args = build_parser().parse_args(shlex.split(command)[3:])
        assert config_from_args(args, _group_fields(COMMAND_GROUPS["run"])) == ran  # and so is the command
        # what the training itself used (recorded by the trainer in the adapter)
        trained = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["training"]["config"]
        for name in ("scheduler", "gradient_checkpointing", "val_ratio", "val_every", "grad_accum", "warmup_ratio",
                     "weight_decay", "max_grad_norm", "lr"):
            assert trained[name] == TRAINING_OPTIONS[name], (name, trained[name])
        assert list(trained["projections"]) == ["q", "v"]
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        val_steps = [r["step"] for r in log if "val_loss" in r]
        assert val_steps == [2, 4, 6], log
        assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # report_to reached the run
        polled = c.predict({}, api_name="/train_status")
        loss = json.loads(polled[3]["plot"])
        traces = {t["name"]: t for t in loss["data"]}
        assert list(traces["validation"]["x"]) == [2, 4, 6]
        assert traces["validation"]["y"] == pytest.approx([r["val_loss"] for r in log if "val_loss" in r])
    finally:
        _close(served)


class RecordingHfApi:
    """``huggingface_hub.HfApi`` at the network boundary: records what would be uploaded."""

    calls: list = []
    fail: str | None = None

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **_):
        RecordingHfApi.calls.append(("create_repo", repo_id, private, exist_ok, self.token))

    def upload_folder(self, folder_path, repo_id, commit_message="", **_):
        if RecordingHfApi.fail:
            raise RuntimeError(RecordingHfApi.fail)
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text()
        RecordingHfApi.calls.append(("upload_folder", repo_id, files, card, commit_message))
        return SimpleNamespace(oid="0123abc")


@pytest.mark.slow
def test_push_to_the_hub_from_the_results_tab(tmp_path, tiny_llama_dir, monkeypatch, no_token):
    import huggingface_hub
    from gradio_client import Client

    # without a token: the box is hidden and /push says what is missing
    served = _serve(tmp_path / "no-token")
    try:
        assert not _visible(served.app, "push-box")
        c = Client(served.url, verbose=False)
        assert "pushing needs a Hugging Face token" in c.predict("me/p2d", True, False, api_name="/push")
    finally:
        _close(served)
    # the public demo never pushes (the token would be the host's), whatever the request says
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    served = _serve(tmp_path / "demo", demo=True)
    try:
        assert not _visible(served.app, "push-box")
        c = Client(served.url, verbose=False)
        assert "disabled in the public demo" in c.predict("me/p2d", True, False, api_name="/push")
    finally:
        _close(served)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    served = _serve(tmp_path / "runs")
    try:
        assert _visible(served.app, "push-box")
        c = Client(served.url, verbose=False)
        assert "nothing to work on yet" in c.predict("me/p2d", True, False, api_name="/push")
        c.predict("", api_name="/attach")
        assert "no trained heads yet" in c.predict("me/p2d", True, False, api_name="/push")
        c.predict(**_kw(tiny_llama_dir), api_name="/train")
        assert _wait(c)["status"] == "done"
        assert "owner/name" in c.predict("not a repo id", True, False, api_name="/push")
        status = c.predict("me/p2d-heads", True, True, api_name="/push")
        assert "pushed to [me/p2d-heads](https://huggingface.co/me/p2d-heads)" in status, status
        (_, repo, private, exist_ok, token), (_, repo2, files, card, message) = RecordingHfApi.calls
        assert (repo, private, exist_ok, token, repo2) == ("me/p2d-heads", True, True, "hf_test_token", "me/p2d-heads")
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "merged/config.json"} <= set(files)
        assert "P2D" in card and "run-001" in message
        # a hub error is one line in the box
        RecordingHfApi.fail = "403 Forbidden: you don't have the rights\nmore detail"
        status = c.predict("me/p2d-heads", False, False, api_name="/push")
        assert "could not push to me/p2d-heads: 403 Forbidden" in status and "more detail" not in status, status
    finally:
        RecordingHfApi.fail = None
        _close(served)
