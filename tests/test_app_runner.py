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
