"""Stage 2 data selection on tiny models, plus one quick run on the embedded model."""

import json
import math

import pytest
import torch

from p2d.data.loading import load_records
from p2d.errors import UserError
from p2d.method.heads import HeadScores, score_heads
from p2d.method.selection import SELECT_METHODS, Selection, select_data

ROWS = (
    [{"instruction": f"Add {a} and {b}.", "output": str(a + b), "task": "addition", "id": f"a{a}"}
     for a, b in [(12, 7), (30, 45), (8, 91), (23, 23), (5, 60)]]
    + [{"instruction": f"What is the capital of {c}?", "output": cap, "task": "capitals", "id": c}
       for c, cap in [("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Chad", "N'Djamena"),
                      ("Italy", "Rome")]]
)
PROBE = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(40, 2), (13, 13), (70, 21)]]
HEADS = [[1, 0], [3, 2], [3, 3]]


@pytest.fixture(scope="module")
def pool():
    return load_records(ROWS).samples


@pytest.fixture(scope="module")
def probe():
    return load_records(PROBE).samples


@pytest.mark.parametrize("method", SELECT_METHODS)
def test_each_method_scores_every_sample(tiny_llama, pool, probe, method):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    sel = select_data(tiny_llama, HEADS, pool, method, ratio=0.3, probe=probe, batch_size=4)
    assert sel.method == method and sel.n_pool == len(pool) == len(sel.scores)
    assert all(math.isfinite(s) for s in sel.scores)
    assert sel.n_selected == len(sel.selected) == 3  # round(0.3 * 10)
    ranked = sorted(range(len(pool)), key=lambda i: (-sel.scores[i], i))
    assert sel.selected == ranked[:3]
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.model.state_dict().items())
    assert all(p.requires_grad for p in tiny_llama.model.parameters())


def test_scores_independent_of_batching(tiny_llama, pool, probe):
    for method in ("ablation", "alignment", "activation"):
        a = select_data(tiny_llama, HEADS, pool, method, probe=probe, batch_size=1)
        b = select_data(tiny_llama, HEADS, pool, method, probe=probe, batch_size=5)
        assert a.scores == pytest.approx(b.scores, abs=1e-4), method


def test_ablation_of_unused_heads_is_zero(tiny_llama, pool):
    # zeroing every head's o_proj columns makes gating them a no-op -> score 0
    lm = tiny_llama
    with torch.no_grad():
        lm.geometry.output_projection(lm.model, 3).weight[:, 2 * 16:4 * 16] = 0
    sel = select_data(lm, [[3, 2], [3, 3]], pool, "ablation", ratio=0.5)
    assert all(abs(s) < 1e-6 for s in sel.scores)


def test_at_least_one_and_headscores_input(tiny_llama, pool, probe):
    hs = score_heads(tiny_llama, probe, "random", ratio=0.2, seed=0)
    sel = select_data(tiny_llama, hs, pool, "activation", ratio=0.01)
    assert sel.n_selected == 1
    assert sel.extra["head_method"] == "random" and sel.extra["heads"] == sorted(hs.selected)


def test_alignment_needs_probe(tiny_llama, pool):
    with pytest.raises(UserError, match="probe"):
        select_data(tiny_llama, HEADS, pool, "alignment", probe=None)


def test_bad_inputs(tiny_llama, pool):
    with pytest.raises(UserError):
        select_data(tiny_llama, HEADS, pool, "nope")
    with pytest.raises(UserError):
        select_data(tiny_llama, [[9, 0]], pool, "ablation")
    with pytest.raises(UserError):
        select_data(tiny_llama, [], pool, "ablation")
    with pytest.raises(UserError):
        select_data(tiny_llama, HEADS, [], "ablation")
    with pytest.raises(UserError):
        select_data(tiny_llama, HEADS, pool, "random", ratio=2)


def test_random_reproducible(tiny_llama, pool):
    a = select_data(tiny_llama, HEADS, pool, "random", seed=5)
    b = select_data(tiny_llama, HEADS, pool, "random", seed=5)
    c = select_data(tiny_llama, HEADS, pool, "random", seed=6)
    assert a.scores == b.scores and a.selected == b.selected
    assert a.scores != c.scores


def test_should_stop_partial(tiny_llama, pool):
    calls = []
    sel = select_data(tiny_llama, HEADS, pool, "ablation", ratio=1.0, batch_size=4,
                      should_stop=lambda: len(calls) >= 1, progress=lambda d, t, s: calls.append((d, t)))
    assert sel.extra["stopped"] is True
    assert sum(math.isfinite(s) for s in sel.scores) == 4
    assert sel.n_selected == 4 and all(math.isfinite(sel.scores[i]) for i in sel.selected)
    assert calls == [(1, 3)]


@pytest.mark.parametrize("method,flip_at", [("ablation", 0), ("activation", 0), ("alignment", 0), ("alignment", 3),
                                             ("head_norms", 0)])
def test_a_stop_part_way_through_a_batch_ends_it_there(tiny_llama, pool, probe, method, flip_at):
    """Round four's load test: the public demo's job cap was asked between batches only, and one batch of a 400-row
    selection took about 30 s on the busy machine, so capped jobs ran on for up to 34 s. One process now also asks
    before each layer and as the backward pass reaches each layer: a stop asked part-way through the first pool
    batch ends that batch (with ``flip_at`` 3, after the last layer's forward, only alignment's backward can see
    it); before, that batch was scored whole."""
    from p2d.geometry import decoder_layers
    from p2d.method.features import head_norms

    asked, forwards = {"stop": False}, []
    first_pool_forward = 2 if method == "alignment" else 1  # alignment's first forward is the probe's

    def flip(module, args, output):
        forwards.append(1)
        if len(forwards) == first_pool_forward:
            asked["stop"] = True

    hook = decoder_layers(tiny_llama.model)[flip_at].register_forward_hook(flip)
    try:
        if method == "head_norms":
            feats = head_norms(tiny_llama, pool, batch_size=4, should_stop=lambda: asked["stop"])["all"]
            stopped, scored = feats.extra["stopped"], int(torch.isfinite(feats.norms[:, 0, 0]).sum())
        else:
            sel = select_data(tiny_llama, HEADS, pool, method, ratio=1.0, probe=probe, batch_size=4,
                              should_stop=lambda: asked["stop"])
            stopped, scored = sel.extra["stopped"], sum(math.isfinite(s) for s in sel.scores)
    finally:
        hook.remove()
    assert asked["stop"] and stopped is True
    assert scored == 0, f"{scored} rows scored after the stop was asked inside the first batch"
    assert not tiny_llama.model._forward_hooks and all(not m._forward_pre_hooks and not m._forward_hooks
                                                       for m in decoder_layers(tiny_llama.model))


def test_save_writes_three_files(tiny_llama, pool, tmp_path):
    sel = select_data(tiny_llama, HEADS, pool, "ablation", ratio=0.3)
    paths = sel.save(tmp_path / "sel", pool)
    assert set(paths) == {"selected", "scores", "selection"}
    rows = [json.loads(x) for x in paths["selected"].read_text().splitlines()]
    assert len(rows) == 3
    for pos, row in zip(sel.selected, rows):
        assert {k: v for k, v in row.items() if k != "p2d_score"} == pool[pos].row
        assert row["p2d_score"] == pytest.approx(sel.scores[pos])
    scores = [json.loads(x) for x in paths["scores"].read_text().splitlines()]
    assert len(scores) == len(pool)
    assert all(set(s) == {"index", "score", "task"} for s in scores)
    assert [s["index"] for s in scores] == [p.index for p in pool]
    summary = json.loads(paths["selection"].read_text())
    for key in ("method", "ratio", "n_pool", "n_selected", "time_s", "task_counts", "pool_task_counts"):
        assert key in summary
    assert sum(summary["task_counts"].values()) == 3
    assert summary["pool_task_counts"] == {"addition": 5, "capitals": 5}
    assert sel.task_counts(pool) == summary["task_counts"]


def test_no_labels(tiny_llama, probe, tmp_path):
    unlabeled = load_records([{"prompt": f"Say {w}.", "response": w} for w in ("yes", "no", "maybe")]).samples
    sel = select_data(tiny_llama, HEADS, unlabeled, "random", ratio=0.5)
    assert sel.task_counts(unlabeled) is None
    summary = json.loads(sel.save(tmp_path, unlabeled)["selection"].read_text())
    assert "task_counts" not in summary and "pool_task_counts" not in summary


def test_gpt2_selection(tiny_gpt2, pool, probe):
    for method in ("ablation", "alignment", "activation"):
        sel = select_data(tiny_gpt2, [[0, 1], [2, 3]], pool, method, ratio=0.2, probe=probe)
        assert sel.n_selected == 2 and all(math.isfinite(s) for s in sel.scores)


@pytest.mark.slow
def test_embedded_end_to_end(embedded, tmp_path):
    """Real SmolLM2 on a 24-row pool: contrasted gradient heads -> activation selection.

    About 10 s on an idle 2-core CPU (4 gate-gradient batches + 3 truncated forwards).
    """
    from p2d.data.builtin import build_task_pool

    tp = build_task_pool(target="addition", pool_size=24, target_share=0.25, probe_size=8, eval_size=0,
                         tasks=["addition", "capitals", "dates", "sentiment"])
    pool = load_records(tp.pool).samples
    probe = load_records(tp.probe).samples
    state = {k: v.clone() for k, v in list(embedded.model.state_dict().items())[:20]}
    flags = [p.requires_grad for p in embedded.model.parameters()]
    hs = score_heads(embedded, probe, "gradient", ratio=0.1, pool=pool, batch_size=8, max_length=96)
    assert len(hs.scores) == 30 and all(len(r) == 9 for r in hs.scores) and len(hs.selected) == 27
    assert hs.extra["pool_samples"] == 24
    sel = select_data(embedded, hs, pool, "activation", ratio=0.25, batch_size=8, max_length=96)
    assert sel.n_selected == 6 and all(math.isfinite(s) for s in sel.scores)
    sel.save(tmp_path, pool)
    hs.save(tmp_path)
    assert HeadScores.load(tmp_path).selected == hs.selected
    assert sum(sel.task_counts(pool).values()) == 6
    after = embedded.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert [p.requires_grad for p in embedded.model.parameters()] == flags
    assert isinstance(sel, Selection)


def test_gradient_scores_work_under_no_grad(tiny_llama, pool, probe):
    ref = select_data(tiny_llama, HEADS, pool, "alignment", probe=probe)
    with torch.no_grad():
        sel = select_data(tiny_llama, HEADS, pool, "alignment", probe=probe)
        hs = score_heads(tiny_llama, probe, "gradient", pool=pool)
        shift = score_heads(tiny_llama, probe, "shift", proxy_steps=1)
    assert sel.scores == pytest.approx(ref.scores)
    assert all(math.isfinite(x) for r in hs.scores + shift.scores for x in r)


def test_with_ratio_reselects_without_rescoring():
    from p2d.method.selection import Selection

    sel = Selection("random", 0.5, 4, 2, 0.0, [0.1, float("nan"), 0.9, 0.5], [2, 3])
    assert sel.with_ratio(0.25).selected == [2]
    assert sel.with_ratio(1.0).selected == [2, 3, 0]  # NaN is never kept
    assert sel.with_ratio(0.25).n_selected == 1 and sel.selected == [2, 3]


# ------------------------------------------------------------------------------- variants


@pytest.mark.parametrize("positions", ["all", "content"])
def test_features_reproduce_select_data(tiny_llama, pool, probe, positions):
    """activation / alignment / activation_length_z of any head set from one all-heads feature pass
    equal select_data's scores (tolerance 1e-5 absolute: same batches, float32 sums in another order)."""
    from p2d.method.features import activation_from_features, alignment_from_features, head_features

    feats = head_features(tiny_llama, pool, batch_size=4, positions=positions)
    pfeats = head_features(tiny_llama, probe, batch_size=4, positions=positions)
    assert feats.norms.shape == (len(pool), 4, 4) and feats.grads.shape == (len(pool), 4, 4)
    assert feats.positions == positions and (feats.lengths > 0).all()
    for heads in (HEADS, [[0, 0]], [[2, 1], [2, 3], [0, 2]]):
        act = select_data(tiny_llama, heads, pool, "activation", batch_size=4, positions=positions)
        assert activation_from_features(feats, heads) == pytest.approx(act.scores, abs=1e-5)
        lz = select_data(tiny_llama, heads, pool, "activation_length_z", batch_size=4, positions=positions)
        assert activation_from_features(feats, heads, debias="length") == pytest.approx(lz.scores, abs=1e-4)
        ali = select_data(tiny_llama, heads, pool, "alignment", probe=probe, batch_size=4, positions=positions)
        assert alignment_from_features(feats, pfeats, heads) == pytest.approx(ali.scores, abs=1e-5)
    no_grad = head_features(tiny_llama, pool, batch_size=4, positions=positions, gradients=False)
    assert no_grad.grads is None
    assert torch.allclose(no_grad.norms, feats.norms, atol=1e-5)
    with pytest.raises(UserError):
        alignment_from_features(no_grad, pfeats, HEADS)
    with pytest.raises(UserError):
        activation_from_features(feats, [[4, 0]])


def _same_rows_but_near_ties(selected, model, tol):
    """``selected`` keeps ``model``'s rows, except rows whose model score lies within ``tol`` of the cut (float16
    rounding may order a near-tie the other way)."""
    cut = model.scores[model.selected[-1]]
    for i in set(selected) ^ set(model.selected):
        assert abs(model.scores[i] - cut) <= tol * max(1.0, abs(cut)), (i, model.scores[i], cut)
    assert len(selected) == len(model.selected)


@pytest.mark.parametrize("positions", ["all", "content"])
def test_head_record_serves_every_activation_selection(tiny_llama, pool, tmp_path, positions):
    """One no-grad pass records every head; any head set / ratio / activation-family method selected from the
    record keeps the model pass's rows with its scores: float32 in memory exactly (1e-5), float16 read back
    from disk up to its rounding (rows within that rounding of the cut may swap). Methods that need more than the statistic say so."""
    from p2d.method.features import head_norms, load_record, save_record, select_from_features

    feats = head_norms(tiny_llama, pool, batch_size=4, positions=(positions,))[positions]
    info = save_record(feats, tmp_path)
    assert info["shape"] == [len(pool), 4, 4] and info["bytes"] < len(pool) * 16 * 2 + 1024  # float16
    disk = load_record(tmp_path, {**info})
    assert disk.norms.dtype == torch.float16 and disk.extra["record"]
    for heads in (HEADS, [[0, 0]], [[2, 1], [2, 3], [0, 2]]):
        for method in ("activation", "activation_length_z"):
            for ratio in (0.2, 0.5):
                model = select_data(tiny_llama, heads, pool, method, ratio=ratio, batch_size=4, positions=positions)
                mem = select_from_features(feats, heads, method, ratio, tiny_llama.geometry)
                back = select_from_features(disk, heads, method, ratio, tiny_llama.geometry)
                assert mem.scores == pytest.approx(model.scores, abs=1e-5)
                tol = 2e-3 if method == "activation" else 2e-2  # a z-score divides the rounding by a bucket's spread
                assert back.scores == pytest.approx(model.scores, rel=tol, abs=tol)
                assert mem.selected == model.selected
                _same_rows_but_near_ties(back.selected, model, tol)
                assert back.extra["from_record"] and back.extra["heads"] == model.extra["heads"]
    with pytest.raises(UserError, match="runs the model"):
        select_from_features(feats, HEADS, "alignment")
    assert load_record(tmp_path, {**info, "shape": [3, 4, 4]}) is None  # files that do not match: not used


def test_head_norms_of_several_settings_in_one_pass(tiny_llama, pool):
    """One no-grad forward with a capture hook per answer-position setting gives each setting's norms (as the
    gradient pass captures them) and its own position counts."""
    from p2d.method.features import head_features, head_norms

    both = head_norms(tiny_llama, pool, batch_size=4, positions=("all", "content"))
    assert set(both) == {"all", "content"} and both["all"].grads is None
    for positions in ("all", "content"):
        with_grads = head_features(tiny_llama, pool, batch_size=4, positions=positions)
        assert torch.allclose(both[positions].norms, with_grads.norms, atol=1e-5)
        assert torch.equal(both[positions].lengths, with_grads.lengths)
    assert (both["content"].lengths < both["all"].lengths).all()


def test_content_positions_change_selection_scores(tiny_llama, pool, probe):
    for method in ("ablation", "activation", "alignment"):
        a = select_data(tiny_llama, HEADS, pool, method, probe=probe, positions="all")
        c = select_data(tiny_llama, HEADS, pool, method, probe=probe, positions="content")
        assert c.extra["positions"] == "content"
        assert a.scores != pytest.approx(c.scores, abs=1e-4), method
    with pytest.raises(UserError):
        select_data(tiny_llama, HEADS, pool, "activation", positions="nope")


def test_length_z_buckets():
    from p2d.method.selection_variants import length_z

    # two length groups whose raw scores differ only by a length offset -> identical z-scores
    lengths = [1] * 10 + [5] * 10
    base = [float(i % 10) for i in range(20)]
    raw = [v + (100.0 if n == 5 else 0.0) for v, n in zip(base, lengths)]
    z = length_z(raw, lengths)
    assert z[:10] == pytest.approx(z[10:])
    assert sum(z[:10]) == pytest.approx(0.0, abs=1e-12)
    # buckets below the minimum size merge with the next length; a remainder joins the last bucket
    z2 = length_z([1.0, 2.0, 3.0, 4.0, float("nan")], [1, 2, 3, 4, 0], min_bucket=2)
    assert z2[:2] == pytest.approx([-1.0, 1.0]) and z2[2:4] == pytest.approx([-1.0, 1.0])
    assert math.isnan(z2[4])
    z3 = length_z([1.0, 2.0, 3.0], [1, 1, 2], min_bucket=2)  # [1, 1] then remainder [2] -> one bucket of 3
    assert z3 == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert length_z([5.0, 5.0], [1, 1]) == [0.0, 0.0]


def test_prefilter_alignment_is_alignment_on_the_activation_top(tiny_llama, pool, probe):
    act = select_data(tiny_llama, HEADS, pool, "activation", batch_size=4)
    ali = select_data(tiny_llama, HEADS, pool, "alignment", probe=probe, batch_size=4)
    pre = select_data(tiny_llama, HEADS, pool, "prefilter_alignment", ratio=0.2, probe=probe, batch_size=4,
                      prefilter_factor=3.0)
    kept = sorted(range(len(pool)), key=lambda i: (-act.scores[i], i))[:6]  # 3 x 0.2 x 10
    assert pre.extra["prefilter_kept"] == 6 and pre.extra["prefilter_share"] == pytest.approx(0.6)
    for i in range(len(pool)):
        if i in kept:
            assert pre.scores[i] == pytest.approx(ali.scores[i], abs=1e-5)
        else:
            assert -3.0 < pre.scores[i] < -2.0
    rest = [i for i in range(len(pool)) if i not in kept]
    assert sorted(rest, key=lambda i: -pre.scores[i]) == sorted(rest, key=lambda i: (-act.scores[i], i))
    assert set(pre.selected) <= set(kept) and len(pre.selected) == 2
    everything = select_data(tiny_llama, HEADS, pool, "prefilter_alignment", ratio=0.5, probe=probe, batch_size=4)
    assert everything.scores == pytest.approx(ali.scores, abs=1e-5)  # 3 x 0.5 >= 1: nothing filtered
    with pytest.raises(UserError, match="probe"):
        select_data(tiny_llama, HEADS, pool, "prefilter_alignment")
    with pytest.raises(UserError, match="prefilter"):
        select_data(tiny_llama, HEADS, pool, "prefilter_alignment", probe=probe, prefilter_factor=0.5)


def test_plain_forward_seconds(tiny_llama, pool):
    from p2d.bench.components import plain_forward_seconds

    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    t = plain_forward_seconds(tiny_llama, pool, batch_size=4)
    assert 0 < t < 60
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.model.state_dict().items())
    with pytest.raises(UserError):
        plain_forward_seconds(tiny_llama, [])


def test_every_select_method_has_help():
    from p2d.method.selection import SELECT_METHOD_HELP

    assert set(SELECT_METHOD_HELP) == set(SELECT_METHODS)
    assert all(SELECT_METHOD_HELP[m].startswith(m + ":") for m in SELECT_METHODS)


def test_head_free_selectors(tiny_llama, pool, probe):
    """tfidf and bm25 read only the prompt's words (no model); hidden is the mean of one layer's output over
    every token, the same as transformers' own hidden states, from a forward that stops there."""
    from p2d.data.encoding import collate, encode
    from p2d.method.selection_baselines import bm25_scores, mean_hidden_states, tfidf_scores

    for method in ("tfidf", "bm25"):
        sel = select_data(None, None, pool, method, ratio=0.5, probe=probe)
        assert {pool[i].task for i in sel.selected} == {"addition"}  # the probe says "Add a and b."
        assert sel.extra["uses_model"] is False
    assert tfidf_scores(pool, probe) == tfidf_scores(pool, probe) and len(bm25_scores(pool, probe)) == len(pool)
    layer = 1
    h, ok, stopped = mean_hidden_states(tiny_llama, pool, layer, batch_size=3, max_length=64)
    assert all(ok) and not stopped and h.shape == (len(pool), tiny_llama.geometry.hidden_size)
    items = encode(pool[:2], tiny_llama.tokenizer, 64)
    for item, want in zip(items, h[:2]):
        b = collate([item], 0)
        with torch.no_grad():
            out = tiny_llama.model(input_ids=b["input_ids"], output_hidden_states=True)
        assert torch.allclose(out.hidden_states[layer + 1][0].mean(dim=0), want, atol=1e-5)
    sel = select_data(tiny_llama, None, pool, "hidden", ratio=0.3, probe=probe, hidden_layer=2)
    assert sel.extra["hidden_layer"] == 2 and all(math.isfinite(s) and -1 <= s <= 1 for s in sel.scores)
    with pytest.raises(UserError, match="probe"):
        select_data(None, None, pool, "tfidf", ratio=0.3)
    with pytest.raises(UserError, match="hidden layer"):
        select_data(tiny_llama, None, pool, "hidden", ratio=0.3, probe=probe, hidden_layer=99)
