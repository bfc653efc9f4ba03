"""Concurrent sessions on the public demo: how many P2D Studio holds at once, how fast a light request
is answered while a training job runs, and whether a flood of new sessions can evict anybody.

One app in demo mode (the public caps of `p2d.studio.limits`; the client address comes from
X-Forwarded-For with one trusted proxy, as on Spaces, so this script can give every simulated visitor
its own address). Through gradio_client only:

1. ``--sessions`` visitors (one address each) open a session (``/attach``) and, idle, send light
   requests (``/preview``, ``/show_command``, ``/train_status``) from as many threads at once: the
   latency baseline;
2. another visitor starts a training (``/train``; 40 steps, the demo's cap, on the demo's 400-row
   pool) and the visitors send the same requests again while it runs: p50/p95/max per endpoint;
3. an attacker opens ``--attack`` sessions from one address, then from ``--attack-ips`` addresses,
   while the training runs; afterwards every visitor's key must still reach its workspace, the
   training's workspace must never have left memory, and its job must finish.

    python bench/studio_sessions.py                   # embedded model, 20 sessions
    python bench/studio_sessions.py --model tiny      # a tiny random Llama instead (seconds)
    python bench/studio_sessions.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("GRADIO_ANALYTICS_ENABLED", "False"),
             ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)
sys.path.insert(0, os.getcwd())  # the checkout being measured (run from its root)

LIGHT = ("/preview", "/show_command", "/train_status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = max(0, min(len(values) - 1, round(q * (len(values) - 1))))
    return values[k]


def tiny_loader(tmp: Path):
    """A loader mapping the embedded model spec to a tiny random Llama (for a quick run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d.models import load_model, load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    folder = tmp / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return lambda config: load_model(str(folder), device="cpu")


def light_round(clients: list, requests: int, stop: threading.Event | None = None) -> dict[str, list[float]]:
    """Every client sends ``requests`` light requests (cycling through LIGHT) from its own thread."""
    lat: dict[str, list[float]] = {name: [] for name in LIGHT}
    errors: list[str] = []
    lock = threading.Lock()

    def one(c, i):
        for r in range(requests):
            if stop is not None and stop.is_set():
                return
            name = LIGHT[(i + r) % len(LIGHT)]
            args = {"/preview": ("", 1), "/show_command": (), "/train_status": ({},)}[name]
            kwargs = {"model_source": "embedded"} if name == "/show_command" else {}
            t0 = time.perf_counter()
            try:
                c.predict(*args, **kwargs, api_name=name)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{name}: {exc}")
                continue
            with lock:
                lat[name].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat["errors"] = errors  # type: ignore[assignment]
    return lat


def summarize(lat: dict) -> dict:
    out = {}
    for name in LIGHT:
        v = lat[name]
        out[name] = {"n": len(v), "p50_ms": round(1000 * pct(v, 0.5), 1), "p95_ms": round(1000 * pct(v, 0.95), 1),
                     "max_ms": round(1000 * max(v), 1) if v else None,
                     "mean_ms": round(1000 * statistics.fmean(v), 1) if v else None}
    out["errors"] = len(lat["errors"])
    if lat["errors"]:
        out["first_errors"] = lat["errors"][:3]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20, help="visitors holding a session at once")
    p.add_argument("--requests", type=int, default=15, help="light requests per visitor per round")
    p.add_argument("--attack", type=int, default=200, help="sessions the attacker opens from one address")
    p.add_argument("--attack-ips", type=int, default=60, help="addresses the attacker then uses (one session each)")
    p.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()

    from gradio_client import Client

    import p2d.pipeline
    from p2d.studio.server import build_app, launch_kwargs
    from p2d.studio.limits import DEMO

    tmp = Path(tempfile.mkdtemp(prefix="p2d-bench-sessions-"))
    if a.model == "tiny":
        p2d.pipeline.default_loader = tiny_loader(tmp)
    limits = DEMO.with_options(proxy_hops=1)
    app = build_app(runs_root=tmp / "runs", limits=limits)
    port = free_port()
    app.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs(app))
    url = f"http://127.0.0.1:{port}/"
    st = app.studio
    report: dict = {"machine": machine(), "model": a.model, "limits": {
        "max_workspaces": limits.max_workspaces, "max_workspaces_per_ip": limits.max_workspaces_per_ip,
        "max_new_workspaces_per_ip_hour": limits.max_new_workspaces_per_ip_hour,
        "queue_size": limits.queue_size, "max_steps": limits.max_steps}}

    def client(ip: str) -> Client:
        return Client(url, verbose=False, headers={"X-Forwarded-For": ip})

    try:
        t0 = time.perf_counter()
        visitors = [client(f"10.1.{i // 250}.{i % 250}") for i in range(a.sessions)]
        keys = [c.predict("", api_name="/attach")["key"] for c in visitors]
        report["sessions_opened_s"] = round(time.perf_counter() - t0, 2)
        report["idle"] = summarize(light_round(visitors, a.requests))

        trainer = client("10.9.9.9")
        trainer_key = trainer.predict("", api_name="/attach")["key"]
        trainer_ws = st.registry.by_key(trainer_key)
        trainer.predict(model_source="embedded", api_name="/train")
        t_start = time.time()
        while time.time() - t_start < 600 and not trainer_ws.log():  # until the training logs its first step
            job = st.current_job(trainer_ws)
            if job is not None and not job.active:
                raise SystemExit(f"training ended before it logged a step: {job.status} {job.error}")
            time.sleep(0.5)
        report["training_first_step_after_s"] = round(time.time() - t_start, 1)
        steps_before = len(trainer_ws.log())
        t_round = time.perf_counter()
        report["while_training"] = summarize(light_round(visitors, a.requests))
        report["while_training"]["round_s"] = round(time.perf_counter() - t_round, 1)

        # the eviction attempt, while the training runs
        flood = {"one_address_opened": 0, "one_address_refused": 0, "many_addresses_opened": 0,
                 "many_addresses_refused": 0}
        evicted0 = st.registry.evicted
        for _ in range(a.attack):
            try:
                client("10.66.0.1").predict("", api_name="/attach")
                flood["one_address_opened"] += 1
            except Exception:  # noqa: BLE001 - a refusal is the expected answer past the caps
                flood["one_address_refused"] += 1
        for i in range(a.attack_ips):
            try:
                client(f"10.77.{i // 250}.{i % 250}").predict("", api_name="/attach")
                flood["many_addresses_opened"] += 1
            except Exception:  # noqa: BLE001
                flood["many_addresses_refused"] += 1
        in_memory = {w.id for w in st.registry.all()}
        flood["workspaces_in_memory"] = len(in_memory)
        flood["attacker_one_address_in_memory"] = sum(w.ip == "10.66.0.1" for w in st.registry.all())
        flood["evicted_from_memory"] = st.registry.evicted - evicted0
        flood["training_workspace_stayed_in_memory"] = trainer_ws.id in in_memory
        still = 0
        for c, key in zip(visitors, keys):
            if c.predict(key, api_name="/attach")["key"] == key:
                still += 1
        flood["visitors_who_still_reach_their_workspace"] = f"{still}/{len(visitors)}"
        report["eviction_attempt"] = flood

        summary = trainer.predict(60, api_name="/wait_job")
        while summary["status"] in ("queued", "running"):
            summary = trainer.predict(60, api_name="/wait_job")
        report["training"] = {"status": summary["status"], "steps": summary.get("log_lines"),
                              "steps_logged_before_the_round": steps_before,
                              "elapsed_s": summary.get("elapsed_s")}
    finally:
        app.close()
        st.close()

    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
