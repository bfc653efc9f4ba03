"""Load test of the public demo: hostile visitors beside one honest visitor, each from its own source address.

Starts the demo (the public caps of `p2d.studio.limits.DEMO`, the client address is the connection's peer)
in a server process of its own, whose stdout and stderr are the log measured. Then, from loopback source
addresses 127.0.0.x (every client binds its own), it runs ``--hostile`` hostile addresses (all in a second
process, so that their threads do not slow the measuring one), each doing one of issue 27's attacks as
fast as the caps let it, beside one honest visitor (in this process) who loads the model, uploads a pool
and a probe file, scores heads, trains a few steps and exports the PEFT adapter. Attacks, by address:

- ``uploads``: 19.9 MB files to Gradio's upload route, never used (the pending-upload pool);
- ``flood``: 12 threads of light requests over 6 endpoints (the queue and its workers);
- ``logs``: a 65,000-character hub model name to /heads, NaN reply lengths to /chat (the log);
- ``jobs`` (twice): heavy selections back to back from two sessions (the one worker);
- ``waits``: /wait_job from 6 threads on its own job (the wait slots);
- ``disk``: 19.9 MB data files stored in new sessions (the disk, per address per day);
- ``collide``: the honest visitor's own files, same bytes and names (uploads per visitor).

Reports the honest visitor's p50 / p95 / max latency per call, whether each step succeeded, how long each
of its jobs waited in the worker's queue (against the job time cap), the log's growth (bytes a minute)
and the largest disk use seen (the runs folder, Gradio's upload folder) against the caps, and what the
hostile addresses got (answers and refusals). Its loops are bounded in count and time, and it stops by
itself (``--max-s``). Nothing is sent outside this machine.

    python bench/load.py                           # 8 hostile addresses, the embedded model, the demo's job cap
    python bench/load.py --hostile 4 --model tiny  # a tiny random Llama (what the test suite runs)
    python bench/load.py --json load.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("GRADIO_ANALYTICS_ENABLED", "False"),
             ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout being measured

ATTACKS = ("uploads", "flood", "logs", "jobs", "waits", "disk", "collide", "jobs")
LIGHT = ("attach", "results", "runs", "train_status", "upload", "upload_pool", "upload_probe")
FORM = ("show_command",)  # carries the whole settings form (~55 inputs): Gradio processes each one
HONEST_IP = "127.0.0.2"
STEPS = ("attach", "upload pool", "upload probe", "light calls", "load", "heads", "train", "export")
MB = 2**20


# ----------------------------------------------------------------------------- the server process


def serve(args) -> None:
    """The server process: the public demo on ``--port``, its log on stdout/stderr."""
    from p2d.studio.limits import current_limits
    from p2d.studio.server import build_app

    if args.tiny:
        import p2d.pipeline
        from p2d.models import load_model

        p2d.pipeline.default_loader = lambda config: load_model(args.tiny if config.model == "default" else config.model,
                                                                device="cpu")
    limits = current_limits(True, proxy_hops=0, max_job_s=args.job_cap)
    app = build_app(runs_root=args.runs, limits=limits)
    print(f"serving the demo on port {args.port} (job cap {limits.max_job_s:g} s)", flush=True)
    app.launch(server_name="127.0.0.1", server_port=args.port, quiet=True)


def tiny_model(folder: Path) -> str:
    """A tiny random Llama with the embedded model's tokenizer, saved to ``folder`` (for a quick run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- a client bound to an address


class Visitor:
    """Gradio's HTTP API from one source address (``/gradio_api/call/...``, its upload route), one session."""

    def __init__(self, url: str, ip: str, api: dict):
        import httpx

        self.url, self.ip, self.api, self.session = url, ip, api, secrets.token_hex(8)
        self.http = httpx.Client(transport=httpx.HTTPTransport(local_address=ip), timeout=httpx.Timeout(600.0))

    def call(self, name: str, *args, **kwargs):
        """(ok, value or message): ``name``'s data (by position, or keyword over the endpoint's defaults)."""
        params = self.api[name]
        data = list(args) + [p.get("parameter_default") for p in params[len(args):]]
        names = [p["parameter_name"] for p in params]
        for key, value in kwargs.items():
            data[names.index(key)] = value
        r = self.http.post(f"{self.url}gradio_api/call/{name}", content=json.dumps({"data": data,
                           "session_hash": self.session}, allow_nan=True), headers={"content-type": "application/json"})
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]}"
        event = r.json()["event_id"]
        kind, last = None, None
        with self.http.stream("GET", f"{self.url}gradio_api/call/{name}/{event}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind in ("complete", "error", "generating"):
                    last = json.loads(line[5:]) if line[5:].strip() not in ("", "null") else None
                    if kind in ("complete", "error"):
                        return kind == "complete", last
        return False, last

    def upload(self, name: str, content: bytes):
        """(ok, the FileData to pass on, or the refusal)."""
        r = self.http.post(f"{self.url}gradio_api/upload", files=[("files", (name, content))])
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]}"
        return True, {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": name}

    def close(self):
        self.http.close()


def api_of(url: str) -> dict:
    """endpoint name -> its parameters (from Gradio's /info)."""
    import httpx

    info = httpx.get(f"{url}gradio_api/info", timeout=60).json()
    return {name.strip("/"): e["parameters"] for name, e in info["named_endpoints"].items()}


# ----------------------------------------------------------------------------- the honest visitor


def rows(n: int, offset: int = 0) -> bytes:
    return "".join(json.dumps({"prompt": f"What is {i} + {i % 7}?", "response": str(i + i % 7), "task": "add"}) + "\n"
                   for i in range(offset, offset + n)).encode()


HONEST_FILES = {"pool": ("pool.jsonl", rows(40)), "probe": ("probe.jsonl", rows(8, 500))}


class Honest:
    """The honest visitor's steps, timed; ``job_s``: how long each of its jobs waited to start."""

    def __init__(self, url: str, api: dict, settings: dict):
        self.v = Visitor(url, HONEST_IP, api)
        self.settings, self.times, self.steps, self.queued = settings, {}, {}, {}

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        ok, value = fn(*args, **kwargs)
        self.times.setdefault(name, []).append(time.perf_counter() - t0)
        return ok, value

    def light(self) -> bool:
        ok = True
        for name, args in (("show_command", ()), ("results", ()), ("runs", ()), ("train_status", ({},))):
            got, _ = self.timed(name, self.v.call, name, *args, **(self.settings if name == "show_command" else {}))
            ok = ok and got
        return ok

    def job(self, step: str, name: str, check, settings: bool = True) -> None:
        ok, out = self.timed(name, self.v.call, name, **(self.settings if settings else {}))
        text = json.dumps(out, ensure_ascii=False)[:300]
        ok = ok and check(text)
        if name == "train":  # returns at once: follow it with the page's poll
            while ok:
                got, status = self.timed("train_status", self.v.call, "train_status", {})
                line = json.dumps(status)
                if not got or "Training finished" in line or "failed" in line or "stopped" in line:
                    ok = got and "Training finished" in line
                    text = line[:300]
                    break
                time.sleep(1.0)
        ok2, summary = self.v.call("wait_job", 0)
        if ok2 and isinstance(summary, list):
            summary = summary[0]
        if ok2 and isinstance(summary, dict):
            self.queued[step] = summary.get("queued_s")
        self.steps[step] = {"ok": bool(ok), "said": text if not ok else ""}

    def run(self) -> None:
        try:
            self.steps_in_order()
        except Exception as exc:  # noqa: BLE001 - a step that breaks the client is a failed step
            self.steps["client"] = {"ok": False, "said": f"{type(exc).__name__}: {exc}"[:300]}

    def steps_in_order(self) -> None:
        ok, out = self.timed("attach", self.v.call, "attach", "")
        self.steps["attach"] = {"ok": ok, "said": "" if ok else str(out)[:300]}
        paths = {}
        for kind, (name, content) in HONEST_FILES.items():
            ok, fd = self.timed("upload", self.v.upload, name, content)
            if ok:
                ok, out = self.timed(f"upload_{kind}", self.v.call, f"upload_{kind}", fd, "")
                ok = ok and str(out[0]).startswith("uploads/")
                if ok:
                    paths[kind] = out[0]
            self.steps[f"upload {kind}"] = {"ok": ok, "said": "" if ok else json.dumps(out)[:300]}
        self.settings.update(data_source="files", pool_path=paths.get("pool", ""), probe_path=paths.get("probe", ""))
        self.steps["light calls"] = {"ok": self.light(), "said": ""}
        ok = True
        for step, name, check, settings in (("load", "load", "done", True), ("heads", "heads", "done", True),
                                            ("train", "train", "", True), ("export", "export_peft", "✓", False)):
            self.job(step, name, (lambda t, c=check: c in t) if check else (lambda t: "✗" not in t), settings)
            ok = self.light() and ok  # what a page does between the steps
        self.steps["light calls"]["ok"] &= ok


# ----------------------------------------------------------------------------- the hostile addresses


class Hostile:
    """One hostile address doing ``attack`` until ``stop`` is set; counts what it got."""

    def __init__(self, url: str, api: dict, ip: str, attack: str, settings: dict, stop: threading.Event,
                 heavy_pool: int = 400):
        self.url, self.api, self.ip, self.attack, self.settings, self.stop = url, api, ip, attack, settings, stop
        self.heavy_pool = heavy_pool
        self.got: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, what: str) -> None:
        with self._lock:
            self.got[what] = self.got.get(what, 0) + 1

    def outcome(self, ok: bool, value) -> None:
        text = json.dumps(value, default=str, ensure_ascii=False)
        self.count("answered" if ok and "✗" not in text and "HTTP" not in text else
                   "refused (429)" if "HTTP 429" in text else "refused" if not ok or "✗" in text else "other")

    def threads(self) -> list[threading.Thread]:
        n = {"flood": 12, "waits": 6, "jobs": 2, "logs": 2}.get(self.attack, 1)
        return [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(n)]

    def loop(self, i: int) -> None:
        v = Visitor(self.url, self.ip, self.api)
        try:
            getattr(self, f"_{self.attack}")(v, i)
        except Exception as exc:  # noqa: BLE001 - an attack that breaks is counted, not fatal
            self.count(f"client error {type(exc).__name__}")
        finally:
            v.close()

    def _pause(self, seconds: float) -> bool:
        return not self.stop.wait(seconds)

    def _uploads(self, v: Visitor, i: int) -> None:
        filler = b"x" * 19_900_000
        while self._pause(0.5):
            self.outcome(*v.upload(f"fill-{secrets.token_hex(3)}.jsonl", filler))

    def _flood(self, v: Visitor, i: int) -> None:
        calls = [("show_command", (), self.settings), ("results", (), {}), ("runs", (), {}),
                 ("train_status", ({},), {}), ("preview", ("", 1), {}), ("attach", ("",), {})]
        while self._pause(0):
            name, args, kwargs = calls[i % len(calls)]
            self.outcome(*v.call(name, *args, **kwargs))

    def _logs(self, v: Visitor, i: int) -> None:
        while self._pause(0):
            if i == 0:
                self.outcome(*v.call("heads", **{**self.settings, "model_source": "hub", "model_name": "x" * 65_000}))
            else:
                self.outcome(*v.call("chat", "", "hi", math.nan, 0.0, 1.0, 0))

    def _jobs(self, v: Visitor, i: int) -> None:
        heavy = {**self.settings, "pool_size": self.heavy_pool, "select_method": "alignment",
                 "data_source": "builtin"}
        while self._pause(0.1):
            self.outcome(*v.call("select", **heavy))

    def _waits(self, v: Visitor, i: int) -> None:
        if i == 0:
            v.call("attach", "")
        else:
            time.sleep(2)
        while self._pause(0.05):
            if i == 0:
                self.outcome(*v.call("select", **{**self.settings, "pool_size": self.heavy_pool,
                                                  "data_source": "builtin"}))
            else:
                self.outcome(*v.call("wait_job", 30))

    def _disk(self, v: Visitor, i: int) -> None:
        field = "d" * 49_000
        content = "".join(json.dumps({"prompt": f"{n} {field}", "response": "r"}) + "\n" for n in range(400)).encode()
        while self._pause(1.0):
            v.session = secrets.token_hex(8)  # a new session for every file: the per-session cap is 60 MB
            ok, fd = v.upload(f"disk-{secrets.token_hex(3)}.jsonl", content)
            self.outcome(*(v.call("upload_pool", fd, "") if ok else (ok, fd)))

    def _collide(self, v: Visitor, i: int) -> None:
        name, content = HONEST_FILES["pool"]
        while self._pause(0.5):
            self.outcome(*v.upload(name, content))


# ----------------------------------------------------------------------------- measuring


def attack(args) -> None:
    """The hostile process: ``--hostile`` addresses against ``--url`` until ``--stop`` exists (or ``--seconds``
    pass); what each got goes to ``--out``."""
    os.nice(args.nice)  # the attackers' own CPU would be elsewhere; their requests still reach the server
    settings, stop = json.loads(args.settings), threading.Event()
    api = api_of(args.url)
    hostile = [Hostile(args.url, api, f"127.0.0.{20 + i}", ATTACKS[i % len(ATTACKS)], settings, stop, args.heavy_pool)
               for i in range(args.hostile)]
    threads = [t for h in hostile for t in h.threads()]
    for t in threads:
        t.start()
    end = time.time() + args.seconds
    while not Path(args.stop).exists() and time.time() < end:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(5)
    Path(args.out).write_text(json.dumps({h.ip: {"attack": h.attack, **h.got} for h in hostile}))


def folder_bytes(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(base, f)).st_size
            except OSError:
                pass
    return total


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))] if values else float("nan")


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    from p2d.studio.limits import DEMO

    load_start = [round(x, 2) for x in os.getloadavg()]  # the machine's load beside the run (1, 5, 15 min)
    work = Path(tempfile.mkdtemp(prefix="p2d-load-"))
    runs, uploads, log_path, stop_file = work / "runs", work / "gradio", work / "server.log", work / "stop"
    tiny = tiny_model(work / "tiny") if args.model == "tiny" else None
    warmup = args.warmup if args.warmup is not None else 2 * args.job_cap
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(uploads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(port), "--runs", str(runs),
           "--job-cap", str(args.job_cap)] + (["--tiny", tiny] if tiny else [])
    log = open(log_path, "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    stop, samples = threading.Event(), []
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the demo did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        api = api_of(url)
        settings = dict(model_source="embedded", pool_size=args.pool, probe_size=8, eval_size=4, other_eval_size=0,
                        steps=args.steps, batch_size=4, max_length=128, max_new_tokens=16, head_ratio=0.1,
                        data_ratio=0.25)
        log_start, t_start = log_path.stat().st_size, time.time()
        attackers = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "attack", "--url", url,
                                      "--hostile", str(args.hostile), "--settings", json.dumps(settings),
                                      "--stop", str(stop_file), "--out", str(work / "hostile.json"),
                                      "--seconds", str(args.max_s + warmup + 60), "--nice", str(args.hostile_nice),
                                      "--heavy-pool", str(args.heavy_pool)], env=env, cwd=work)

        def sample():
            while not stop.wait(1.0):
                samples.append((time.time() - t_start, folder_bytes(runs), folder_bytes(uploads), os.getloadavg()[0]))

        threading.Thread(target=sample, daemon=True).start()
        time.sleep(warmup)  # the attacks are under way, every job address had its turn, before the honest one comes
        honest = Honest(url, api, dict(settings))
        done = threading.Thread(target=honest.run, daemon=True)
        done.start()
        done.join(args.max_s)
        finished = not done.is_alive()
        took = time.time() - t_start
        log_bytes = log_path.stat().st_size - log_start
        stop_file.touch()
        attackers.wait(60)
        hostile = json.loads((work / "hostile.json").read_text())
    finally:
        stop.set()
        stop_file.touch()
        time.sleep(1.0)
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    capped = [float(j.get("elapsed_s") or 0) for f in runs.glob("ws-*/workspace.json")
              for j in (json.loads(f.read_text()).get("jobs") or []) if "job time limit" in str(j.get("error"))]
    overrun = max((e - args.job_cap for e in capped), default=0.0)  # a job stops at its first check past the cap
    light = {name: {"n": len(t), "p50_s": round(statistics.median(t), 3), "p95_s": round(pct(t, 0.95), 3),
                    "max_s": round(max(t), 3)} for name, t in honest.times.items()}
    limits = DEMO
    peak_runs = max((s[1] for s in samples), default=0)
    peak_uploads = max((s[2] for s in samples), default=0)
    out = {
        "command": " ".join(["python", "bench/load.py", *sys.argv[1:]]), "machine": machine(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()],
                         "max_1min": round(max((s[3] for s in samples), default=float("nan")), 2),
                         "median_1min": round(statistics.median([s[3] for s in samples]), 2) if samples else None},
        "hostile": hostile, "model": args.model,
        "job_cap_s": args.job_cap, "warmup_s": warmup, "seconds": round(took, 1), "honest_finished": finished,
        "honest_steps": honest.steps, "honest_latency": light,
        "honest_job_queued_s": {k: (round(v, 1) if v is not None else None) for k, v in honest.queued.items()},
        "jobs_stopped_at_the_cap": len(capped), "longest_overrun_of_the_cap_s": round(overrun, 1),
        "overruns_of_the_cap_s": sorted(round(e - args.job_cap, 1) for e in capped),
        "log_bytes": log_bytes, "log_kb_per_min": round(log_bytes / 1024 / (took / 60), 1),
        "disk_peak": {"runs_mb": round(peak_runs / MB, 1), "runs_cap_mb": round(limits.max_disk_bytes / MB),
                      "uploads_mb": round(peak_uploads / MB, 1),
                      "pending_uploads_cap_mb": round(limits.max_pending_upload_bytes / MB)},
        "server_log_tail": log_path.read_text(errors="replace").splitlines()[-12:],
    }
    light_p95 = max((v["p95_s"] for k, v in light.items() if k in LIGHT), default=float("nan"))
    form_p95 = max((v["p95_s"] for k, v in light.items() if k in FORM), default=float("nan"))
    out["targets"] = {
        "every honest step succeeded": finished and set(STEPS) <= set(honest.steps)
                                       and all(s["ok"] for s in honest.steps.values()),
        "light calls p95 < 2 s": light_p95 < 2.0,
        "the form call (/show_command) p95 < 2 s": form_p95 < 2.0,
        "honest jobs started within one job cap": all(v is not None and v <= args.job_cap + overrun
                                                      for v in honest.queued.values()),
        "log growth < 100 KB/min": out["log_kb_per_min"] < 100,
        "disk within its caps": peak_runs <= limits.max_disk_bytes and peak_uploads <= limits.max_pending_upload_bytes
                                + 2 * limits.max_file_bytes,  # plus uploads still arriving
    }
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) the server process")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--runs", required=True)
    s.add_argument("--job-cap", type=float, default=None)
    s.add_argument("--tiny", default=None)
    a = sub.add_parser("attack", help="(internal) the hostile process")
    for name in ("--url", "--settings", "--stop", "--out"):
        a.add_argument(name, required=True)
    a.add_argument("--hostile", type=int, default=8)
    a.add_argument("--seconds", type=float, default=600)
    a.add_argument("--nice", type=int, default=10)
    a.add_argument("--heavy-pool", type=int, default=400)
    p.add_argument("--hostile", type=int, default=8, help="hostile addresses (default 8)")
    p.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--job-cap", type=float, default=None,
                   help="the demo's job time cap here (default: the demo's own, `DEMO.max_job_s`, 300 s)")
    p.add_argument("--pool", type=int, default=40, help="the honest visitor's pool rows")
    p.add_argument("--steps", type=int, default=3, help="the honest visitor's training steps")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds the attacks run before the honest visitor comes (default: two job caps, so that "
                        "every hostile address with jobs had its turn: the steady state of an attack)")
    p.add_argument("--heavy-pool", type=int, default=400, help="pool rows of the hostile selections (default: the cap)")
    p.add_argument("--hostile-nice", type=int, default=10,
                   help="niceness of the hostile process (its CPU would be elsewhere in a real attack; default 10)")
    p.add_argument("--max-s", type=float, default=1500.0, help="give the honest visitor at most this long")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, uploads, server.log)")
    args = p.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "attack":
        return attack(args)
    if args.job_cap is None:
        from p2d.studio.limits import DEMO

        args.job_cap = DEMO.max_job_s
    out = run(args)
    text = json.dumps(out, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
