"""Datasets of the `datasets` library in the app (issue 21): /dataset_options lists a dataset folder's configs and
splits (the same code path as a hub id, offline), /load reads pool, probe and eval from splits of it, and the
public demo refuses both."""

import pytest

from studio_helpers import close, form_kw, serve, wait_job
from test_data_loading import _hub_style_folder

pytestmark = pytest.mark.slow  # a served app


def test_dataset_source_lists_configs_and_loads_splits(tmp_path, tiny_llama_dir):
    from gradio_client import Client

    root = _hub_style_folder(tmp_path / "gsm")
    served = serve(tmp_path / "runs")
    try:
        c = Client(served.url, verbose=False)
        status, config, pool, probe, ev = c.predict(str(root), api_name="/dataset_options")
        assert status == "✓ 2 config(s): main, socratic"
        assert config["value"] == "main" and [v for v, _ in config["choices"]] == ["main", "socratic"]
        assert (pool["value"], probe["value"], ev["value"]) == ("train[100:]", "train[:100]", "test")
        assert ["", "train", "test"] == [v for v, _ in ev["choices"]]
        offline = c.predict("someone/not-a-real-dataset-p2d", api_name="/dataset_options")[0]
        assert "offline" in offline and "id:config@split" in offline
        kw = form_kw(tiny_llama_dir, data_source="hub", pool_path=f"{root}:main@train[5:]",
                     probe_path=f"{root}:main@train[:5]", eval_path=f"{root}:main@test")
        c.predict(**kw, api_name="/load")
        assert wait_job(c)["status"] == "done"
        run = next(w for w in served.studio.registry.all() if w.run is not None).run
        assert (len(run.data.pool), len(run.data.probe), len(run.data.eval)) == (25, 5, 7)
        assert run.config.eval == f"{root}:main@test"
        yaml_text, command = c.predict(**kw, api_name="/show_command")
        assert f"--eval {root}:main@test" in command
    finally:
        close(served)
    demo = serve(tmp_path / "demo-runs", demo=True)
    try:
        c = Client(demo.url, verbose=False)
        assert "off in the public demo" in c.predict(str(root), api_name="/dataset_options")[0]
        status, *_ = c.predict(data_source="files", pool_path=f"{root}:main@train",  # no "hub" source here
                               probe_path=f"{root}:main@train", api_name="/load")
        assert "disabled in the public demo" in status
    finally:
        close(demo)
