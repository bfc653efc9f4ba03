"""Stage 1 head scoring on tiny models."""

import json
import math

import pytest
import torch

from p2d.data.loading import load_records
from p2d.errors import UserError
from p2d.method.heads_variants import attention_snapshot, w1_index, weight_shift_scores
from p2d.method.heads import HEAD_METHODS, HeadScores, score_heads, select_top

ROWS_A = [{"instruction": f"Add {a} and {b}.", "output": str(a + b), "task": "addition"}
          for a, b in [(12, 7), (30, 45), (8, 91), (23, 23), (5, 60), (77, 11)]]
ROWS_B = [{"instruction": f"What is the capital of {c}?", "output": cap, "task": "capitals"}
          for c, cap in [("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Chad", "N'Djamena")]]


@pytest.fixture(scope="module")
def probe():
    return load_records(ROWS_A).samples


@pytest.fixture(scope="module")
def pool():
    return load_records(ROWS_A[:3] + ROWS_B).samples


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_methods_shape_ratio_and_restore(tiny_llama, probe, pool, method):
    lm = tiny_llama
    lm.model.lm_head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    flags["model.layers.0.mlp.up_proj.weight"] = False
    lm.model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    lm.model.train()
    before = _state(lm.model)
    hs = score_heads(lm, probe, method, ratio=0.25, pool=pool, batch_size=4, proxy_steps=2, proxy_lr=1e-3)
    assert hs.method == method and hs.ratio == 0.25
    assert len(hs.scores) == 4 and all(len(r) == 4 for r in hs.scores)
    assert all(math.isfinite(x) for r in hs.scores for x in r)
    assert len(hs.selected) == 4  # 25% of 16
    flat = sorted(((hs.scores[l][h], l, h) for l in range(4) for h in range(4)), key=lambda t: (-t[0], t[1], t[2]))
    assert hs.selected == [[l, h] for _, l, h in flat[:4]]
    # weights bit-identical, flags and mode restored
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert lm.model.training
    assert all(p.grad is None for p in lm.model.parameters())
    assert hs.extra["stopped"] is False


def test_ratio_to_count_and_tiebreak():
    scores = [[0.0] * 4 for _ in range(3)]
    assert select_top(scores, 0.01) == [[0, 0]]  # at least one
    assert select_top(scores, 0.25) == [[0, 0], [0, 1], [0, 2]]  # 12 * .25 = 3, ties by (layer, head)
    assert len(select_top(scores, 1.0)) == 12
    s = [[0.1, float("nan")], [0.5, 0.3]]
    assert select_top(s, 1.0) == [[1, 0], [1, 1], [0, 0], [0, 1]]
    with pytest.raises(UserError):
        select_top(scores, 0.0)
    with pytest.raises(UserError):
        select_top(scores, 1.5)


def test_layer_window_limits_where_heads_come_from(tiny_llama, probe, pool, tmp_path):
    """A layer window keeps the number of heads and picks them only from its layers, the best there first; a
    new ratio keeps the window; a window outside the model or upside down is refused."""
    from p2d.config import RunConfig
    from p2d.method.heads import layer_window

    full = score_heads(tiny_llama, probe, method="gradient", ratio=0.25, pool=pool, batch_size=4)
    win = score_heads(tiny_llama, probe, method="gradient", ratio=0.25, pool=pool, batch_size=4, min_layer=2,
                      max_layer=3)
    assert win.scores == full.scores and win.window == [2, 3] and full.window is None
    assert len(win.selected) == len(full.selected) == 4
    assert win.selected == [h for h in select_top(full.scores, 1.0) if h[0] >= 2][:4]
    assert all(layer >= 2 for layer, _ in win.with_ratio(0.5).selected) and len(win.with_ratio(0.75).selected) == 8
    assert HeadScores.load(win.save(tmp_path)).window == [2, 3]
    assert score_heads(tiny_llama, probe, method="random", ratio=0.25, max_layer=0).selected[0][0] == 0
    assert layer_window(None, None, 4) is None and layer_window(1, None, 4) == [1, 3]
    for lo, hi in ((0, 4), (3, 2), (-1, 2)):
        with pytest.raises(UserError, match="layer window"):
            layer_window(lo, hi, 4)
    with pytest.raises(UserError, match="lowest head layer"):
        RunConfig(min_head_layer=5, max_head_layer=2).validate()


def test_random_reproducible_by_seed(tiny_llama, probe):
    a = score_heads(tiny_llama, probe, "random", seed=3)
    b = score_heads(tiny_llama, probe, "random", seed=3)
    c = score_heads(tiny_llama, probe, "random", seed=4)
    assert a.scores == b.scores and a.selected == b.selected
    assert a.scores != c.scores


def test_shift_restores_weights_bit_identically(tiny_llama, probe):
    lm = tiny_llama
    before = _state(lm.model)
    hs = score_heads(lm, probe, "shift", proxy_steps=3, proxy_lr=1e-2, batch_size=2)
    assert hs.extra["proxy_steps"] == 3
    assert max(max(r) for r in hs.scores) > 0  # something moved during the proxy run
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shift_restores_weights_on_error(tiny_llama, probe):
    lm = tiny_llama
    before = _state(lm.model)
    calls = []

    def boom(done, total, desc):
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        score_heads(lm, probe, "shift", proxy_steps=5, proxy_lr=1e-2, batch_size=2, progress=boom)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad is False for p in lm.model.parameters())  # flags back to trainable


def test_shift_gqa_uses_kv_head(tiny_llama):
    lm = tiny_llama
    g = lm.geometry
    assert g.n_q_heads == 4 and g.n_kv_heads == 2
    before = attention_snapshot(lm.model, g)
    after = {layer: {k: v.clone() for k, v in w.items()} for layer, w in before.items()}
    d = g.head_dim
    after[2]["k"][1 * d:2 * d] += 0.5  # only kv head 1's k rows in layer 2
    w1, rel = weight_shift_scores(g, before, after)
    for layer in range(g.n_layers):
        for head in range(g.n_q_heads):
            moved = layer == 2 and head in (2, 3)
            assert (w1[layer][head] > 0) == moved, (layer, head, w1[layer][head])
            assert (rel[layer][head] > 0) == moved
    # and the q rows of query head 1 only move query head 1
    after = {layer: {k: v.clone() for k, v in w.items()} for layer, w in before.items()}
    after[0]["q"][1 * d:2 * d] += 0.5
    w1, _ = weight_shift_scores(g, before, after)
    assert [h for h in range(4) if w1[0][h] > 0] == [1]


def test_shift_fused_gpt2_columns(tiny_gpt2, probe):
    lm = tiny_gpt2
    g = lm.geometry
    before = attention_snapshot(lm.model, g)
    after = {layer: {k: v.clone() for k, v in w.items()} for layer, w in before.items()}
    d, hd = g.head_dim, g.n_q_heads * g.head_dim
    after[1]["qkv"][:, 2 * hd + 3 * d:2 * hd + 4 * d] += 0.5  # v columns of head 3
    after[0]["o"][0:d] += 0.5  # c_proj rows of head 0
    w1, _ = weight_shift_scores(g, before, after)
    moved = {(l, h) for l in range(g.n_layers) for h in range(g.n_q_heads) if w1[l][h] > 0}
    assert moved == {(1, 3), (0, 0)}
    state = _state(lm.model)
    hs = score_heads(lm, probe, "shift", proxy_steps=2, proxy_lr=1e-2, batch_size=3)
    assert len(hs.scores) == 3 and all(len(r) == 4 for r in hs.scores)
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())


def test_w1_index_matches_cdf_definition():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.5, 0.5])
    # support 0, .5, 1: all mass moves by 0.5 -> W1 = 0.5
    assert w1_index(p, q) == pytest.approx(0.5)
    assert w1_index(p, p) == 0.0


def test_gradient_contrast_and_no_pool(tiny_llama, probe, pool):
    with_pool = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4)
    assert with_pool.extra["contrast"].startswith("difference")
    assert with_pool.extra["pool_samples"] == len(pool)
    assert abs(sum(map(sum, with_pool.scores))) < 1e-6  # difference of two shares sums to 0
    alone = score_heads(tiny_llama, probe, "gradient", pool=None, batch_size=4)
    assert alone.extra["contrast"].startswith("none") and alone.extra["pool_importance"] is None
    assert sum(map(sum, alone.scores)) == pytest.approx(1.0)
    off = score_heads(tiny_llama, probe, "gradient", pool=pool, contrast=False, batch_size=4)
    assert sum(off.scores, []) == pytest.approx(sum(alone.scores, []))


def test_should_stop_returns_partial(tiny_llama, probe, pool):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1
    hs = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=2, should_stop=stop)
    assert hs.extra["stopped"] is True
    assert hs.extra["probe_samples"] == 2
    seen = []
    hs = score_heads(tiny_llama, probe, "shift", proxy_steps=4, batch_size=2,
                     progress=lambda d, t, s: seen.append((d, t)), should_stop=lambda: len(seen) >= 2)
    assert hs.extra["stopped"] and hs.extra["proxy_steps"] == 2 and seen == [(1, 4), (2, 4)]


def test_save_load_round_trip(tiny_llama, probe, tmp_path):
    hs = score_heads(tiny_llama, probe, "random", ratio=0.2, seed=1)
    path = hs.save(tmp_path / "run")
    assert path.name == "heads.json"
    d = json.loads(path.read_text())
    assert {"method", "ratio", "scores", "selected", "time_s", "model"} <= set(d)
    back = HeadScores.load(tmp_path / "run")
    assert back.scores == hs.scores and back.selected == hs.selected and back.method == "random"
    assert HeadScores.load(path).ratio == 0.2


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        HeadScores.load(tmp_path)
    (tmp_path / "heads.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid"):
        HeadScores.load(tmp_path)
    (tmp_path / "heads.json").write_text(json.dumps({"method": "x", "ratio": 0.1, "scores": [[1.0]]}))
    with pytest.raises(UserError, match="selected"):
        HeadScores.load(tmp_path)
    (tmp_path / "heads.json").write_text(json.dumps({"method": "x", "ratio": 0.1, "scores": [[1.0]],
                                                     "selected": [[0, 5]]}))
    with pytest.raises(UserError, match="outside"):
        HeadScores.load(tmp_path)


def test_bad_arguments(tiny_llama, probe):
    with pytest.raises(UserError):
        score_heads(tiny_llama, probe, "nope")
    with pytest.raises(UserError):
        score_heads(tiny_llama, [], "gradient")
    with pytest.raises(UserError):
        score_heads(tiny_llama, probe, "gradient", ratio=0)


def test_head_scores_with_ratio():
    from p2d.method.heads import HeadScores

    hs = HeadScores("random", 0.25, [[0.1, 0.9], [0.5, 0.2]], [[0, 1]], 0.0, "m", {})
    assert hs.with_ratio(0.5).selected == [[0, 1], [1, 0]] and hs.with_ratio(0.5).ratio == 0.5


# ------------------------------------------------------------------------------- variants


def test_contrast_magnitude_bias_synthetic():
    """Layer 0 holds 10x-magnitude heads enriched 1.15x on the probe; layer 1 holds unit heads, two of
    them enriched 1.5x. The global-share difference ranks the big heads first; per-layer shares and
    the log-ratio rank the truly enriched heads first."""
    from p2d.method.heads import contrast_scores

    pool = torch.tensor([[10.0] * 4, [1.0] * 4], dtype=torch.float64)
    probe = pool.clone()
    probe[0, :2] *= 1.15  # big heads, mildly enriched
    probe[1, 2:] *= 1.5  # small heads, strongly enriched
    diff = contrast_scores(probe, pool, "difference")
    assert select_top(diff, 2 / 8) == [[0, 0], [0, 1]]
    for kind in ("layer", "logratio"):
        assert select_top(contrast_scores(probe, pool, kind), 2 / 8) == [[1, 2], [1, 3]], kind
    # log-ratio = log(1.5) - log(1.15) gap between the enriched groups, up to eps and the share shift
    lr = contrast_scores(probe, pool, "logratio")
    assert float(lr[1, 2] - lr[0, 0]) == pytest.approx(math.log(1.5 / 1.15), abs=5e-3)
    # the layer contrast sums to zero within each layer
    assert contrast_scores(probe, pool, "layer").sum(dim=1).abs().max() < 1e-12
    with pytest.raises(UserError):
        contrast_scores(probe, pool, "nope")


def test_gradient_variants_share_one_importance_run(tiny_llama, probe, pool):
    from p2d.method.heads import contrast_scores, recontrast

    base = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4)
    for method, kind in (("gradient_layer", "layer"), ("gradient_logratio", "logratio")):
        hs = score_heads(tiny_llama, probe, method, pool=pool, batch_size=4)
        assert hs.extra["contrast_kind"] == kind
        assert sum(hs.extra["probe_importance"], []) == pytest.approx(sum(base.extra["probe_importance"], []), rel=1e-6)
        expect = contrast_scores(hs.extra["probe_importance"], hs.extra["pool_importance"], kind).tolist()
        assert sum(hs.scores, []) == pytest.approx(sum(expect, []))
        again = recontrast(base, kind)
        assert sum(again.scores, []) == pytest.approx(sum(hs.scores, []), rel=1e-5, abs=1e-9)
        assert again.selected == hs.selected
    # the gradient method may take any contrast by name; its own default stays the difference
    named = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4, contrast="logratio")
    assert named.extra["contrast_kind"] == "logratio"
    assert base.extra["contrast_kind"] == "difference"


def test_methods_of_the_same_maps_are_read_off_one_run(tiny_llama, probe, pool):
    """`from_maps`: every method of the gate importance maps (the contrasts and ``importance``, the probe's
    shares alone) from one gradient_logratio run picks what the method scored on its own picks."""
    from p2d.method.heads import from_maps

    source = score_heads(tiny_llama, probe, "gradient_logratio", pool=pool, batch_size=4)
    for method in ("gradient", "gradient_layer", "importance"):
        own = score_heads(tiny_llama, probe, method, pool=pool, batch_size=4)
        read = from_maps(source, method)
        assert read.method == method and read.selected == own.selected, method
    alone = score_heads(tiny_llama, probe, "importance", pool=pool, batch_size=4)
    assert alone.extra["pool_samples"] == 0 and alone.extra["contrast_kind"] is None  # no pool pass
    assert alone.selected == score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4, contrast=False).selected
    with pytest.raises(UserError, match="importance maps"):
        from_maps(score_heads(tiny_llama, probe, "random", seed=1), "gradient")
    with pytest.raises(UserError, match="contrast"):
        score_heads(tiny_llama, probe, "importance", pool=pool, batch_size=4, contrast="difference")


def test_contrast_methods_need_a_pool(tiny_llama, probe, pool):
    for method in ("gradient_layer", "gradient_logratio"):
        with pytest.raises(UserError, match="pool"):
            score_heads(tiny_llama, probe, method, pool=None)
        with pytest.raises(UserError, match="pool"):
            score_heads(tiny_llama, probe, method, pool=pool, contrast=False)
    with pytest.raises(UserError, match="always uses"):
        score_heads(tiny_llama, probe, "gradient_layer", pool=pool, contrast="logratio")
    with pytest.raises(UserError):
        score_heads(tiny_llama, probe, "gradient", pool=pool, contrast="nope")


def test_head_slice_sums_gqa_and_fused(tiny_llama, tiny_gpt2):
    from p2d.method.heads_variants import head_slice_sums

    g = tiny_llama.geometry  # 4 query heads, 2 kv heads, d = 16, hidden 64
    d = g.head_dim
    t = {k: torch.zeros_like(m.weight) for k, m in g.projections(tiny_llama.model, 0).items()}
    t["q"][2 * d:3 * d] = 1.0  # query head 2's q rows: 16 x 64
    t["v"][1 * d:2 * d] = 1.0  # kv head 1: read by query heads 2 and 3
    t["o"][:, 0:d] = 2.0  # query head 0's o columns
    sums = head_slice_sums(g, t)
    assert sums.tolist() == [2.0 * 64 * d, 0.0, 64.0 * d + 64.0 * d, 64.0 * d]
    f = tiny_gpt2.geometry
    d, hd = f.head_dim, f.n_q_heads * f.head_dim
    t = {k: torch.zeros_like(m.weight) for k, m in f.projections(tiny_gpt2.model, 0).items()}
    t["qkv"][:, hd + 3 * d:hd + 4 * d] = 1.0  # k columns of head 3
    t["o"][1 * d:2 * d] = 1.0  # c_proj rows of head 1
    assert head_slice_sums(f, t).tolist() == [0.0, d * 64.0, 0.0, 64.0 * d]


def test_taylor_matches_manual_g_times_w(tiny_llama, probe):
    from p2d.method.gating import answer_losses
    from p2d.method.heads_variants import head_slice_sums
    from p2d.method.scoring import loss_batches, model_inputs

    lm = tiny_llama
    hs = score_heads(lm, probe, "taylor", pool=None, batch_size=len(probe))
    assert hs.extra["contrast"].startswith("none") and hs.extra["importance"].startswith("mean over batches")
    (batch,) = loss_batches(lm, probe, len(probe), 256)
    mods = lm.geometry.projections(lm.model, 2)
    loss = answer_losses(lm.model, model_inputs(batch)).mean()
    grads = torch.autograd.grad(loss, [m.weight for m in mods.values()])
    manual = head_slice_sums(lm.geometry, {k: (g * m.weight).abs() for (k, m), g in zip(mods.items(), grads)})
    assert hs.extra["probe_importance"][2] == pytest.approx(manual.tolist(), rel=1e-4)
    assert all(p.grad is None for p in lm.model.parameters())


def test_lofit_records_and_moves_scales(tiny_llama, probe):
    lm = tiny_llama
    before = _state(lm.model)
    hs = score_heads(lm, probe, "lofit", proxy_steps=3, batch_size=2, l1=0.0)
    assert hs.extra["steps"] == 3 and hs.extra["lr"] == 1e-2 and hs.extra["l1"] == 0.0
    scales = torch.tensor(hs.extra["scales"])
    # Adam's first steps move every scale with a nonzero gradient by ~lr per step
    assert torch.allclose((scales - 1).abs(), torch.tensor(hs.scores), atol=1e-7)
    assert (scales - 1).abs().max() <= 3 * 1e-2 + 1e-6 and (scales - 1).abs().max() > 1e-3
    for layer in range(4):  # no gate hook left behind
        assert len(lm.geometry.output_projection(lm.model, layer)._forward_pre_hooks) == 0
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    big = score_heads(lm, probe, "lofit", proxy_steps=3, batch_size=2, l1=10.0)
    assert max(max(r) for r in big.scores) < max(max(r) for r in hs.scores)  # L1 pins scales at 1


def test_shift_sgd_moves_with_gradient_size(tiny_llama, probe):
    """SGD movement is lr x gradient: halving the lr halves every update norm (Adam's would not)."""
    a = score_heads(tiny_llama, probe, "shift_sgd", proxy_steps=1, proxy_lr=1e-2, batch_size=6)
    b = score_heads(tiny_llama, probe, "shift_sgd", proxy_steps=1, proxy_lr=5e-3, batch_size=6)
    assert a.extra["optimizer"].startswith("SGD")
    ra, rb = torch.tensor(a.extra["update_norm"]), torch.tensor(b.extra["update_norm"])
    assert torch.allclose(ra, 2 * rb, rtol=1e-3, atol=1e-12)
    adam_a = score_heads(tiny_llama, probe, "shift", proxy_steps=1, proxy_lr=1e-2, batch_size=6)
    # Adam's first step is lr * sign(g): all heads' update norms are nearly equal multiples of lr
    na = torch.tensor(adam_a.extra["update_norm"])
    assert adam_a.extra["optimizer"].startswith("AdamW")
    assert na.std() / na.mean() < ra.std() / ra.mean()


def test_positions_option_changes_the_loss(tiny_llama, probe, pool):
    a = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4, positions="all")
    c = score_heads(tiny_llama, probe, "gradient", pool=pool, batch_size=4, positions="content")
    assert c.extra["positions"] == "content"
    assert sum(a.extra["probe_importance"], []) != pytest.approx(sum(c.extra["probe_importance"], []), rel=1e-3)
    with pytest.raises(UserError):
        score_heads(tiny_llama, probe, "gradient", positions="nope")


def test_every_head_method_has_help():
    from p2d.method.heads import HEAD_METHOD_HELP

    assert set(HEAD_METHOD_HELP) == set(HEAD_METHODS)
    assert all(HEAD_METHOD_HELP[m].startswith(m + ":") for m in HEAD_METHODS)


def test_gradient_heads_report_real_and_padded_tokens(tiny_llama, probe, pool):
    """The gate-importance stage reports the real and padded tokens of the batches it ran (probe + pool sample)."""
    from p2d.data.encoding import encode
    from p2d.method.heads import _pool_sample

    hs = score_heads(tiny_llama, probe, "gradient_logratio", 0.25, pool=pool, batch_size=4, max_length=64)
    rows = list(probe) + list(_pool_sample(pool, probe, 0))
    assert hs.extra["tokens"] == sum(len(e["input_ids"]) for e in encode(rows, tiny_llama.tokenizer, 64))
    assert hs.extra["padded_tokens"] >= hs.extra["tokens"]


def test_heads_precision_bf16_agrees_with_float32(tiny_llama, probe, pool):
    """heads_precision bf16 scores on a bfloat16 copy (the loaded model stays float32 and untouched): the gate
    importance maps agree with float32 within 2% of each map's largest entry (measured: 0.4-0.5%) but are not
    identical (the copy ran), the scores rank the heads alike (Spearman >= 0.9) and the top quarter overlaps in
    at least 3 of 4 heads."""
    from p2d.explore import spearman

    before = _state(tiny_llama.model)
    ref = score_heads(tiny_llama, probe, "gradient_logratio", ratio=0.25, pool=pool, batch_size=4)
    low = score_heads(tiny_llama, probe, "gradient_logratio", ratio=0.25, pool=pool, batch_size=4, precision="bf16")
    assert ref.extra["precision"] == "same" and low.extra["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in tiny_llama.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.model.state_dict().items())
    for key in ("probe_importance", "pool_importance"):
        a, b = torch.tensor(ref.extra[key]), torch.tensor(low.extra[key])
        assert (a - b).abs().max() <= 0.02 * a.abs().max() and not torch.equal(a, b), key
    flat = lambda hs: [x for r in hs.scores for x in r]  # noqa: E731
    assert spearman(flat(ref), flat(low)) >= 0.9
    assert len({tuple(h) for h in ref.selected} & {tuple(h) for h in low.selected}) >= 3


@pytest.mark.parametrize("method, match", [("shift", "gate-gradient methods only"),
                                           ("taylor", "gate-gradient methods only")])
def test_heads_precision_errors_are_one_line(tiny_llama, probe, pool, method, match):
    with pytest.raises(UserError, match=match) as exc:
        score_heads(tiny_llama, probe, method, pool=pool, batch_size=4, proxy_steps=1, precision="bf16")
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="unknown head-scoring precision") as exc:
        score_heads(tiny_llama, probe, pool=pool, batch_size=4, precision="int8")
    assert "\n" not in str(exc.value)
    # the control never runs the model: any precision is moot
    assert score_heads(tiny_llama, probe, "random", precision="bf16").selected
