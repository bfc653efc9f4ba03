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


def test_jobs_take_turns_across_addresses_and_see_their_place():
    """Issue 27, "one worker for everyone": a heavy visitor's queued jobs made another visitor's export wait, with
    no sign why or for how long. The worker's time is now shared across client addresses (round robin for
    equal jobs, not first come), and a waiting job sees how many run before it and about how long that takes."""
    import threading
    import time
    from collections import deque

    order, gate = [], threading.Event()
    worker = Worker()
    try:
        first = worker.submit("select", "a0", lambda job: gate.wait(30) and order.append("a0"), client="10.0.0.1")
        while first.status != "running":
            threading.Event().wait(0.01)
        heavy = [worker.submit("select", f"a{i}", lambda job, i=i: order.append(f"a{i}"), client="10.0.0.1")
                 for i in (1, 2, 3)]
        honest = worker.submit("export", "b", lambda job: order.append("b"), client="10.0.0.2")
        assert [j.owner for j in worker.order()] == ["b", "a1", "a2", "a3"]  # b goes next: a0 of 10.0.0.1 runs
        line = worker.describe(honest)
        assert "queued, 1 job ahead of yours" in line and "about" not in line  # no job has finished yet
        gate.set()
        for job in (first, *heavy, honest):
            assert worker.wait(job, timeout=30) and job.status == "done"
        assert order == ["a0", "b", "a1", "a2", "a3"]
        # with durations known, a queued job gets an estimate: here 2 jobs of about 2 s run before it
        gate.clear()
        slow = [worker.submit("select", f"c{i}", lambda job: gate.wait(30), client="10.0.0.3") for i in (0, 1)]
        later = worker.submit("export", "d", lambda job: None, client="10.0.0.3")
        worker._durations["select"].extend([2.0] * 10)
        line = worker.describe(later)
        assert "queued, 2 jobs ahead of yours, about" in line, line
        assert 2.0 <= worker.estimate(later) <= 4.5
        gate.set()
        assert worker.wait(later, timeout=30) and all(worker.wait(j, timeout=30) for j in slow)
        assert later.summary()["queued_s"] >= 0
        # the worker's time is what is shared: an address that kept it busy waits for one whose jobs were short
        gate.clear()
        blocker = worker.submit("select", "e0", lambda job: gate.wait(30), client="10.0.0.5")
        while blocker.status != "running":
            threading.Event().wait(0.01)
        worker._used.clear()
        worker._used["10.0.0.1"] = deque([(time.time(), 120.0)])  # heavy selections a minute ago
        worker._used["10.0.0.2"] = deque([(time.time(), 0.5)])    # one short export
        heavy, light = (worker.submit("select", "a9", lambda job: None, client="10.0.0.1"),
                        worker.submit("export", "b9", lambda job: None, client="10.0.0.2"))
        assert worker.order() == [light, heavy]
        gate.set()
        assert worker.wait(heavy, timeout=30) and light.started <= heavy.started
    finally:
        gate.set()
        worker.close()


def test_a_heavy_address_is_remembered_for_several_capped_rounds():
    """Round three's load test (job cap 300 s): three addresses ran heavy selections of one cap each; the worker's
    15-minute memory forgot each one's last job just before its next turn, so the honest visitor's training (156 s
    used) waited behind two of them. With a cap, the window spans `FAIR_ROUNDS` caps."""
    import threading
    import time
    from collections import deque

    from p2d.studio.worker import FAIR_ROUNDS, FAIR_WINDOW_S

    gate = threading.Event()
    worker = Worker(max_job_s=300.0)
    try:
        assert worker.fair_window_s == FAIR_ROUNDS * 300.0 > FAIR_WINDOW_S
        blocker = worker.submit("select", "x", lambda job: gate.wait(30), client="10.0.0.7")
        while blocker.status != "running":
            threading.Event().wait(0.01)
        now = time.time()
        worker._used.clear()
        worker._used["10.0.0.1"] = deque([(now - 1000.0, 300.0)])  # a capped selection 17 minutes ago
        worker._used["10.0.0.2"] = deque([(now - 60.0, 156.0)])    # the honest visitor's head scoring
        heavy = worker.submit("select", "a", lambda job: None, client="10.0.0.1")
        honest = worker.submit("train", "b", lambda job: None, client="10.0.0.2")
        assert worker.order() == [honest, heavy]
    finally:
        gate.set()
        worker.close()
    assert Worker().fair_window_s == FAIR_WINDOW_S  # no cap (the local mode): as before


def test_a_job_over_the_time_cap_is_stopped_with_a_message():
    """Issue 27: no job time cap. With ``max_job_s`` a job is asked to stop once it has run that long; it ends
    stopped, saying why, and the next job runs."""
    import time

    steps = []

    def long(job):
        while not job.should_stop():
            steps.append(1)
            time.sleep(0.02)
        return "partial"

    worker = Worker(max_job_s=0.5)
    try:
        job = worker.submit("heads", "ws", long)
        nxt = worker.submit("export", "other", lambda job: "ok", client="10.0.0.9")
        assert worker.wait(job, timeout=30) and worker.wait(nxt, timeout=30)
    finally:
        worker.close()
    assert job.status == "stopped" and job.timed_out and job.result == "partial" and steps
    assert "job time limit (0.5 s" in job.error and "what it finished is kept" in job.error
    assert 0.5 <= job.elapsed() < 3 and nxt.status == "done"
