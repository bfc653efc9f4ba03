"""Issue 9, "safe to host": each attack on the live app (gradio_client and plain HTTP against
`build_app(...).launch(prevent_thread_lock=True)`), with arguments the page never sends.

The demo apps here use the public demo caps (some lowered so a test stays small) and map the
embedded model ("default", the one model the demo allows without a download) to the tiny Llama of
conftest.py, so jobs run in seconds; everything else is the app as served.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from p2d.config import RunConfig
from p2d.errors import UserError
from studio_helpers import free_port as _free_port

TINY = dict(pool_size=40, probe_size=8, eval_size=8, other_eval_size=0, steps=2, batch_size=4, head_ratio=0.25,
            data_ratio=0.2, device="cpu")


def _serve(root: Path, limits=None, demo: bool = False, **launch):
    from p2d.studio.server import build_app, launch_kwargs

    app = build_app(demo=demo, runs_root=root, limits=limits)
    kwargs = {**launch_kwargs(app), **launch}
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True, **kwargs)
    return SimpleNamespace(app=app, url=url, studio=app.studio, root=Path(root))


def _close(served) -> None:
    served.app.close()
    served.studio.close()


def _demo_limits(**changes):
    from p2d.studio.limits import DEMO

    return DEMO.with_options(proxy_hops=1, **changes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, default_is_tiny):
    served = _serve(tmp_path_factory.mktemp("safety-demo"),
                    _demo_limits(max_file_bytes=2_000_000, max_session_bytes=3_000_000, max_data_bytes=5_000_000))
    yield served
    _close(served)


def _client(served, ip: str = "10.0.0.1", **kw):
    from gradio_client import Client

    return Client(served.url, verbose=False, headers={"X-Forwarded-For": ip}, **kw)


def _kept(value) -> bool:
    """Whether an output was set (gradio_client returns an update marker for an output left as it was)."""
    return bool(value) and value != {"__type__": "update"}


# ----------------------------------------------------------------------------- 1. nothing served by URL


@pytest.mark.slow
def test_no_run_or_upload_file_is_reachable_by_url(demo, tmp_path):
    st = demo.studio
    c = _client(demo)
    victim = st.attach(SimpleNamespace(session_hash="victim-tab"), None)
    planted = victim.root / "run-001" / "x.html"
    planted.parent.mkdir(parents=True)
    planted.write_text("<script>alert(document.cookie)</script>")
    for path in (planted, victim.root / "run-001" / ".." / "run-001" / "x.html"):
        r = httpx.get(f"{demo.url}gradio_api/file={path}")
        assert r.status_code in (403, 404), (r.status_code, r.headers)
        assert "<script>" not in r.text

    # an uploaded HTML file: not a data file, so rejected before it is stored, and Gradio's copy is gone
    from gradio_client import handle_file

    page = tmp_path / "evil.html"
    page.write_text("<html><script>alert(1)</script></html>")
    path, source, msg = c.predict(handle_file(str(page)), "", api_name="/upload_pool")
    assert "was not stored" in msg and not _kept(path) and not _kept(source), msg
    assert "/tmp" not in msg and str(demo.root) not in msg  # no server paths in the message
    assert not list(demo.root.rglob("*evil*"))  # nothing kept in any workspace
    from p2d.studio.guard import gradio_upload_folder

    assert not list(gradio_upload_folder().rglob("evil.html"))  # nor in Gradio's served upload folder

    # a valid upload is stored in the workspace (not served) and Gradio's copy is deleted; the page is shown
    # its path relative to the session's folder (no server path)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"{i}+1?", "response": str(i + 1)}) + "\n" for i in range(20)))
    path, source, msg = c.predict(handle_file(str(pool)), "", api_name="/upload_pool")
    stored = demo.studio.registry.for_session(c.session_hash, "10.0.0.1").root / path
    assert path.startswith("uploads/pool-") and stored.is_file() and stored.is_relative_to(demo.root), (path, msg)
    assert httpx.get(f"{demo.url}gradio_api/file={stored}").status_code in (403, 404)
    assert not list(gradio_upload_folder().rglob("pool.jsonl"))

    # a download is a copy in Gradio's cache, never a path under the runs folder
    file_out, *_ = c.predict(model_source="embedded", api_name="/save_config")
    got = Path(file_out["value"] if isinstance(file_out, dict) else file_out)
    assert got.is_file() and "model: default" in got.read_text() and not got.is_relative_to(demo.root)


@pytest.mark.slow
def test_download_hands_out_only_files_of_the_session(demo):
    st = demo.studio
    a = st.attach(SimpleNamespace(session_hash="dl-a"), None)
    b = st.attach(SimpleNamespace(session_hash="dl-b"), None)
    mine = a.root / "run-001" / "metrics.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("{}")
    staged = st.download(a, mine)
    assert staged and Path(staged).read_text() == "{}" and not Path(staged).is_relative_to(demo.root)
    assert st.download(b, mine) is None  # another session's file
    assert st.download(a, Path("/etc/passwd")) is None and st.download(st.registry.blank, mine) is None
    link = a.root / "run-001" / "link.json"
    link.symlink_to("/etc/passwd")
    assert st.download(a, link) is None  # a link out of the workspace


# ----------------------------------------------------------------------------- 2. uploads and caps


def _gzip_bomb(path: Path, rows: int = 200_000) -> Path:
    line = (json.dumps({"prompt": "What is 1 + 1? " + "pad " * 200, "response": "2"}) + "\n").encode()
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(rows):
            f.write(line)
    return path


@pytest.mark.slow
def test_uploads_are_capped_before_they_are_stored(demo, tmp_path):
    from gradio_client import handle_file

    c = _client(demo, ip="10.0.2.1")
    # a 430 KB .jsonl.gz that expands to 200,000 rows / 170 MB: reading stops at the pool cap
    bomb = _gzip_bomb(tmp_path / "pool.jsonl.gz")
    assert bomb.stat().st_size < 600_000
    t0 = time.perf_counter()
    path, _, msg = c.predict(handle_file(str(bomb)), "", api_name="/upload_pool")
    assert time.perf_counter() - t0 < 20
    assert "400 rows" in msg and "only the first 400 rows are used" in msg, msg
    # the same bomb as one JSON document: streamed too (issue 20), so reading stops at the probe cap
    doc = tmp_path / "big.json.gz"
    with gzip.open(doc, "wt", compresslevel=9) as f:
        f.write("[" + ",".join([json.dumps({"prompt": "x" * 1000, "response": "y"})] * 20_000) + "]")
    probe, _, msg = c.predict(handle_file(str(doc)), "", api_name="/upload_probe")
    assert "64 rows" in msg and "only the first 64 rows are used" in msg, msg
    # one whose rows are all unusable is refused after the skip allowance, not stored
    useless = tmp_path / "useless.json.gz"
    useless.write_bytes(gzip.compress(b"[" + b"{}," * 10_000_000 + b"{}]", 9))
    _, _, msg = c.predict(handle_file(str(useless)), "", api_name="/upload_eval")
    assert "was not stored" in msg and "no usable rows" in msg, msg
    ws = demo.studio.registry.for_session(c.session_hash, "10.0.2.1")
    assert sorted(p.name for p in ws.upload_dir.iterdir()) == sorted([Path(path).name, Path(probe).name])

    # over the per-file cap: Gradio's upload route refuses it before any handler runs (gradio_client checks the
    # size itself first; test_app_attacks.py sends it anyway)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"prompt": "a", "response": "b"}\n' * 70_000)  # 2.3 MB > 2 MB
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types for an HTTP 413
        c.predict(handle_file(str(big)), "", api_name="/upload_eval")
    assert len(list(ws.upload_dir.iterdir())) == 2
    # a file that reached Studio.receive some other way (not an upload of this client) is neither read nor deleted
    with pytest.raises(UserError, match="the upload did not arrive"):
        demo.studio.receive(ws, "eval", big, client="10.0.2.1")
    assert big.exists()

    # the session's total: 1.5 MB files pass one by one until the session's 3 MB are used up
    chunk = tmp_path / "chunk.jsonl"
    chunk.write_bytes(b'{"prompt": "a", "response": "b"}\n' * 45_000)
    msgs = [c.predict(handle_file(str(chunk)), "", api_name="/upload_eval")[2] for _ in range(3)]
    assert "was not stored" not in msgs[0] and "uploads would pass 2.9 MB" in msgs[-1], msgs


@pytest.mark.slow
def test_caps_apply_whatever_the_api_sends(demo, tmp_path):
    from gradio_client import handle_file

    c = _client(demo, ip="10.0.3.1")
    yaml_text, command = c.predict(model_source="embedded", eval_limit=0, max_new_tokens=100_000, grad_accum=1000,
                                   steps=10**6, batch_size=10**4, max_length=10**5, report_to="wandb",
                                   pool_size=10**7, api_name="/show_command")
    cfg = RunConfig.from_yaml(yaml_text)
    assert (cfg.eval_limit, cfg.max_new_tokens, cfg.grad_accum, cfg.max_steps, cfg.batch_size, cfg.max_length,
            cfg.pool_size) == (32, 64, 4, 40, 16, 256, 400)
    assert cfg.report_to == "none" and "--max-steps 40" in command
    # text arguments over the cap, on any endpoint
    msg = c.predict("x" * 70_000, 1, api_name="/preview")[1]
    assert "search: 70000 characters is over the 65536 this server takes" in msg, msg
    bad = c.predict("pool_size: 1\n" + "#" * 70_000, api_name="/apply_config")[-1]
    assert "characters is over the" in bad
    # /wait_job: the server grants at most its own timeout
    t0 = time.perf_counter()
    summary = c.predict(10**9, api_name="/wait_job")
    assert summary["waited_at_most_s"] == 30.0 and time.perf_counter() - t0 < 30

    # a job: an uploaded eval set of 100 rows is used up to the eval cap (32 rows), and so is the pool
    rows = "".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n" for i in range(500))
    for name in ("pool", "probe", "eval"):
        (tmp_path / f"{name}.jsonl").write_text(rows)
    paths = {n: c.predict(handle_file(str(tmp_path / f"{n}.jsonl")), "", api_name=f"/upload_{n}")[0]
             for n in ("pool", "probe", "eval")}
    status, info, table, _ = c.predict(model_source="embedded", data_source="files", pool_path=paths["pool"],
                                       probe_path=paths["probe"], eval_path=paths["eval"], eval_limit=0,
                                       max_new_tokens=100_000, **{**TINY, "steps": 1}, api_name="/load")
    assert "Load done" in status, status
    sets = {r[0]: r for r in table["data"]}
    assert (sets["pool"][3], sets["probe"][3], sets["eval"][3]) == (400, 64, 32)  # the run's load is capped too
    c.predict(model_source="embedded", data_source="files", pool_path=paths["pool"], probe_path=paths["probe"],
              eval_path=paths["eval"], eval_limit=0, max_new_tokens=100_000, **{**TINY, "steps": 1},
              api_name="/train")
    summary = c.predict(60, api_name="/wait_job")
    while summary["status"] in ("queued", "running"):
        summary = c.predict(60, api_name="/wait_job")
    assert summary["status"] == "done", summary
    run_dir = demo.studio.registry.for_session(c.session_hash, "10.0.3.1").root / summary["run_dir"]
    assert summary["run_dir"] == "run-001"  # no server path in the public demo
    ran = RunConfig.load(run_dir / "config.yaml")
    assert ran.eval_limit == 32 and ran.max_new_tokens == 64
    before = json.loads((run_dir / "eval_before.json").read_text())
    assert before["n"] == 32


@pytest.mark.slow
def test_typed_paths_are_refused_in_the_demo(demo):
    c = _client(demo, ip="10.0.4.1")
    other = demo.studio.attach(SimpleNamespace(session_hash="paths-victim"), None)
    other.upload_dir.mkdir(parents=True, exist_ok=True)
    stolen = other.upload_dir / "pool-00-secret.jsonl"
    stolen.write_text('{"prompt": "a", "response": "b"}\n')
    for path in ("/etc/passwd", str(stolen), f"{demo.root}/../../etc/passwd"):
        status, *_ = c.predict(model_source="embedded", data_source="files", pool_path=path, probe_path=path,
                               api_name="/load")
        assert "typed paths are disabled in the public demo" in status, status


# ----------------------------------------------------------------------------- 3. model allowlist


@pytest.mark.slow
def test_model_allowlist(demo, monkeypatch):
    from p2d.studio.server import limits_of
    from p2d.studio.limits import DEFAULT_ALLOWLIST, current_limits
    from p2d.studio.options import StudioOptions

    c = _client(demo, ip="10.0.5.1")
    status, *_ = c.predict(model_source="hub", model_name="gpt2", api_name="/load")
    assert "'gpt2' is not available in the public demo" in status and "\n" not in status.strip(), status
    for ok in DEFAULT_ALLOWLIST:  # allowed: the settings pass (no download needed to check that)
        yaml_text, _ = c.predict(model_source="hub", model_name=ok, api_name="/show_command")
        assert RunConfig.from_yaml(yaml_text).model == ok
    # configurable: env and StudioOptions
    monkeypatch.setenv("P2D_MODEL_ALLOWLIST", "org/a, org/b")
    assert current_limits(True).model_allowlist == ("default", "org/a", "org/b")
    assert current_limits(False).model_allowlist is None  # local mode: any model
    monkeypatch.delenv("P2D_MODEL_ALLOWLIST")
    assert limits_of(StudioOptions(demo=True, model_allowlist="org/c")).model_allowlist == ("default", "org/c")
    assert limits_of(StudioOptions(demo=True)).model_allowlist == ("default", *DEFAULT_ALLOWLIST)


# ----------------------------------------------------------------------------- 5. workspaces


@pytest.mark.slow
def test_light_endpoints_never_create_a_workspace(demo):
    st = demo.studio
    before = {w.id for w in st.registry.all()}
    for i in range(30):
        c = _client(demo, ip=f"10.1.0.{i}")
        c.predict(api_name="/results")
        c.predict("", 1, api_name="/preview")
        c.predict({}, api_name="/train_status")
        c.predict(api_name="/stop")
        c.predict(0, api_name="/wait_job")
        c.predict(model_source="embedded", api_name="/show_command")
        c.predict(api_name="/forgetting")
        # the teaching views of a session without runs: refused, and still no workspace
        assert "nothing to work on" in c.predict("", "hi", 8, 0.0, 1.0, 0, api_name="/chat")[0]
        assert "nothing to work on" in c.predict("", 0, 0, 0, api_name="/inspect_head")[0]
        assert "no run folder" in c.predict("run-001", "../../etc", api_name="/compare_heads")[0]
    assert {w.id for w in st.registry.all()} == before


@pytest.mark.slow
def test_teaching_endpoints_keep_to_the_session_and_the_caps(demo):
    """/chat's reply length is capped server-side; /compare_heads and /reuse_heads take only this session's
    run folders by name (no paths)."""
    c = _client(demo, ip="10.2.0.1")
    c.predict(model_source="embedded", **TINY, api_name="/load")
    for args in ((10_000, 0.0, 1.0), (8, 9.0, 1.0), (8, 0.0, 0.0)):  # the sliders' ranges hold for API calls too
        with pytest.raises(Exception, match="maximum|minimum"):
            c.predict("", "hi", *args, 0, api_name="/chat")
    assert "Seed must be at most" in c.predict("", "hi", 8, 0.5, 1.0, 10 ** 30, api_name="/chat")[0]  # no overflow error
    assert "off in the public demo" in c.predict(model_source="embedded", **TINY, processes=2, api_name="/train")[0]
    for name in ("/etc", "../run-001", "run-001/../../x"):
        assert "no run folder" in c.predict(name, "run-001", api_name="/compare_heads")[0]
        assert "no run folder" in c.predict(name, api_name="/reuse_heads")[0]


@pytest.mark.slow
def test_sessions_are_bounded_and_nobody_is_evicted_by_others(tmp_path, default_is_tiny):
    from p2d.studio.workspace import folder_name

    served = _serve(tmp_path / "runs", _demo_limits(max_workspaces=6, max_workspaces_per_ip=2, max_steps=10**6,
                                                    max_new_workspaces_per_ip_hour=40, max_jobs_per_ip=1))
    st = served.studio
    try:
        # two visitors; one runs a long training
        busy = _client(served, ip="10.2.0.1")
        idle = _client(served, ip="10.2.0.2")
        busy_key = busy.predict("", api_name="/attach")["key"]
        idle_key = idle.predict("", api_name="/attach")["key"]
        for key in (busy_key, idle_key):
            assert len(key) >= 32 and key not in str(served.root) and folder_name(key) != key
        idle.predict(model_source="embedded", **TINY, api_name="/load")
        busy.predict(model_source="embedded", **{**TINY, "steps": 100_000}, api_name="/train")
        busy_ws = st.registry.by_key(busy_key)
        deadline = time.time() + 60
        while not busy_ws.log() and time.time() < deadline:
            time.sleep(0.2)
        assert busy_ws.log(), "training did not start"
        # one address opens many sessions: it only ever evicts its own idle ones
        for _ in range(12):
            _client(served, ip="10.66.0.1").predict("", api_name="/attach")
        assert sum(w.ip == "10.66.0.1" for w in st.registry.all()) <= 2
        assert st.registry.by_key(busy_key) is busy_ws and st.registry.by_key(idle_key) is not None
        # many addresses: idle workspaces leave memory, the one with a running job never does ...
        for i in range(20):
            _client(served, ip=f"10.77.0.{i}").predict("", api_name="/attach")
        assert len(st.registry.all()) <= 6 and busy_ws in st.registry.all()
        assert st.registry.evicted > 0
        # ... and an evicted one loses nothing: its key reads it back from disk, run included
        assert idle.predict(idle_key, api_name="/attach")["run"] == "run-001"
        assert idle.predict(api_name="/runs")[1]["data"][0][0] == "▶ run-001"
        # a second job from the same address is refused (one job per address here)
        busy2 = _client(served, ip="10.2.0.1")
        status, *_ = busy2.predict(model_source="embedded", **TINY, api_name="/load")
        assert "your address already has 1 jobs queued or running" in status, status
        # new sessions per address per hour are capped
        flood = [_client(served, ip="10.88.0.1") for _ in range(41)]
        results = []
        for f in flood:
            try:
                results.append(f.predict("", api_name="/attach"))
            except Exception as exc:  # noqa: BLE001 - the refusal arrives as the client's error
                results.append(str(exc))
        assert any("too many new sessions" in str(r) for r in results)
        busy.predict(api_name="/stop")
        assert busy.predict(60, api_name="/wait_job")["status"] == "stopped"
    finally:
        _close(served)


def test_idle_workspaces_expire(tmp_path):
    from p2d.studio.limits import DEMO
    from p2d.studio.services import Studio

    st = Studio(DEMO.with_options(workspace_ttl_s=3600.0), tmp_path)
    try:
        old = st.attach(SimpleNamespace(session_hash="old"), None)
        old.upload_dir.mkdir(parents=True)
        (old.upload_dir / "pool-1-x.jsonl").write_text("{}\n")
        st.save(old)
        busy = st.attach(SimpleNamespace(session_hash="busy"), None)
        gate = threading.Event()
        job = st.submit(busy, "train", lambda job: gate.wait(30), "Training")
        fresh = st.attach(SimpleNamespace(session_hash="fresh"), None)
        st.save(fresh)
        later = time.time() + 2 * 3600
        fresh.touched = later  # used recently
        gone = st.registry.sweep(now=later)
        assert old.id in gone and not old.root.exists()
        assert busy.id not in gone and fresh.id not in gone and fresh.root.exists()
        assert st.registry.by_key(old.key) is None  # its files and its key are gone
        gate.set()
        st.worker.wait(job, timeout=30)
    finally:
        st.close()


# ----------------------------------------------------------------------------- 6. queue and waiting


@pytest.mark.slow
def test_queue_size_and_wait_concurrency(tmp_path):
    from p2d.studio.limits import LOCAL

    served = _serve(tmp_path / "runs", LOCAL.with_options(queue_size=2, wait_concurrency=1, max_wait_s=4.0))
    try:
        assert served.app._queue.max_size == 2
        wait_fn = next(fn for fn in served.app.fns.values() if fn.api_name == "wait_job")
        assert wait_fn.concurrency_limit == 1
        st = served.studio
        gate = threading.Event()
        clients = [_client(served) for _ in range(5)]
        for cl in clients:  # five sessions, each with a job that holds until the gate opens
            cl.predict("", api_name="/attach")
            st.submit(st.registry.for_session(cl.session_hash), "train", lambda job: gate.wait(60), "Training")
        results: list = [None] * len(clients)

        def call(i):
            try:
                results[i] = clients[i].predict(10**6, api_name="/wait_job")
            except Exception as exc:  # noqa: BLE001
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clients))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        gate.set()
        errors = [r for r in results if isinstance(r, Exception)]
        done = [r for r in results if isinstance(r, dict)]
        assert errors and any("queue is full" in str(e).lower() for e in errors), results
        assert done and all(r["waited_at_most_s"] == 4.0 for r in done)
        assert time.perf_counter() - t0 < 40  # no caller held a worker for its 10**6 s
    finally:
        _close(served)


# ----------------------------------------------------------------------------- 7. share, trust, login


def test_share_implies_demo_unless_trusted_or_login(tmp_path, monkeypatch):
    from p2d.studio.limits import env_demo
    from p2d.studio.options import StudioOptions, parse_auth

    for name in ("P2D_DEMO", "SPACE_ID", "P2D_AUTH"):
        monkeypatch.delenv(name, raising=False)
    assert StudioOptions().demo is False
    assert StudioOptions(share=True).demo is True
    assert StudioOptions(share=True, trusted=True).demo is False
    assert StudioOptions(share=True, auth="ann:secret").demo is False
    assert StudioOptions(share=True, auth="ann:secret").auth_pairs() == [("ann", "secret")]
    logins = tmp_path / "logins.txt"
    logins.write_text("# team\nann:pw1\nbob:pw:with:colons\n")
    assert parse_auth(str(logins)) == [("ann", "pw1"), ("bob", "pw:with:colons")]
    with pytest.raises(UserError, match="user:password"):
        parse_auth("no-colon-here")
    monkeypatch.setenv("SPACE_ID", "someone/p2d")  # a Space is public unless its owner says otherwise
    assert env_demo() and StudioOptions().demo is True
    monkeypatch.setenv("P2D_DEMO", "0")
    assert not env_demo() and StudioOptions().demo is False
    # the CLI flag reaches the options
    from p2d.cli import build_parser

    args = build_parser().parse_args(["studio", "--share", "--auth", "ann:secret", "--expire-hours", "2"])
    assert (args.share, args.auth, args.expire_hours) == (True, "ann:secret", "2")


@pytest.mark.slow
def test_login_is_required_when_set(tmp_path):
    from gradio_client import Client

    served = _serve(tmp_path / "runs", auth=[("ann", "secret")])
    try:
        assert httpx.get(f"{served.url}config").status_code == 401
        assert httpx.get(f"{served.url}gradio_api/info").status_code == 401
        c = Client(served.url, verbose=False, auth=("ann", "secret"))
        assert "key" in c.predict("", api_name="/attach")
    finally:
        _close(served)


# ----------------------------------------------------------------------------- ZeroGPU


@pytest.mark.slow
def test_zero_gpu_is_refused_at_start(monkeypatch, tmp_path, capsys):
    from p2d.cli import main
    from p2d.studio.server import build_app
    from p2d.studio.gpu import ZERO_GPU_MESSAGE

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    with pytest.raises(UserError, match="ZeroGPU hardware is not supported"):
        build_app(runs_root=tmp_path)
    assert main(["studio", "--runs", str(tmp_path), "--port", str(_free_port())]) != 0
    err = capsys.readouterr().err
    assert ZERO_GPU_MESSAGE in err and "Traceback" not in err
    monkeypatch.setenv("SPACES_ZERO_GPU", "false")
    app = build_app(runs_root=tmp_path)  # anything else starts
    app.studio.close()
