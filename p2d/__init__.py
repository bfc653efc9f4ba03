"""P2D Studio: find task-sensitive attention heads, select data with them, tune only those heads.

The package follows the pipeline; one module, one job (README, "Project layout"):

- the model and its heads: ``models.py``, ``geometry.py``;
- the data: ``data/`` (files and datasets read into samples, encoding, the built-in pools);
- the method's stages 1 and 2: ``method/`` (head scoring, data selection, their registries, the gates);
- stage 3: ``adapter.py`` (the head adapter and its names), ``training.py`` (the loop);
- measuring: ``evaluation.py``, ``cost.py`` (the full fine-tuning reference, AER), ``cells.py`` (the
  one recipe of a comparison: train, evaluate, cost; the random draws of every control);
- the run: ``config.py`` (`RunConfig`, every setting), ``pipeline.py`` (`Run`, the stage sequence and
  the run folder), ``manifest.py`` (when a stored result still counts), ``controls.py``;
- looking in and shipping out: ``explore.py``, ``chat.py``, ``export.py``, ``gguf_export.py``, ``hub.py``;
- plumbing: ``files.py``, ``progress.py``, ``errors.py``, ``tracking.py``, ``distributed.py``;
- the benchmark: ``bench/``; the command line: ``cli.py``; the app: ``studio/`` (the library never
  imports it).
"""

__version__ = "0.1.0"
