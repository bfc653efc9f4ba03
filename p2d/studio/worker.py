"""The job worker: library calls run here, in one background thread, one job at a time.

Why a worker (and not the Gradio event itself): a training run outlives the browser request that
started it. Jobs stay in a registry, so a reloaded page asks for its workspace's current or latest
job and resumes showing it.

Fair turns: the worker shares its time across client addresses, not first come first served. The next
job is the first queued job of the address that used the worker least in the last ``FAIR_WINDOW_S``
(with a job time cap: ``FAIR_ROUNDS`` caps, if longer; its jobs' running time), then the one with fewer
jobs queued; one address's jobs keep their order.
With jobs of equal length this is round robin; a visitor whose jobs are short goes before one who keeps
the worker busy with heavy ones, so the heavy queue of one visitor never makes another wait more than
the job that is running. A waiting job sees its place and an
estimate from the recent durations of each kind of job ("2 jobs ahead of yours, about 40 s").
With ``max_job_s`` (the public demo's job time cap) a job is asked to stop once it has run that long
(the library checks between steps and batches); it ends ``stopped`` with a message saying so, and
what it finished is kept as a stopped job's is.

- ``submit(kind, owner, fn, client=...)`` queues a job; ``fn(job)`` runs in the worker. A
  ``UserError`` ends the job as ``failed`` with its message; any other exception too, with the type
  in the message and the traceback on the server log (`p2d.studio.log`). One active job per workspace
  (``owner``), and
  at most ``max_per_client`` queued or running per client address.
- ``on_change(job)`` (optional) is called when a job is queued, starts and ends (the app writes the
  job into its workspace's file there, so a restarted server still lists it); ``adopt`` puts such a
  past job back into the registry.
- ``job.progress(done, total, desc)`` and ``job.should_stop()`` are the library's callbacks.
- ``stop(job)`` sets the stop flag: a queued job is cancelled, a running one stops after the current
  step (training keeps the adapter).
- ``order()``, ``position(job)``, ``estimate(job)``: the queue in the order it will run, a job's place in
  it, and the seconds until it starts.
- ``load_model(config)`` is the ``model_loader`` every session's `p2d.pipeline.Run` gets: a small
  cache shared by all sessions (jobs run one at a time and the library restores a model's weights and
  flags after every step, so sharing is safe). ``model_info(config)`` keeps the facts of every model
  loaded so far, for the page.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from p2d import pipeline
from p2d.errors import OOM_ADVICE, UserError, is_out_of_memory

from .log import LOG, cut

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "stopped")
RECENT = 10  # finished jobs of each kind whose durations make the estimate
FAIR_WINDOW_S = 900.0  # how far back the worker time an address used counts for its turn (at least)
#: with a job time cap, the window spans this many capped jobs: several heavy addresses take turns of one cap each,
#: and a window shorter than their round forgets an address's last job just before its next turn, so it goes again
#: before a visitor who used the worker less (round three's load test: 900 s, three heavy addresses, a 300 s cap)
FAIR_ROUNDS = 8


def fmt_wait(seconds: float) -> str:
    """``about 40 s`` / ``about 3 min``."""
    if seconds < 90:
        return f"about {max(1, round(seconds / 5) * 5 if seconds >= 10 else round(seconds))} s"
    return f"about {round(seconds / 60)} min"


@dataclass
class Job:
    """One unit of work (load, heads, select, train, evaluate, merge) owned by a workspace."""

    id: str
    kind: str
    owner: str
    label: str
    fn: Callable[["Job"], Any] = field(repr=False)
    status: str = "queued"  # queued, running, done, failed, stopped
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    phase: str = ""
    done: int = 0
    total: int = 0
    desc: str = ""
    error: str | None = None
    result: Any = field(default=None, repr=False)
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    info: dict = field(default_factory=dict)
    live: dict = field(default_factory=dict, repr=False)  # what the job shows while it runs (chat's replies)
    client: str = ""  # the client address that submitted it (per-address caps)
    settled: threading.Event = field(default_factory=threading.Event, repr=False)  # ended and recorded
    deadline: float | None = None  # the job time cap: asked to stop after this (time.time())
    timed_out: bool = False

    # library callbacks -------------------------------------------------------------------------
    def progress(self, done: int, total: int, desc: str) -> None:
        self.done, self.total, self.desc = int(done), int(total), str(desc)

    def should_stop(self) -> bool:
        if self.deadline is not None and not self.stop_event.is_set() and time.time() >= self.deadline:
            self.timed_out = True
            self.stop_event.set()
        return self.stop_event.is_set()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.done = self.total = 0
        self.desc = phase

    # state -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def queued_s(self) -> float:
        """Seconds it waited in the queue (so far, while it waits)."""
        return (self.started or self.finished or time.time()) - self.created

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "status": self.status, "phase": self.phase,
                "done": self.done, "total": self.total, "desc": self.desc, "error": self.error,
                "elapsed_s": round(self.elapsed(), 2), "queued_s": round(self.queued_s(), 2),
                "stop_requested": self.stop_requested, **self.info}


class Worker:
    """A queue of jobs whose worker time is shared across client addresses, run by one thread, with a registry of
    finished jobs. ``max_job_s``: the job time cap (None: none)."""

    def __init__(self, max_models: int = 1, keep_finished: int = 200,
                 on_change: Callable[["Job"], None] | None = None, max_job_s: float | None = None):
        self._cond = threading.Condition()
        self._queue: list[Job] = []  # in submission order; `order` says in which they run
        self._used: dict[str, deque] = {}  # client address -> (when, seconds) of its jobs' running time
        self._durations: dict[str, deque] = {}  # job kind -> seconds its last jobs ran
        self.max_job_s = max_job_s
        self.fair_window_s = max(FAIR_WINDOW_S, FAIR_ROUNDS * max_job_s) if max_job_s else FAIR_WINDOW_S
        self._current: Job | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep_finished
        self._counter = itertools.count(1)
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._info: dict[tuple, dict] = {}
        self._model_lock = threading.Lock()
        self._max_models = max(1, max_models)
        self._closed = False
        self.on_change = on_change
        self._worker = threading.Thread(target=self._loop, name="p2d-studio-worker", daemon=True)
        self._worker.start()

    # -- queue -----------------------------------------------------------------------------------
    def submit(self, kind: str, owner: str, fn: Callable[[Job], Any], label: str | None = None,
               client: str = "", max_per_client: int | None = None, info: dict | None = None) -> Job:
        """Queue ``fn`` for workspace ``owner``. One active job per workspace, at most ``max_per_client``
        active jobs per client address (UserError otherwise)."""
        with self._cond:
            if self._closed:
                raise UserError("the app is shutting down")
            busy = self.active_job(owner)
            if busy is not None:
                raise UserError(f"this session already has a {busy.label} job {busy.status}: wait for it or "
                                "press Stop")
            if max_per_client is not None:
                mine = [j for j in self._jobs.values() if j.active and j.client == client]
                if len(mine) >= max_per_client:
                    raise UserError(f"your address already has {len(mine)} jobs queued or running (at most "
                                    f"{max_per_client}): wait for one to finish")
            job = Job(id=f"{next(self._counter):04d}-{secrets.token_hex(3)}", kind=kind, owner=owner,
                      label=label or kind, fn=fn, client=client, info=dict(info or {}))
            self._jobs[job.id] = job
            self._queue.append(job)
            self._trim()
            self._cond.notify_all()
        self._changed(job)
        return job

    def adopt(self, job: Job) -> None:
        """Put a finished job (read back from disk) into the registry, so `get` finds it."""
        assert not job.active
        job.settled.set()
        with self._cond:
            self._jobs.setdefault(job.id, job)

    def _changed(self, job: Job) -> None:
        try:
            if self.on_change is not None:
                self.on_change(job)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never take the worker down
            LOG.bug(job.client, f"recording job {job.kind}", exc)
        finally:
            if not job.active:
                with self._cond:
                    job.settled.set()
                    self._cond.notify_all()

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for j in finished[:max(0, len(finished) - self._keep)]:
            self._jobs.pop(j.id, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._next(self._queue, self._usage())
                self._queue.remove(job)
                self._current = job
                if job.stop_event.is_set():  # cancelled while queued
                    job.status, job.finished = "stopped", time.time()
                    job.error = "cancelled before it started"
                    self._current = None
                    self._cond.notify_all()
                    self._changed(job)
                    continue
                job.status, job.started = "running", time.time()
                if self.max_job_s:
                    job.deadline = job.started + self.max_job_s
            self._changed(job)
            try:
                job.result = job.fn(job)
                status = "stopped" if job.stop_event.is_set() else "done"
                error = None
            except UserError as exc:
                status, error = ("stopped" if job.stop_event.is_set() else "failed"), str(exc)
                LOG.user_error(job.client, f"job {job.kind}", exc)
            except Exception as exc:  # noqa: BLE001 - a bug: keep the worker alive, log the traceback
                if is_out_of_memory(exc):
                    status, error = "failed", OOM_ADVICE
                    self._release_memory()
                    with self._cond:
                        job.status, job.error, job.finished = status, error, time.time()
                        self._current = None
                        self._cond.notify_all()
                    self._changed(job)
                    continue
                LOG.bug(job.client, f"job {job.kind}", exc)
                status, error = "failed", f"internal error ({type(exc).__name__}: {cut(exc, 200)}); see the server log"
            if job.timed_out:
                error = self.timed_out_message(job)
            with self._cond:
                job.status, job.error, job.finished = status, error, time.time()
                self._durations.setdefault(job.kind, deque(maxlen=RECENT)).append(job.elapsed())
                self._used.setdefault(job.client, deque()).append((job.finished, job.elapsed()))
                self._current = None
                self._cond.notify_all()
            self._changed(job)

    def timed_out_message(self, job: Job) -> str:
        what = ("Resume it under Runs of this session to continue from its last checkpoint" if job.kind == "train"
                else "press the button again to run the rest")
        return (f"stopped at the public demo's job time limit ({self.max_job_s:g} s, so that other visitors get "
                f"their turn); what it finished is kept: {what}")

    def _usage(self) -> dict[str, float]:
        """Seconds of worker time each client address used in the last ``fair_window_s`` (the running job
        included); the caller holds the lock."""
        since = time.time() - self.fair_window_s
        used = {}
        for client, spans in list(self._used.items()):
            while spans and spans[0][0] < since:
                spans.popleft()
            if spans:
                used[client] = sum(s for _, s in spans)
            else:
                del self._used[client]
        if self._current is not None:
            used[self._current.client] = used.get(self._current.client, 0.0) + self._current.elapsed()
        return used

    @staticmethod
    def _next(queue: list[Job], used: dict[str, float]) -> Job:
        """The job that runs next: the first queued job of the address that used the worker least; between
        addresses alike, the one with fewer jobs queued."""
        waiting = {c: sum(1 for j in queue if j.client == c) for c in {j.client for j in queue}}
        return min(queue, key=lambda j: (used.get(j.client, 0.0), waiting[j.client], queue.index(j)))

    def order(self) -> list[Job]:
        """The queued jobs in the order they will run (if no other job is submitted meanwhile; each is
        expected to run as long as `expected_s` says)."""
        with self._cond:
            queue, used = list(self._queue), self._usage()
        out = []
        while queue:
            job = self._next(queue, used)
            queue.remove(job)
            used[job.client] = used.get(job.client, 0.0) + (self.expected_s(job.kind) or 1.0)
            out.append(job)
        return out

    def expected_s(self, kind: str) -> float | None:
        """How long a job of ``kind`` runs: the median of the last ones of that kind (else of any kind),
        at most the job time cap; None before any job has finished."""
        with self._cond:
            recent = list(self._durations.get(kind) or [d for ds in self._durations.values() for d in ds])
        if not recent:
            return self.max_job_s
        guess = statistics.median(recent)
        return min(guess, self.max_job_s) if self.max_job_s else guess

    def estimate(self, job: Job) -> float | None:
        """Seconds until the queued ``job`` starts (None: no estimate yet; 0: not queued)."""
        if job.status != "queued":
            return 0.0
        ahead = self.order()
        ahead = ahead[:ahead.index(job)] if job in ahead else ahead
        current = self._current
        total = 0.0
        for j in ([current] if current is not None else []) + ahead:
            expected = self.expected_s(j.kind)
            if expected is None:
                return None
            total += max(expected - j.elapsed(), 1.0) if j is current else expected
        return total

    @staticmethod
    def _release_memory() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort only
            pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.stop_event.set()
            if self._current is not None:
                self._current.stop_event.set()
            self._cond.notify_all()

    # -- queries ---------------------------------------------------------------------------------
    def get(self, job_id: str | None) -> Job | None:
        return self._jobs.get(job_id) if job_id else None

    def active_job(self, owner: str) -> Job | None:
        for job in list(self._jobs.values()):
            if job.owner == owner and job.active:
                return job
        return None

    def latest(self, owner: str | None = None, kind: str | None = None) -> Job | None:
        for job in reversed(list(self._jobs.values())):
            if (owner is None or job.owner == owner) and (kind is None or job.kind == kind):
                return job
        return None

    def position(self, job: Job) -> int:
        """0 when running (or finished), else 1 + the number of jobs that run before it."""
        order = self.order()
        if job not in order:
            return 0
        return order.index(job) + 1 + (1 if self._current is not None else 0)

    def busy(self) -> int:
        """Number of jobs queued or running (all sessions)."""
        with self._cond:
            return len(self._queue) + (1 if self._current is not None else 0)

    def stop(self, job: Job | None) -> bool:
        if job is None or not job.active:
            return False
        job.stop_event.set()
        return True

    def wait(self, job: Job, timeout: float | None = None, until: Callable[[], bool] | None = None) -> bool:
        """Block until ``job`` has finished; False on timeout, or as soon as ``until()`` (checked every second)
        says to stop waiting."""
        end = None if timeout is None else time.time() + timeout
        with self._cond:
            while job.active or not job.settled.is_set():
                left = None if end is None else end - time.time()
                if left is not None and left <= 0 or until is not None and until():
                    return False
                self._cond.wait(timeout=min(left, 1.0) if left is not None else 1.0)
        return True

    def describe(self, job: Job | None, clock: bool = True) -> str:
        """One line for the page: queue position, phase/progress, or how it ended (``clock``: with the
        seconds a running job has run, so the line changes every second)."""
        if job is None:
            return ""
        if job.status == "queued":
            ahead = max(0, self.position(job) - 1)
            wait = self.estimate(job)
            return (f"… {job.label}: queued, {ahead} job{'s' if ahead != 1 else ''} ahead of yours"
                    + (f", {fmt_wait(wait)}" if wait else "")
                    + " (one job runs at a time, visitors take turns)")
        if job.status == "running":
            what = job.desc or job.phase or job.label
            if what == "train":
                what = "step"
            prog = f" {job.done}/{job.total}" if job.total else ""
            stop = (" · stopping: the job time limit is reached…" if job.timed_out else
                    " · stopping after the current step…" if job.stop_requested else "")
            return f"▶ {job.label}: {what}{prog}" + (f" · {job.elapsed():.0f} s" if clock else "") + stop
        if job.status == "done":
            return f"✓ {job.label} done in {job.elapsed():.1f} s"
        if job.status == "stopped":
            return f"■ {job.label} stopped after {job.elapsed():.1f} s" + (f" ({job.error})" if job.error else "")
        return f"✗ {job.label} failed: {job.error}"

    # -- models ----------------------------------------------------------------------------------
    @staticmethod
    def model_key(config) -> tuple:
        return (str(config.model), config.device, config.dtype, bool(config.trust_remote_code), config.quantize)

    def load_model(self, config):
        """The model of ``config`` (a `p2d.config.RunConfig`), loaded or reused; called by `Run` from
        inside a job, whose phase says so while it loads. Keeps at most ``max_models`` loaded."""
        key = self.model_key(config)
        with self._model_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            job = self._current
            before = job.phase if job is not None else ""
            if job is not None:
                job.set_phase(f"loading model {config.model}" + (" (the first use converts the embedded model, "
                                                                  "~30 s)" if config.model == "default" else ""))
            while len(self._models) >= self._max_models:
                self._models.popitem(last=False)
            lm = pipeline.default_loader(config)  # looked up on the module: tests and bench scripts replace it
            self._models[key] = lm
            self._info[key] = lm.info()
            if job is not None:
                job.set_phase(before)
            return lm

    def model_info(self, config) -> dict | None:
        """Facts (layers, heads, parameters, device, ...) of the model of ``config`` once it was loaded."""
        return self._info.get(self.model_key(config))

    def drop_models(self) -> None:
        self._models.clear()
