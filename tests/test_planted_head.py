"""A planted task head: do the head scores find it, and do the selection scores find the rows that need it?

Construction (a tiny random Llama like tests/conftest.py's: 4 layers x 4 query heads, 2 kv heads,
head_dim 16, the real SmolLM2 tokenizer):

- task A ("Repeat the word.\\nW\\nW\\nW" -> "W") can only be solved by copying W from the prompt; task B
  ("Pick any word." -> a word from a disjoint list) gives no clue, so no head can help it;
- the 12 words of A get embeddings of norm 2 (the random ones have ~0.16), so that one head can move
  the tied unembedding's logits enough to copy them;
- only the q rows and o columns of one query head P are trained (its kv head's k/v rows stay random,
  so the other query head of that kv group is not trained along with it) on A and B rows, loss on the
  answer *content* position, until A's loss is below 0.5 nats;
- the trained head is then turned down (its o_proj columns scaled) until A's loss is 2.5 nats. At the
  trained point the loss is flat in the head's scale (the final RMSNorm makes the logits nearly
  invariant to it once the head dominates the residual), so a first-order score would see nothing; at
  2.5 nats turning the head up still lowers A's loss. That sensitivity is what gradient scores
  measure, and it is asserted as a precondition, together with: ablating P costs A several nats and B
  almost nothing.

Then every head method scores the heads with the A probe against a B pool, and the selection scores
rank a pool mixing A and B rows. What each method is expected to do here:

- ``gradient`` and ``gradient_logratio`` rank P first (|dL/dgate| is large on A and small on B for P
  only): asserted, rank 0;
- ``gradient_layer``, ``taylor``, ``lofit``: asserted to select P at ratio 0.25 (rank < 4), not to rank
  it first;
- ``shift`` (Adam, sign-equalised) and ``shift_sgd`` (W1 between softmaxes of ~4,000 flattened
  weights, a very indirect distance) are not asserted; ``random`` is a control;
- selection: ``ablation`` needs P by definition (asserted: every A row above every B row);
  ``alignment`` with P among 4 heads (asserted AUROC >= 0.9); ``activation`` is *not* expected to: it
  asks whether P's output is louder on a row, and a copy head is not louder on rows where it has
  something to copy, so no test asserts it.

Measured with this file's `_plant` over 6 plantings (seed, layer, head) = (0,3,1) (1,3,1) (0,2,2)
(2,1,0) (3,3,2) (4,2,1), content positions, scoring seed 1, rank of P (0 = first): gradient 0 0 0 0 0 0;
gradient_logratio 0 0 0 0 0 0; gradient_layer 0 0 0 0 1 0 (per-layer shares amplify noise in layers
where every head matters little); taylor 0 0 0 0 0 4 (the elementwise |g * w| of many small noisy
gradients builds a floor that grows with a head's weight count and size); lofit 0 0 1 1 0 0 (Adam
moves every scale by about lr per step while its gradient keeps its sign); shift 2 2 0 0 1 0;
shift_sgd 1 0 4 1 5 1; random 7 7 4 3 14 5. Selection AUROC (A rows above B rows): ablation 1.0 in
all 6, alignment (4 heads) 0.92-1.0, activation (H = {P}) 0.34-0.78. The test runs the first and the
third planting (one head in the last layer, one in a middle layer).
"""

import random

import pytest
import torch

from p2d.adapter import HeadAdapter
from p2d.data.encoding import collate, encode, iter_batches
from p2d.data.loading import load_records
from p2d.method.gating import HeadGate, answer_losses, content_positions, special_token_ids
from p2d.method.heads import score_heads
from p2d.method.selection import select_data

WORDS = ["apple", "river", "chair", "cloud", "bread", "horse", "stone", "green", "house", "water", "music", "paper"]
OTHER = ["table", "sun", "dog", "cat", "tree", "book", "car", "road", "fish", "bird", "door", "milk"]
#: (seed, planted layer, planted head): one head in the last layer, one in a middle layer
PLANTINGS = [(0, 3, 1), (0, 2, 2)]
FIRST = ("gradient", "gradient_logratio")
SELECTED_AT_QUARTER = ("gradient_layer", "taylor", "lofit")

pytestmark = pytest.mark.slow  # every test trains a model until a head is planted (the module fixture)


def _auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


class Planted:
    def __init__(self, lm, head, probe, pool_b, mixed, losses):
        self.lm, self.head, self.probe, self.pool_b, self.mixed, self.losses = lm, head, probe, pool_b, mixed, losses

    def rank(self, hs) -> int:
        flat = sorted(((hs.scores[l][h], l, h) for l in range(4) for h in range(4)), key=lambda t: (-t[0], t[1], t[2]))
        return [(l, h) for _, l, h in flat].index(self.head)


def _batches(lm, samples, batch_size, special, shuffle=False, seed=0):
    enc = encode(samples, lm.tokenizer, 128)
    out = []
    for items in iter_batches(enc, batch_size, shuffle=shuffle, seed=seed, sort_by_length=True):
        b = collate(items, lm.tokenizer.pad_token_id)
        b["positions"] = content_positions(b["labels"], special)
        out.append(b)
    return out


def _loss(lm, batches, gate_value=None, head=None):
    """Mean content-position loss; optionally with ``head``'s output multiplied by ``gate_value``."""
    vals = []
    with torch.no_grad(), HeadGate(lm.model, lm.geometry) as gate:
        if gate_value is not None:
            g = torch.ones(lm.geometry.n_q_heads)
            g[head[1]] = gate_value
            gate.set_gate(head[0], g)
        for b in batches:
            vals += answer_losses(lm.model, b, positions=b["positions"]).tolist()
    return sum(vals) / len(vals)


def _plant(tokenizer, tmp_path, seed, layer, head) -> Planted:
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d.models import load_model

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in WORDS + OTHER]
    assert all(len(i) == 1 for i in ids)  # one token each, also right after a newline
    word_ids = [i[0] for i in ids[:len(WORDS)]]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[word_ids] = emb[word_ids] / emb[word_ids].norm(dim=1, keepdim=True) * 2.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    special = special_token_ids(tokenizer)

    rng = random.Random(seed)
    rows_a = [{"instruction": f"Repeat the word.\n{w}\n{w}\n{w}", "output": w, "task": "A"}
              for w in (rng.choice(WORDS) for _ in range(264))]
    rows_b = [{"instruction": "Pick any word.", "output": w, "task": "B"} for w in (rng.choice(OTHER) for _ in range(128))]
    train = _batches(lm, load_records(rows_a[:200] + rows_b[:64]).samples, 16, special, shuffle=True, seed=seed)
    probe = load_records(rows_a[200:232]).samples
    pool_b = load_records(rows_b[64:96]).samples
    mixed = load_records(rows_a[232:264] + rows_b[96:128]).samples
    probe_b, pool_bb = _batches(lm, probe, 32, special), _batches(lm, pool_b, 32, special)

    for p in lm.model.parameters():
        p.requires_grad_(False)
    adapter = HeadAdapter(lm.geometry, [[layer, head]], projections=("q", "o"))
    adapter.attach(lm.model)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    step = 0
    for step in range(1, 401):
        b = train[(step - 1) % len(train)]
        loss = answer_losses(lm.model, b, positions=b["positions"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 and _loss(lm, probe_b) < 0.5:
            break
    adapter.detach()
    adapter.merge_into(lm.model)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    assert _loss(lm, probe_b) < 0.5, f"planting did not learn the copy in {step} steps"
    lo, hi = 0.0, 1.0  # turn the head down until A's loss is 2.5 nats
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _loss(lm, probe_b, mid, (layer, head)) > 2.5 else (lo, mid)
    d = lm.geometry.head_dim
    with torch.no_grad():
        lm.geometry.output_projection(lm.model, layer).weight[:, head * d:(head + 1) * d] *= hi
    losses = {"a": _loss(lm, probe_b), "a_ablated": _loss(lm, probe_b, 0.0, (layer, head)),
              "a_up": _loss(lm, probe_b, 1.2, (layer, head)), "b": _loss(lm, pool_bb),
              "b_ablated": _loss(lm, pool_bb, 0.0, (layer, head)), "b_up": _loss(lm, pool_bb, 1.2, (layer, head)),
              "steps": step, "turned_down_to": hi}
    return Planted(lm, (layer, head), probe, pool_b, mixed, losses)


@pytest.fixture(scope="module", params=PLANTINGS, ids=[f"seed{s}-L{l}H{h}" for s, l, h in PLANTINGS])
def planted(request, tokenizer, tmp_path_factory):
    seed, layer, head = request.param
    return _plant(tokenizer, tmp_path_factory.mktemp(f"planted-{seed}-{layer}-{head}"), seed, layer, head)


def test_planting_preconditions(planted):
    """A needs the head (ablation costs it > 5 nats) and is sensitive to it (turning it up 20% lowers
    A's loss by > 0.3 nats); B neither needs it nor reacts to it."""
    loss = planted.losses
    assert 2.3 < loss["a"] < 2.7
    assert loss["a_ablated"] - loss["a"] > 5.0
    assert loss["a"] - loss["a_up"] > 0.3
    assert abs(loss["b_ablated"] - loss["b"]) < 0.2
    assert abs(loss["b_up"] - loss["b"]) < 0.1


@pytest.mark.parametrize("method", FIRST)
def test_gradient_scores_rank_planted_head_first(planted, method):
    hs = score_heads(planted.lm, planted.probe, method, ratio=0.25, pool=planted.pool_b, batch_size=8,
                     positions="content")
    assert planted.rank(hs) == 0, (method, hs.scores)


def test_gradient_finds_it_with_all_positions_too(planted):
    hs = score_heads(planted.lm, planted.probe, "gradient", ratio=0.25, pool=planted.pool_b, batch_size=8,
                     positions="all")
    assert planted.rank(hs) == 0


@pytest.mark.parametrize("method", SELECTED_AT_QUARTER)
def test_other_importance_scores_select_planted_head(planted, method):
    hs = score_heads(planted.lm, planted.probe, method, ratio=0.25, pool=planted.pool_b, batch_size=8,
                     positions="content")
    assert [planted.head[0], planted.head[1]] in hs.selected, (method, planted.rank(hs))


def test_ablation_ranks_rows_that_need_the_head_first(planted):
    is_a = [s.task == "A" for s in planted.mixed]
    sel = select_data(planted.lm, [list(planted.head)], planted.mixed, "ablation", ratio=0.5, batch_size=8,
                      positions="content")
    assert min(s for s, a in zip(sel.scores, is_a) if a) > max(s for s, a in zip(sel.scores, is_a) if not a)
    assert sorted(sel.selected) == [i for i, a in enumerate(is_a) if a]


def test_alignment_ranks_rows_that_need_the_head_first(planted):
    is_a = [s.task == "A" for s in planted.mixed]
    others = [[0, 1], [1, 3], [2, 0]] if planted.head[0] == 3 else [[0, 1], [1, 3], [3, 0]]
    heads = [list(planted.head)] + others
    for positions in ("content", "all"):
        sel = select_data(planted.lm, heads, planted.mixed, "alignment", ratio=0.5, probe=planted.probe,
                          batch_size=8, positions=positions)
        assert _auroc(sel.scores, is_a) >= 0.9, positions
