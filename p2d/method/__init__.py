"""P2D's method: stage 1 (which heads) and stage 2 (which data), and what the two share.

What belongs here, one job per module:

- ``heads.py``: stage 1. `score_heads`, the `HeadScores` it returns (``heads.json``) and the registry of
  head methods; the default (``gradient_logratio``, a contrast of gate importances) first, then the
  other contrasts of the same importance maps and the ``random`` control;
- ``heads_variants.py``: the head methods that need their own machinery (``shift``, ``shift_sgd``,
  ``taylor``, ``lofit``);
- ``selection.py``: stage 2. `select_data`, the `Selection` it returns (``selection.json``,
  ``scores.jsonl``, ``selected.jsonl``) and the registry of selection methods; the default
  (``activation``) first, then the ``random`` control;
- ``selection_variants.py``: the head-guided selection variants (``ablation``, ``alignment``,
  ``activation_length_z``, ``prefilter_alignment``);
- ``selection_baselines.py``: the selectors that use no heads (``tfidf``, ``bm25``, ``hidden``): the
  cheap alternatives head-guided selection has to beat;
- ``features.py``: every head's per-row statistics from one pass, and any head set's selection
  scores read off them without the model;
- ``gating.py``: the hooks that reach the heads (gates and output capture on each layer's output
  projection) and the answer-position masks and losses every score is taken at;
- ``scoring.py``: what both stages share: share checks and top shares, encoded length-sorted batches,
  per-sample answer losses.

Not here: training the heads (`p2d.training`, `p2d.adapter`), the run's sequence of stages
(`p2d.pipeline`), the comparison cells (`p2d.cells`) and what only the benchmark measures
(`p2d.bench`).
"""
