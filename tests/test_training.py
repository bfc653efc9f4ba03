"""Sparse head training: frozen weights stay frozen, the loss goes down, stops and failures are clean."""

import json
import os
import signal

import pytest
import torch

from p2d.adapter import CONFIG_NAME, WEIGHTS_NAME, HeadAdapter, load_adapter
from p2d.data.formats import Sample
from p2d.errors import UserError
from p2d.training import TrainConfig, answer_loss, lr_factor, optimizer_state_bytes, train_heads

LOG_KEYS = {"step", "loss", "lr", "tokens_per_s", "elapsed_s"}


def _samples(n=8):
    out = []
    for i in range(n):
        a, b = 10 + 7 * i, 3 + 5 * i
        out.append(Sample(prompt=[{"role": "user", "content": f"What is {a} + {b}?"}], answer=str(a + b),
                          task="add", row={}, index=i))
    return out


def _log(result):
    with open(result.log_path) as f:
        return [json.loads(line) for line in f]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_weights_bit_identical_and_merge_changes_only_the_slices(tiny_llama, tmp_path):
    lm = tiny_llama
    before = _snapshot(lm.model)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    heads = [[1, 0], [2, 3]]
    res = train_heads(lm, heads, _samples(), TrainConfig(steps=3, lr=1e-2, batch_size=4), tmp_path)
    assert res.steps_done == 3 and not res.stopped and res.final_loss is not None
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert not lm.model.training
    assert all(not m._forward_hooks for m in lm.model.modules())
    assert all(p.grad is None for p in lm.model.parameters())

    adapter = HeadAdapter.load(res.adapter_dir)
    assert adapter.heads == heads and adapter.config.training["steps_done"] == 3
    assert res.trainable_params == adapter.num_params()
    adapter.merge_into(lm.model)
    g, d = lm.geometry, lm.geometry.head_dim
    touched = set()
    for layer in range(g.n_layers):
        mods = g.projections(lm.model, layer)
        attn = f"model.layers.{layer}.self_attn"
        q_sel = [h for l, h in heads if l == layer]
        kv_sel = sorted({g.kv_head(h) for h in q_sel})
        for proj, sel, dim in (("q", q_sel, 0), ("k", kv_sel, 0), ("v", kv_sel, 0), ("o", q_sel, 1)):
            key = f"{attn}.{proj}_proj.weight"
            touched.add(key)
            w, w0 = mods[proj].weight, before[key]
            rows = {h * d + j for h in sel for j in range(d)}
            for i in range(w.shape[dim]):
                same = torch.equal(w.select(dim, i), w0.select(dim, i))
                assert same != (i in rows), (layer, proj, i)
    for k, v in lm.model.state_dict().items():
        if k not in touched:
            assert torch.equal(v, before[k]), k


def test_loss_decreases_log_per_step_and_optimizer_state(tiny_llama, tmp_path):
    cfg = TrainConfig(steps=12, lr=2e-2, batch_size=4, warmup_ratio=0.0)
    res = train_heads(tiny_llama, [[2, 0], [3, 1], [3, 2]], _samples(4), cfg, tmp_path)
    log = _log(res)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(LOG_KEYS <= set(r) for r in log)
    assert log[-1]["loss"] == pytest.approx(res.final_loss, abs=1e-5)
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.3, (first, last)  # random tiny model: ~10.77 -> ~10.19
    # AdamW fp32: exp_avg + exp_avg_sq, 4 bytes each, per trainable parameter
    assert res.optimizer_state_bytes == 2 * 4 * res.trainable_params
    a = HeadAdapter.load(res.adapter_dir)
    assert res.trainable_params == a.num_params() == sum(p.numel() for p in a.parameters())
    assert res.tokens > 0 and res.time_s > 0
    # 12 steps of the lr schedule: no step at lr 0, cosine decay
    assert log[0]["lr"] == pytest.approx(2e-2) and 0 < log[-1]["lr"] < log[5]["lr"]


def test_optimizer_state_bytes_counts_tensors():
    p = torch.nn.Parameter(torch.zeros(10, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert optimizer_state_bytes(opt) == 0
    p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 4 * 30


def test_backward_never_reaches_layers_below_lowest_selected(tiny_llama, tmp_path):
    layers = tiny_llama.model.model.layers
    seen = {i: [] for i in range(4)}
    grads_seen = {i: 0 for i in range(4)}

    def make_hook(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[i].append(out.requires_grad)
            if out.requires_grad:
                def count(grad):
                    grads_seen[i] += 1
                out.register_hook(count)
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        train_heads(tiny_llama, [[2, 1]], _samples(4), TrainConfig(steps=2, batch_size=4), tmp_path)
    finally:
        for h in handles:
            h.remove()
    assert seen[0] == seen[1] == [False, False]
    assert grads_seen[0] == grads_seen[1] == 0
    assert seen[2] == seen[3] == [True, True] and grads_seen[2] == grads_seen[3] == 2  # the check can fail
    assert all(p.grad is None for p in tiny_llama.model.parameters())


def test_should_stop_after_step_two(tiny_llama, tmp_path):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= 2

    progress = []
    res = train_heads(tiny_llama, [[3, 0]], _samples(), TrainConfig(steps=10, batch_size=2), tmp_path,
                      should_stop=should_stop, progress=lambda *a: progress.append(a))
    assert res.stopped and res.steps_done == 2 and res.steps_planned == 10
    assert res.stop_reason == "stop requested"
    assert len(_log(res)) == 2
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file() and (tmp_path / "adapter" / CONFIG_NAME).is_file()
    assert progress == [(0, 10, "train"), (1, 10, "train"), (2, 10, "train")]
    assert HeadAdapter.load(res.adapter_dir).config.training["stopped"] is True


def test_keyboard_interrupt_from_callback_ends_cleanly(tiny_llama, tmp_path):
    before = _snapshot(tiny_llama.model)

    def on_log(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    res = train_heads(tiny_llama, [[3, 0], [1, 2]], _samples(), TrainConfig(steps=10, batch_size=2), tmp_path,
                      on_log=on_log)
    assert res.stopped and res.steps_done == 2 and "interrupted" in res.stop_reason
    assert len(_log(res)) == 2 and (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.model.state_dict().items())
    assert all(not m._forward_hooks for m in tiny_llama.model.modules())


def _own_handler(signum, frame):
    raise AssertionError("the handler in place before training must not run during it")


# SIGINT is ignored (SIG_IGN) when the suite runs as a background job (`nohup ... &`): the handler in
# place before training must come back, whichever it was.
@pytest.mark.parametrize("before", [signal.default_int_handler, signal.SIG_IGN, _own_handler],
                         ids=["default", "ignored", "custom"])
def test_real_ctrl_c_finishes_the_current_step(tiny_llama, tmp_path, before):
    def on_log(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    outer = signal.signal(signal.SIGINT, before)
    try:
        res = train_heads(tiny_llama, [[3, 0]], _samples(), TrainConfig(steps=10, batch_size=2), tmp_path,
                          on_log=on_log)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert res.stopped and res.steps_done == 2 and "Ctrl-C" in res.stop_reason
    assert after == before


def test_nan_loss_is_a_user_error_without_adapter(tiny_llama, tmp_path):
    with pytest.raises(UserError, match=r"at step \d+ became NaN/inf: lower the learning rate"):
        train_heads(tiny_llama, [[1, 0], [2, 2], [3, 3]], _samples(), TrainConfig(steps=6, lr=1e30, batch_size=4),
                    tmp_path)
    assert not (tmp_path / "adapter").exists()
    assert (tmp_path / "train_log.jsonl").is_file()
    assert all(not m._forward_hooks for m in tiny_llama.model.modules())


def test_injected_nan_at_step_three_keeps_log(tiny_llama, tmp_path, monkeypatch):
    import p2d.training as tr

    calls = []

    def fake_loss(model, batch, fast=None):
        calls.append(1)
        loss, n = answer_loss(model, batch, fast)
        return (loss * float("nan") if len(calls) == 3 else loss), n

    monkeypatch.setattr(tr, "answer_loss", fake_loss)
    with pytest.raises(UserError, match="step 3"):
        train_heads(tiny_llama, [[1, 0]], _samples(), TrainConfig(steps=6, batch_size=2), tmp_path)
    assert len(_log(type("R", (), {"log_path": str(tmp_path / "train_log.jsonl")}))) == 2


def test_fast_answer_loss_matches_full_logits(tiny_llama, tiny_gpt2):
    from p2d.data.encoding import collate, encode

    for lm in (tiny_llama, tiny_gpt2):
        batch = collate(encode(_samples(3), lm.tokenizer, 64), lm.tokenizer.pad_token_id)
        lm.model.eval()
        with torch.no_grad():
            fast, n1 = answer_loss(lm.model, batch, fast=True)
            slow, n2 = answer_loss(lm.model, batch, fast=False)
            ref = lm.model(**batch).loss
        assert n1 == n2 > 0
        assert torch.allclose(fast, slow, rtol=1e-5)
        assert torch.allclose(slow / n2, ref, rtol=1e-5)


def test_bad_inputs_are_user_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no training samples"):
        train_heads(tiny_llama, [[1, 0]], [], TrainConfig(steps=1), tmp_path)
    with pytest.raises(UserError, match="no heads"):
        train_heads(tiny_llama, [], _samples(), TrainConfig(steps=1), tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        train_heads(tiny_llama, [[9, 0]], _samples(), TrainConfig(steps=1), tmp_path)
    with pytest.raises(UserError, match="learning rate"):
        train_heads(tiny_llama, [[1, 0]], _samples(), TrainConfig(steps=1, lr=0), tmp_path)
    train_heads(tiny_llama, [[1, 0]], _samples(2), TrainConfig(steps=1), tmp_path)
    with pytest.raises(UserError, match="already holds an adapter"):
        train_heads(tiny_llama, [[1, 0]], _samples(2), TrainConfig(steps=1), tmp_path)
    res = train_heads(tiny_llama, [[1, 0]], _samples(2), TrainConfig(steps=1), tmp_path, overwrite=True)
    adapter = load_adapter(tiny_llama, res.adapter_dir)
    with pytest.raises(UserError, match="detach it before training"):
        train_heads(tiny_llama, [[1, 0]], _samples(2), TrainConfig(steps=1), tmp_path / "again")
    adapter.detach()


def test_steps_from_epochs_and_schedule():
    cfg = TrainConfig(epochs=2, batch_size=8)
    assert cfg.planned_steps(20) == 6
    assert TrainConfig(epochs=1, batch_size=8, grad_accum=2).planned_steps(20) == 2
    assert TrainConfig(steps=5).planned_steps(1000) == 5
    assert lr_factor(0, 10, 2) == pytest.approx(1 / 3) and lr_factor(2, 10, 2) == 1.0
    assert all(lr_factor(s, 10, 2) > 0 for s in range(10))


def test_grad_accum_runs(tiny_llama, tmp_path):
    res = train_heads(tiny_llama, [[1, 0]], _samples(8), TrainConfig(epochs=1, batch_size=2, grad_accum=2),
                      tmp_path)
    assert res.steps_planned == 2 and res.steps_done == 2
    assert _log(res)[0]["tokens"] > 0


@pytest.mark.slow
def test_embedded_model_two_steps(embedded, tmp_path):
    """27 heads (10%) of the real SmolLM2-135M: 2 steps on 8 tiny samples, model left untouched."""
    heads = [[layer, h] for layer in range(27, 30) for h in range(9)]
    q = embedded.model.model.layers[28].self_attn.q_proj.weight
    q_before, flag = q.detach().clone(), q.requires_grad
    res = train_heads(embedded, heads, _samples(8), TrainConfig(steps=2, batch_size=4), tmp_path)
    assert res.steps_done == 2 and res.final_loss is not None and res.final_loss == res.final_loss
    assert torch.equal(q, q_before) and q.requires_grad == flag
    assert not embedded.model.training
    adapter = load_adapter(embedded, res.adapter_dir)
    try:
        assert adapter.num_params() == res.trainable_params
    finally:
        adapter.detach()
    assert all(not m._forward_hooks for m in embedded.model.modules())


def test_schedulers():
    assert lr_factor(5, 10, 0, "constant") == 1.0
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5) and lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    with pytest.raises(UserError, match="scheduler"):
        TrainConfig(scheduler="step").check()


def test_gradient_checkpointing_gives_the_same_adapter(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(steps=3, lr=1e-2, batch_size=4, warmup_ratio=0.0)
    a = train_heads(tiny_llama, [[1, 0], [3, 2]], _samples(8), TrainConfig(**cfg), tmp_path / "a")
    b = train_heads(tiny_llama, [[1, 0], [3, 2]], _samples(8), TrainConfig(**cfg, gradient_checkpointing=True),
                    tmp_path / "b")
    ta = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)
    m = tiny_llama.model
    on = m.is_activation_checkpointing if hasattr(type(m), "is_activation_checkpointing") else m.is_gradient_checkpointing
    assert not on and a.final_loss == pytest.approx(b.final_loss, abs=1e-6)


def test_validation_share_is_held_out_and_logged(tiny_llama, tmp_path):
    res = train_heads(tiny_llama, [[2, 1]], _samples(10), TrainConfig(steps=6, batch_size=4, val_ratio=0.2,
                                                                         val_every=2), tmp_path)
    log = _log(res)
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4, 6]
    assert all(r["val_loss"] > 0 for r in log if "val_loss" in r)
    assert res.extra["n_samples"] == 8  # 2 of 10 held out
