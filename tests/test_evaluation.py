import pytest

from p2d.data.loading import load_records
from p2d.errors import UserError
from p2d.checks import contains_answer, exact_match, normalize_answer
from p2d.evaluation import evaluate, generate_answers


def test_normalisation():
    assert normalize_answer("  The   Answer.  ") == "the answer"
    assert normalize_answer('"42"!') == "42"
    assert exact_match("7,19, 42", "7, 19, 42")
    assert exact_match("Paris.", "paris")
    assert not exact_match("Paris is nice", "paris")
    assert contains_answer("The capital is Paris.", "Paris")
    assert not contains_answer("Parisian food", "Paris")
    assert not contains_answer("anything", "")


def _samples(rows):
    return load_records(rows).samples


def test_evaluate_tiny_model_shapes(tiny_llama):
    samples = _samples([{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
                       + [{"text": "just some plain text for the loss"}][:0])
    res = evaluate(tiny_llama, samples, batch_size=2, max_new_tokens=4, n_examples=3)
    assert res.n == 5 and res.n_generated == 5
    assert res.accuracy == 0.0  # a random model does not answer correctly
    assert res.loss is not None and res.loss > 5  # near log(vocab) for random weights
    assert len(res.examples) == 3 and {"prompt", "gold", "prediction", "correct"} <= set(res.examples[0])
    d = res.to_dict()
    assert {"accuracy", "loss", "n"} <= set(d) and "examples" not in d


def test_batched_generation_matches_unbatched(tiny_llama):
    samples = _samples([{"prompt": "Hi" + " there" * i, "response": "ok"} for i in range(4)])
    batched = generate_answers(tiny_llama, samples, batch_size=4, max_new_tokens=5)
    single = [generate_answers(tiny_llama, [s], batch_size=1, max_new_tokens=5)[0] for s in samples]
    assert batched == single


def test_text_only_samples_give_loss_only(tiny_llama):
    res = evaluate(tiny_llama, _samples([{"text": "hello world, this is plain text"}]), batch_size=1)
    assert res.accuracy is None and res.loss is not None and res.n == 1


def test_empty_eval_set_is_user_error(tiny_llama):
    with pytest.raises(UserError, match="empty"):
        evaluate(tiny_llama, [])


@pytest.mark.slow
def test_embedded_model_knows_paris(embedded):
    samples = _samples([{"question": "What is the capital of France?", "answer": "Paris"}])
    pred = generate_answers(embedded, samples, max_new_tokens=20)[0]
    assert "Paris" in pred
    res = evaluate(embedded, samples, max_new_tokens=20)
    assert res.contains == 1.0
    q = "What is the capital of France?"
    right = evaluate(embedded, _samples([{"question": q, "answer": "The capital of France is Paris."}]), max_new_tokens=1)
    wrong = evaluate(embedded, _samples([{"question": q, "answer": "The capital of France is Madrid."}]), max_new_tokens=1)
    assert right.loss < wrong.loss


def test_evaluation_reports_real_and_padded_tokens(tiny_llama):
    """The loss batches, the prompts and the generated part each report real and padded tokens: real tokens are
    the encoded rows' lengths, padding is what each batch's longest member adds."""
    from p2d.cells import evaluate_cell
    from p2d.data.encoding import encode, encode_prompts

    samples = _samples([{"prompt": "Hi" + " there" * (3 * i), "response": "ok" * (i + 1)} for i in range(5)])
    res = evaluate(tiny_llama, samples, batch_size=2, max_new_tokens=3, max_length=64, n_examples=0)
    t = res.tokens
    assert t["loss"]["tokens"] == sum(len(e["input_ids"]) for e in encode(samples, tiny_llama.tokenizer, 64))
    assert t["prompts"]["tokens"] == sum(len(p) for p in encode_prompts(samples, tiny_llama.tokenizer, 64))
    assert t["loss"]["padded_tokens"] > t["loss"]["tokens"] and t["prompts"]["padded_tokens"] > t["prompts"]["tokens"]
    assert 5 <= t["generated"]["tokens"] <= t["generated"]["padded_tokens"] <= 5 * 3
    forced = evaluate_cell(tiny_llama, samples, batch_size=2, max_length=64, forced=True)
    assert forced.tokens["loss"] == t["loss"]


def test_a_stop_part_way_through_a_generation_batch_ends_it_there(tiny_llama):
    """The public demo's job cap was asked between batches only: a generation batch is a forward per new token, so
    a capped evaluation ran on to the end of its batch. One process now also asks before every layer: a stop asked
    during the batch's second token leaves the batch unanswered (before, all its answers were generated)."""
    from p2d.geometry import decoder_layers

    samples = _samples([{"prompt": f"Say {i}", "response": str(i)} for i in range(6)])
    asked, forwards = {"stop": False}, []

    def flip(module, args, output):
        forwards.append(1)
        asked["stop"] = asked["stop"] or len(forwards) == 2

    hook = decoder_layers(tiny_llama.model)[0].register_forward_hook(flip)
    try:
        answers = generate_answers(tiny_llama, samples, batch_size=4, max_new_tokens=8,
                                   should_stop=lambda: asked["stop"])
    finally:
        hook.remove()
    assert asked["stop"] and answers == [None] * len(samples), answers
    assert all(not m._forward_pre_hooks for m in decoder_layers(tiny_llama.model))
