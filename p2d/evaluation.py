"""Evaluation: exact-match accuracy of greedy answers and mean answer-token loss.

Answers are generated greedily from the prompt (chat template when the tokenizer has one), at most
``max_new_tokens`` new tokens (default: the longest gold answer in tokens + 8, capped at 64), and
compared to the gold answer after normalisation (case, whitespace, trailing punctuation).
``contains`` also reports how often the normalised gold answer appears inside the prediction as a
whole word — a model that answers in full sentences scores there before it learns the format.
Plain-text samples (no prompt) count towards the loss only.

Behaviour checks: a row with a ``check`` field (`p2d.checks`: a JSON wrapper, a closing line, a
refusal, an exact function value) is scored by its check instead of exact match: its pass counts as
the row's accuracy, and each named part of the check (``format``, ``content``, ``refused`` ...) is
reported as a rate, overall (``EvalResult.checks``) and per task (``by_task``). ``metric`` says
``check`` when every generated row had one, ``exact_match+check`` when some had. The alignment pools
(`p2d.data.builtin_align`) are scored this way: for them a benchmark should report `evaluate`'s
(generated) figures; `forced_eval` stays a cheap proxy there (its strict match asks for the written
gold answer token for token, which many passing replies are not, and its answer loss says how close
the model is to the target rows' wording).

`forced_eval` is the cheap per-row variant the benchmark uses: one teacher-forced forward per batch
gives every row's answer loss and whether greedy decoding would reproduce the gold answer token for
token (``strict``: the argmax at every answer position up to and including the first end-of-turn
token is the gold token; by induction that is exactly when greedy generation outputs the gold
tokens and then stops). It is stricter than `exact_match` (no normalisation of case, punctuation or
spacing, and the same tokenisation as the gold answer) and about ten times cheaper than generating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .checks import check_reply, contains_answer, exact_match, parse_check
from .data.encoding import collate, encode, encode_prompts, filler_batch
from .data.formats import Sample
from .distributed import Processes
from .errors import UserError
from .method.gating import StopInside, answer_logits, answer_token_losses, stop_inside
from .progress import ProgressFn, StopFn, report

EVAL_FILES = {"before": "eval_before.json", "after": "eval_after.json"}


@dataclass
class EvalResult:
    accuracy: float | None
    loss: float | None
    n: int
    contains: float | None = None
    n_generated: int = 0
    examples: list[dict] = field(default_factory=list)
    by_task: dict = field(default_factory=dict)  # task -> {"accuracy", "contains", "n"} (labelled rows only)
    partial: bool = False  # stopped before every row was generated: the figures cover the rows done
    other_tasks: dict = field(default_factory=dict)  # held-out rows of the pool's other tasks, like by_task
    metric: str = "exact_match"  # what accuracy is: "exact_match" (generated, normalised), "check" (behaviour
    # checks, see p2d.checks), "exact_match+check" (some rows had a check) or "strict" (forced_eval)
    per_row: dict | None = None  # forced evaluation: {"strict": [0/1/None ...], "loss": [...]} in row order
    checks: dict = field(default_factory=dict)  # named part of the rows' checks -> rate over the rows that have it
    other_checks: dict = field(default_factory=dict)  # the same over the other tasks' held-out rows
    tokens: dict = field(default_factory=dict)  # this process's batches: {"loss" | "prompts" | "generated":
    # {"tokens": real, "padded_tokens": computed once padded to each batch's longest member}}

    def to_dict(self, with_examples: bool = False) -> dict:
        d = asdict(self)
        if not with_examples:
            d.pop("examples")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: end of sequence and the end-of-turn tokens of the usual chat
    templates that the tokenizer has."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(lm, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 32,
                     max_length: int = 512, progress: ProgressFn = None, desc: str = "generate",
                     should_stop: StopFn = None, counts: dict | None = None) -> list[str | None]:
    """Greedy answers for chat samples, batched with left padding (sorted by length). A stop request
    ends the current batch (one process: within a layer, `p2d.method.gating.stop_inside`; several: after
    the batch); the samples not answered get None. ``counts`` (a dict) receives the real and padded token
    counts of the prompts (``prompts``) and of the generated part (``generated``: a row's tokens up to its
    first stop token, against every row of a batch generating until the batch stops)."""
    tok, model = lm.tokenizer, lm.model
    prompts = encode_prompts(samples, tok, max_length=max_length)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str | None] = [None] * len(prompts)
    pad = tok.pad_token_id
    stops = stop_token_ids(tok)
    was_training = model.training
    model.eval()
    procs = Processes.current()  # a sharded model: every process generates as many batches, in step
    starts = list(range(0, len(order), batch_size))
    try:
        for n in range(procs.lockstep(len(starts))):
            if should_stop is not None and should_stop():
                break
            start = starts[n] if n < len(starts) else None
            idx = order[start:start + batch_size] if start is not None else []
            prompt_rows = [prompts[i] for i in idx] or filler_batch(pad)["input_ids"].tolist()  # a filler
            width = max(len(p) for p in prompt_rows)
            ids = torch.full((len(prompt_rows), width), pad if pad is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(prompt_rows), width), dtype=torch.long)
            for row, p in enumerate(prompt_rows):
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            try:  # one process: the stop is also asked inside the batch, before every layer of every token
                with stop_inside(model, should_stop if procs.world == 1 else None):
                    out = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=pad, eos_token_id=stops, synced_gpus=procs.sharded)
            except StopInside:  # this batch's samples stay None, as those not reached
                break
            for row, i in enumerate(idx):
                answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
            if counts is not None and idx:
                new = out[:len(idx), width:].cpu()
                ends = torch.isin(new, torch.tensor(stops))
                real = [int(e.nonzero()[0]) + 1 if e.any() else new.shape[1] for e in ends]
                _add_counts(counts, "prompts", sum(len(p) for p in prompt_rows[:len(idx)]), len(idx) * width)
                _add_counts(counts, "generated", sum(real), new.numel())
            if idx:
                report(progress, min(start + batch_size, len(order)), len(order), desc)
    finally:
        model.train(was_training)
    return answers


def mean_answer_loss(lm, samples: list[Sample], batch_size: int = 16, max_length: int = 256,
                     progress: ProgressFn = None, should_stop: StopFn = None) -> float | None:
    """Mean cross-entropy over all answer tokens of the samples (token-weighted)."""
    total, count = answer_loss_sums(lm, samples, batch_size, max_length, progress, should_stop)
    return total / count if count else None


def _add_counts(counts: dict, key: str, real: int, padded: int) -> None:
    c = counts.setdefault(key, {"tokens": 0, "padded_tokens": 0})
    c["tokens"] += int(real)
    c["padded_tokens"] += int(padded)


@torch.no_grad()
def answer_loss_sums(lm, samples: list[Sample], batch_size: int = 16, max_length: int = 256,
                     progress: ProgressFn = None, should_stop: StopFn = None,
                     counts: dict | None = None) -> tuple[float, int]:
    """(summed cross-entropy, answer tokens) over the samples; ``counts`` (a dict) receives the real and
    padded token counts of the batches (``loss``)."""
    encoded = encode(samples, lm.tokenizer, max_length=max_length)
    encoded = sorted(encoded, key=lambda e: len(e["input_ids"]))
    total, count = 0.0, 0
    model = lm.model
    starts = list(range(0, len(encoded), batch_size))
    for n in range(Processes.current().lockstep(len(starts))):  # a sharded model: as many batches everywhere
        if should_stop is not None and should_stop():
            break
        if n >= len(starts):  # a filler: one token, no answer, the loss dropped
            answer_token_losses(model, {k: v.to(lm.device) for k, v in filler_batch(lm.tokenizer.pad_token_id).items()})
            continue
        start = starts[n]
        batch = collate(encoded[start:start + batch_size], lm.tokenizer.pad_token_id)
        if counts is not None:
            _add_counts(counts, "loss", int(batch["attention_mask"].sum()), batch["input_ids"].numel())
        batch = {k: v.to(lm.device) for k, v in batch.items()}
        token_loss, _ = answer_token_losses(model, batch)
        total += float(token_loss.sum())
        count += token_loss.numel()
        report(progress, min(start + batch_size, len(encoded)), len(encoded), "eval loss")
    return total, count


@dataclass
class ForcedEval:
    """Per-row results of `forced_eval`, in the order of the samples (rows without answer tokens after
    truncation: ``strict`` None, ``loss`` None)."""

    strict: list[bool | None]
    loss: list[float | None]
    tasks: list[str | None]
    tokens: dict = field(default_factory=dict)  # {"loss": {"tokens", "padded_tokens"}} of its batches

    @property
    def accuracy(self) -> float | None:
        vals = [v for v in self.strict if v is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def mean_loss(self) -> float | None:
        vals = [v for v in self.loss if v is not None]
        return sum(vals) / len(vals) if vals else None

    def by_task(self) -> dict[str, dict]:
        out: dict[str, list] = {}
        for t, v in zip(self.tasks, self.strict):
            if t is not None and v is not None:
                out.setdefault(t, []).append(v)
        return {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(out.items())}

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.mean_loss, "n": len(self.strict),
                "strict": [None if v is None else int(v) for v in self.strict],
                "row_loss": [None if v is None else round(v, 5) for v in self.loss]}


@torch.no_grad()
def forced_eval(lm, samples: list[Sample], batch_size: int = 16, max_length: int = 256) -> ForcedEval:
    """Per row: strict greedy match and mean answer loss, from one teacher-forced forward per batch (see
    the module docstring). One process only (the benchmark's path)."""
    samples = [Sample(s.prompt, s.answer, s.task, s.row, i, s.kind) for i, s in enumerate(samples)]
    encoded = sorted(encode(samples, lm.tokenizer, max_length=max_length), key=lambda e: len(e["input_ids"]))
    stops = torch.tensor(stop_token_ids(lm.tokenizer))
    strict: list[bool | None] = [None] * len(samples)
    loss: list[float | None] = [None] * len(samples)
    tokens: dict = {}
    for start in range(0, len(encoded), batch_size):
        group = encoded[start:start + batch_size]
        batch = {k: v.to(lm.device) for k, v in collate(group, lm.tokenizer.pad_token_id).items()}
        _add_counts(tokens, "loss", sum(len(it["input_ids"]) for it in group), batch["input_ids"].numel())
        logits, targets, rows = answer_logits(lm.model, batch)
        ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").cpu()
        hit = (logits.argmax(dim=-1) == targets).cpu()
        targets, rows = targets.cpu(), rows.cpu()
        for r, item in enumerate(group):
            sel = rows == r
            t, h = targets[sel], hit[sel]
            is_stop = torch.isin(t, stops).nonzero()
            upto = int(is_stop[0]) + 1 if len(is_stop) else len(t)  # the answer and its end-of-turn token
            strict[item["index"]] = bool(h[:upto].all())
            loss[item["index"]] = float(ce[sel].mean())
    return ForcedEval(strict, loss, [s.task for s in samples], tokens)


def row_check(sample: Sample) -> dict | None:
    """The sample's behaviour check (`p2d.checks.parse_check` of its row's ``check``), None without one."""
    return parse_check(sample.row.get("check")) if isinstance(sample.row, dict) else None


def score_reply(sample: Sample, pred: str, check: dict | None) -> tuple[bool, dict | None]:
    """A generated reply's hit (``check``, the row's check, when there is one, else exact match) and the
    check's named parts (None without a check)."""
    if check is None:
        return exact_match(pred, sample.answer), None
    parts = check_reply(check, pred)
    return parts["pass"], {k: v for k, v in parts.items() if k != "pass"}


def part_rates(parts: list[dict | None]) -> dict[str, float]:
    """name -> share of true among the rows whose check has that part."""
    seen: dict[str, list[bool]] = {}
    for p in parts:
        for k, v in (p or {}).items():
            seen.setdefault(k, []).append(bool(v))
    return {k: sum(v) / len(v) for k, v in sorted(seen.items())}


def default_max_new_tokens(lm, samples: list[Sample], cap: int = 64) -> int:
    longest = max((len(lm.tokenizer(s.answer, add_special_tokens=False)["input_ids"]) for s in samples), default=8)
    return max(1, min(cap, longest + 8))


def evaluate(lm, samples: list[Sample], batch_size: int = 16, max_new_tokens: int | None = None,
             limit: int | None = None, max_length: int = 256, n_examples: int = 5,
             progress: ProgressFn = None, should_stop: StopFn = None) -> EvalResult:
    """Exact-match accuracy (or a row's behaviour check, see the module docstring), contains-accuracy
    and answer loss of `lm` on `samples` (per task too, when rows carry task labels). A stop request
    ends early with ``partial=True``."""
    samples = list(samples)[:limit] if limit else list(samples)
    if not samples:
        raise UserError("the eval set is empty: give an eval file with at least one usable row")
    procs = Processes.current()  # several: each evaluates every n-th row, the results are gathered
    should_stop = procs.agreed(should_stop)
    mine = procs.shard(samples)
    chat_all = [s for s in samples if s.kind != "text"]
    chat = [s for s in mine if s.kind != "text"]
    row_checks = {id(s): row_check(s) for s in chat_all}  # a malformed check fails here, before any generation
    tokens: dict = {}
    total, count = answer_loss_sums(lm, mine, batch_size, max_length, progress, should_stop, counts=tokens)
    if procs.world > 1:
        total, count = procs.total(total), procs.total(count)
    loss = total / count if count else None
    accuracy = contains = None
    examples: list[dict] = []
    by_task: dict[str, dict] = {}
    checks: dict[str, float] = {}
    metric = "exact_match"
    partial = should_stop is not None and should_stop()
    if chat_all and not partial:
        mnt = max_new_tokens or default_max_new_tokens(lm, chat_all)
        preds = generate_answers(lm, chat, batch_size=batch_size, max_new_tokens=mnt,
                                 max_length=max_length, progress=progress, should_stop=should_stop, counts=tokens)
        if procs.world > 1:  # back in the order of the samples: row i was evaluated by process i % world
            it = iter(preds)
            parts = procs.gather([next(it) if s.kind != "text" else None for s in mine])
            every = [parts[i % procs.world][i // procs.world] for i in range(len(samples))]
            preds = [p for s, p in zip(samples, every) if s.kind != "text"]
            chat = chat_all
        done = [(s, p) for s, p in zip(chat, preds) if p is not None]
        partial = len(done) < len(chat)
        scored = [score_reply(s, p, row_checks[id(s)]) for s, p in done]
        hits = [h for h, _ in scored]
        parts = [pt for _, pt in scored]
        has = [contains_answer(p, s.answer) for s, p in done]
        if done:
            accuracy = sum(hits) / len(done)
            contains = sum(has) / len(done)
        for (s, p), h, c, pt in zip(done, hits, has, parts):
            if s.task is not None:
                row = by_task.setdefault(s.task, {"hits": 0, "contains": 0, "n": 0, "parts": []})
                row["hits"] += h
                row["contains"] += c
                row["n"] += 1
                row["parts"].append(pt)
        by_task = {k: {"accuracy": v["hits"] / v["n"], "contains": v["contains"] / v["n"], "n": v["n"],
                       **part_rates(v["parts"])} for k, v in sorted(by_task.items())}
        checks = part_rates(parts)
        n_checked = sum(pt is not None for pt in parts)
        if n_checked:
            metric = "check" if n_checked == len(parts) else "exact_match+check"
        for (s, p), h, pt in list(zip(done, hits, parts))[:n_examples]:
            prompt = s.prompt[-1]["content"] if s.prompt else ""
            examples.append({"index": s.index, "prompt": prompt, "gold": s.answer, "prediction": p, "correct": h,
                             **({"check": pt} if pt is not None else {})})
        n_generated = len(done)
    else:
        n_generated = 0
    if loss is not None and not math.isfinite(loss):
        loss = None
    return EvalResult(accuracy, loss, len(samples), contains, n_generated, examples, by_task, partial,
                      metric=metric, checks=checks, tokens=tokens)
