"""What the app tests share: tiny run settings, a free port, a served app, the form's keyword arguments
for a local model, and waiting for a session's job through the API."""

import socket
import time
from types import SimpleNamespace

TINY = dict(pool_size=40, probe_size=8, eval_size=8, other_eval_size=0, steps=3, batch_size=4, head_ratio=0.25,
            data_ratio=0.2, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form_kw(model_dir: str, **extra) -> dict:
    """Keyword arguments of a stage endpoint: a local model folder, the TINY settings, then ``extra``."""
    return {"model_source": "local", "model_name": model_dir, **TINY, **extra}


def wait_job(client, seconds: float = 300) -> dict:
    """``/wait_job`` until the session's job is neither queued nor running (or ``seconds`` pass)."""
    end = time.time() + seconds
    summary = client.predict(60, api_name="/wait_job")
    while summary["status"] in ("queued", "running") and time.time() < end:
        summary = client.predict(60, api_name="/wait_job")
    return summary


def serve(runs_root, demo: bool = False, limits=None, **launch) -> SimpleNamespace:
    """A real app server on a free port: ``.app``, ``.url``, ``.studio``, ``.root`` (close with `close`)."""
    from p2d.studio.server import build_app

    app = build_app(demo=demo, runs_root=runs_root, limits=limits)
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, **launch)
    return SimpleNamespace(app=app, url=url, studio=app.studio, root=runs_root)


def close(served) -> None:
    served.app.close()
    served.studio.close()
