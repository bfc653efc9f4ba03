"""The app's job worker on its own: one job at a time, user errors and out-of-memory as messages."""

from p2d.errors import UserError
from p2d.studio.worker import Worker


def _run_one(fn):
    worker = Worker()
    try:
        job = worker.submit("test", "ws", fn)
        assert worker.wait(job, timeout=30)
        return job
    finally:
        worker.close()


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
    worker = Worker()
    try:
        jobs = [worker.submit("test", f"ws{i}", lambda job, i=i: order.append(i)) for i in range(3)]
        for job in jobs:
            assert worker.wait(job, timeout=30) and job.status == "done"
    finally:
        worker.close()
    assert order == [0, 1, 2]


def test_shared_model_cache_is_the_runs_model_loader(monkeypatch):
    """Run(model_loader=worker.load_model): one load per model setting, the job's phase says so."""
    from types import SimpleNamespace

    import p2d.pipeline
    from p2d.config import RunConfig

    loads, phases, running = [], [], {}

    def fake_loader(config):
        phases.append(running["job"].phase)
        loads.append(config.model)
        return SimpleNamespace(info=lambda: {"model": config.model, "layers": 2})

    monkeypatch.setattr(p2d.pipeline, "default_loader", fake_loader)
    worker = Worker(max_models=1)
    try:
        cfg = RunConfig(model="org/a", device="cpu")

        def body(job):
            running["job"] = job
            job.phase = "scoring heads"
            first = worker.load_model(cfg)
            assert job.phase == "scoring heads"  # restored after the load
            return first is worker.load_model(cfg.replace(lr=0.5))  # same model settings: reused

        job = worker.submit("heads", "ws", body)
        assert worker.wait(job, timeout=30) and job.status == "done" and job.result is True
        assert loads == ["org/a"] and phases == ["loading model org/a"]
        assert worker.model_info(cfg) == {"model": "org/a", "layers": 2}
        assert worker.model_info(cfg.replace(model="org/b")) is None
    finally:
        worker.close()
