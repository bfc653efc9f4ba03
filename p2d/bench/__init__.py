"""`python -m p2d bench`: P2D against full fine-tuning, LoRA and its own controls, measured.

- ``config.py``  `BenchConfig` (the command's flags) and the cells (trainable part x training data)
- ``cells.py``   data splits, the trainable parts, one measured training cell, memory peaks, metrics
- ``runner.py``  the resumable run: units saved as JSON, the learning-rate sweep, the order of work
- ``report.py``  results.json, results.md and the AER-vs-accuracy figure
"""
