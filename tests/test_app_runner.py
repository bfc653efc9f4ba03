"""The app's job runner on its own: one job at a time, user errors and out-of-memory as messages."""

from p2d.errors import UserError
from p2d.studio.runner import Runner


def _run_one(fn):
    runner = Runner()
    try:
        job = runner.submit("test", "ws", fn)
        assert runner.wait(job, timeout=30)
        return job
    finally:
        runner.close()


def test_user_error_is_the_message():
    def fail(job):
        raise UserError("file not found: x.jsonl")

    job = _run_one(fail)
    assert job.status == "failed" and job.error == "file not found: x.jsonl"


def test_out_of_memory_is_advice_not_a_traceback():
    def oom(job):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    job = _run_one(oom)
    assert job.status == "failed" and job.error.startswith("out of memory: lower the batch size")


def test_jobs_run_one_at_a_time_in_order():
    order = []
    runner = Runner()
    try:
        jobs = [runner.submit("test", f"ws{i}", lambda job, i=i: order.append(i)) for i in range(3)]
        for job in jobs:
            assert runner.wait(job, timeout=30) and job.status == "done"
    finally:
        runner.close()
    assert order == [0, 1, 2]


def test_shared_model_cache_is_the_runs_model_loader(monkeypatch):
    """Run(model_loader=runner.load_model): one load per model setting, the job's phase says so."""
    from types import SimpleNamespace

    import p2d.pipeline
    from p2d.config import RunConfig

    loads, phases, running = [], [], {}

    def fake_loader(config):
        phases.append(running["job"].phase)
        loads.append(config.model)
        return SimpleNamespace(info=lambda: {"model": config.model, "layers": 2})

    monkeypatch.setattr(p2d.pipeline, "default_loader", fake_loader)
    runner = Runner(max_models=1)
    try:
        cfg = RunConfig(model="org/a", device="cpu")

        def body(job):
            running["job"] = job
            job.phase = "scoring heads"
            first = runner.load_model(cfg)
            assert job.phase == "scoring heads"  # restored after the load
            return first is runner.load_model(cfg.replace(lr=0.5))  # same model settings: reused

        job = runner.submit("heads", "ws", body)
        assert runner.wait(job, timeout=30) and job.status == "done" and job.result is True
        assert loads == ["org/a"] and phases == ["loading model org/a"]
        assert runner.model_info(cfg) == {"model": "org/a", "layers": 2}
        assert runner.model_info(cfg.replace(model="org/b")) is None
    finally:
        runner.close()
