"""`python -m p2d bench`: P2D against selectors without heads, random heads, LoRA and full fine-tuning, measured.

What belongs here, one job per module (what a run does is not here: a split is a `p2d.pipeline.Run`,
every trained cell a `p2d.cells` cell, every score a `p2d.method` method):

- ``config.py``: `BenchConfig` (the command's flags), the splits, selectors and classic cells;
- ``split.py``: one split at one seed: its run (data, P2D's heads and selection) and its unit folder;
- ``benchmark.py``: the units in order (base model, head sets, selections, feature pass, sweeps,
  training cells), resumable, and `run_bench`;
- ``stats.py``: what a selection holds (target share, twins, AUROC), paired bootstrap differences,
  null comparisons and the smallest detectable effect;
- ``choose.py``: the rule that chooses the product's defaults from the choice seed;
- ``report.py``: results.json, results.md and the AER-vs-accuracy figure, from the units;
- ``components.py``: the cost of each part of a step and of every scoring method, as ratios to one
  plain forward.

A new comparison is a cell of `p2d.cells` plus its unit here; a new statistic goes into ``stats.py``.
"""
