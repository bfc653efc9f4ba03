"""Issue 9, findings 4 and 8: jobs never change the model all sessions share, and Stop interrupts an
evaluation (which is then shown as partial).

The app is served for real on the tiny Llama of conftest.py; the fingerprint covers every weight
(bytes), the requires_grad flags, train/eval mode and the hooks on every module, taken from the very
model object the worker's cache hands to every session.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from studio_helpers import close, form_kw as _kw, serve, wait_job as _wait


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = serve(tmp_path_factory.mktemp("integrity-runs"))
    yield served
    close(served)


def fingerprint(model) -> dict:
    """Weights (SHA-256 of every tensor's bytes, by name), requires_grad flags, mode, hook counts."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return {"weights": h.hexdigest(), "grad_flags": tuple(p.requires_grad for p in model.parameters()),
            "training": tuple(m.training for m in model.modules()), "hooks": hooks}


def _wait_for_steps(c, served, n: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        ws = served.studio.registry.for_session(c.session_hash)
        if ws is not None and len(ws.log()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"training did not reach {n} steps")


@pytest.mark.slow
def test_shared_model_is_unchanged_by_every_job(served, tiny_llama_dir, tmp_path):
    from gradio_client import Client

    from p2d.models import load_model

    c = Client(served.url, verbose=False)
    kw = _kw(tiny_llama_dir)
    assert "Load done" in c.predict(**kw, api_name="/load")[0]
    worker = served.studio.worker
    (key, lm), = worker._models.items()
    base = fingerprint(lm.model)
    assert base["weights"] == fingerprint(load_model(tiny_llama_dir, device="cpu").model)["weights"]  # as on disk

    def train_and_wait(**extra):
        c.predict(**kw, **extra, api_name="/train")
        return _wait(c)

    def stop_mid_way():
        c.predict(**{**kw, "steps": 100_000}, api_name="/train")
        _wait_for_steps(c, served, 3)
        c.predict(api_name="/stop")
        return _wait(c)

    jobs = [
        ("heads, gradient", lambda: c.predict(**kw, head_method="gradient", api_name="/heads")[0], "done"),
        ("heads, shift (a proxy fine-tune of all attention weights)",
         lambda: c.predict(**kw, head_method="shift", api_name="/heads")[0], "done"),
        ("select, alignment", lambda: c.predict(**kw, head_method="shift", select_method="alignment",
                                                api_name="/select")[0], "done"),
        ("select, ablation", lambda: c.predict(**kw, head_method="shift", select_method="ablation",
                                               api_name="/select")[0], "done"),
        ("train with the full fine-tuning reference (measured) and evaluation",
         lambda: train_and_wait(head_method="shift", select_method="ablation", full_ft="measure",
                                reference_epochs=1.0)["status"], "done"),
        ("evaluate", lambda: c.predict(api_name="/evaluate")[0], "Evaluation done"),
        ("merge", lambda: c.predict(str(tmp_path / "merged"), api_name="/merge"), "merged model saved"),
        ("PEFT export", lambda: c.predict(api_name="/export_peft")[0], "PEFT adapter ready"),
        ("training stopped mid-way", lambda: stop_mid_way()["status"], "stopped"),
    ]
    for what, run, expect in jobs:
        outcome = run()
        assert expect in outcome, (what, outcome)
        assert worker._models.get(key) is lm, what  # still the one shared model object ...
        assert fingerprint(lm.model) == base, f"{what} changed the shared model"  # ... unchanged

    # non-finite gradients: a learning rate so large that training hits NaN/inf
    c.predict(**{**kw, "lr": 1e30, "steps": 6}, api_name="/train")
    summary = _wait(c)
    assert summary["status"] == "failed", summary
    error = summary["error"]
    assert "became NaN/inf" in error and "lower the learning rate" in error and "\n" not in error, error
    assert "Traceback" not in error
    polled = c.predict({}, api_name="/train_status")
    assert "Training failed" in polled[1] and "NaN" in polled[1]
    assert worker._models.get(key) is lm and fingerprint(lm.model) == base, "a NaN training changed the model"
    run_dir = Path(summary["run_dir"])
    assert not (run_dir / "adapter" / "adapter_config.json").exists()  # no adapter saved from a NaN run
    # and the model still works for the next job
    assert "Head scoring done" in c.predict(**kw, head_method="gradient", api_name="/heads")[0]
    assert fingerprint(lm.model) == base


@pytest.mark.slow
def test_stop_interrupts_evaluation_and_it_is_shown_partial(served, tiny_llama_dir):
    from gradio_client import Client

    c = Client(served.url, verbose=False)
    kw = _kw(tiny_llama_dir, eval_size=400, max_new_tokens=64, batch_size=16)
    assert "Load done" in c.predict(**kw, api_name="/load")[0]
    pending = c.submit(api_name="/evaluate")
    st = served.studio
    end = time.time() + 120
    while time.time() < end:  # until the generations (after the answer-loss pass) have made progress
        ws = st.registry.for_session(c.session_hash)
        job = st.current_job(ws) if ws is not None else None
        if job is not None and job.kind == "evaluate" and job.desc == "generate" and job.done >= 1:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("evaluation did not start")
    t_stop = time.time()
    assert "Stop requested" in c.predict(api_name="/stop")[0]
    status, summary_md, table, *_ = pending.result(timeout=120)
    assert time.time() - t_stop < 30  # stopped between batches, not after all 400 rows
    assert "Evaluation stopped" in status, status
    assert "The evaluation before training was stopped part-way: it covers" in summary_md, summary_md
    summary = c.predict(0, api_name="/wait_job")
    assert summary["status"] == "stopped" and "eval_before" in summary["stages_partial"], summary
    result = json.loads((Path(summary["run_dir"]) / "eval_before.json").read_text())
    assert result["partial"] is True and 0 < result["n_generated"] < result["n"] == 400, result
    rows = {r[0]: r for r in table["data"]}
    assert rows["eval rows"][1] == "400"
