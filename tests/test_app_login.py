"""Visitors' own Hugging Face account on a Space (issue 21): with OAuth enabled (a Space whose README sets
hf_oauth), the Results tab has Gradio's login button and /push_login pushes a session's adapter and card with
that visitor's token. Offline here, so the Hub is a local fake HTTP server that records each request's
Authorization header, and the login is a signed Gradio session cookie as the real OAuth callback leaves it:
two sessions push, each request carries its own session's token only, a session without a login is refused,
and no token lands in a file or the server's output. Without OAuth the box and the endpoint do not exist.
The real OAuth round trip (hf.co's consent page) cannot run offline."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from studio_helpers import close, form_kw, serve, wait_job

pytestmark = pytest.mark.slow  # served apps, two tiny trainings

SECRET = "test-oauth-client-secret"


class FakeHub:
    """The Hub's HTTP API as far as create_repo + upload_folder use it; records (path, Authorization)."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def _handle(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.requests.append((method, self.path, self.headers.get("Authorization")))
                if self.path == "/api/repos/create":
                    d = json.loads(body)
                    return self._reply(200, {"url": f"{hub.url}/{d['organization']}/{d['name']}", "name": d["name"]})
                if self.path.startswith("/api/validate-yaml"):
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123", "commitOid": "abc123",
                                             "pullRequestUrl": None})
                return self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tokens_for(self, repo: str) -> set:
        return {auth for _, path, auth in self.requests if f"/{repo}/" in path or path.endswith(f"/{repo}")}


def _login_cookie(token: str, username: str) -> str:
    """The session cookie Gradio's OAuth callback leaves (Starlette's SessionMiddleware, Gradio's secret)."""
    from itsdangerous import TimestampSigner

    info = {"access_token": token, "token_type": "bearer", "scope": "openid profile contribute-repos",
            "expires_at": int(time.time()) + 3600,
            "userinfo": {"name": username, "preferred_username": username, "picture": "",
                         "profile": f"https://huggingface.co/{username}"}}
    data = base64.b64encode(json.dumps({"oauth_info": info}).encode())
    signer = TimestampSigner(hashlib.sha256((SECRET + "-v4").encode()).hexdigest())
    return "session=" + signer.sign(data).decode()


@pytest.fixture()
def space(monkeypatch, tmp_path):
    """A Space with OAuth on (the variables the platform sets) and the Hub replaced by a local fake."""
    import gradio.oauth
    import huggingface_hub.constants

    hub = FakeHub()
    monkeypatch.setattr(gradio.oauth, "get_space", lambda: "someone/p2d-studio")  # Gradio's real OAuth routes
    monkeypatch.setenv("SPACE_ID", "someone/p2d-studio")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "client-id")
    for name, value in (("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", SECRET),
                        ("OAUTH_SCOPES", "openid profile contribute-repos"), ("OPENID_PROVIDER_URL", hub.url)):
        monkeypatch.setattr(gradio.oauth, name, value)  # read by Gradio at import time
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the server has no token of its own
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    return hub


def _has(app, elem_id: str) -> bool:
    return any(c.get("props", {}).get("elem_id") == elem_id for c in app.config["components"])


def test_each_visitor_pushes_with_their_own_login(space, tmp_path, tiny_llama_dir, capfd):
    from gradio_client import Client

    from p2d.studio.server import build_app

    demo = build_app(demo=True, runs_root=tmp_path / "demo")  # a Space is the public demo: the box is there too
    assert _has(demo, "hf-login") and "/push_login" in demo.get_api_info()["named_endpoints"]
    assert "/export_gguf" not in demo.get_api_info()["named_endpoints"]  # no GGUF download in the demo
    demo.studio.close()
    served = serve(tmp_path / "runs")  # the owner's P2D_DEMO=0: any model, so the tiny one trains fast
    try:
        assert _has(served.app, "hf-login") and "/push_login" in served.app.get_api_info()["named_endpoints"]
        tokens = {"alice": "hf_oauth_token_alice_1111", "bob": "hf_oauth_token_bob_2222"}
        clients = {who: Client(served.url, verbose=False, headers={"Cookie": _login_cookie(tok, who)})
                   for who, tok in tokens.items()}
        for who, c in clients.items():
            c.predict("", api_name="/attach")
            c.predict(**form_kw(tiny_llama_dir), api_name="/train")
        for c in clients.values():
            assert wait_job(c)["status"] == "done"
        for who, c in clients.items():
            status = c.predict(f"{who}/p2d-heads", True, api_name="/push_login")
            assert f"pushed to [{who}/p2d-heads]" in status, status
        for who, tok in tokens.items():  # every request for a repo carried its own session's token, and only it
            assert space.tokens_for(f"{who}/p2d-heads") == {f"Bearer {tok}"}
        sent = {auth for _, _, auth in space.requests if auth}
        assert sent == {f"Bearer {t}" for t in tokens.values()}
        # a visitor who has not signed in is refused before any request
        anon = Client(served.url, verbose=False)
        anon.predict("", api_name="/attach")
        before = len(space.requests)
        assert "sign in with Hugging Face first" in anon.predict("anon/x", True, api_name="/push_login")
        assert len(space.requests) == before
        # the host's own /push never uses a visitor's login: the server has no token, so it refuses
        assert "needs a Hugging Face token" in clients["alice"].predict("alice/x", True, False, api_name="/push")
        for path in (tmp_path / "runs").rglob("*"):  # nothing written kept a token
            if path.is_file():
                data = path.read_bytes()
                assert not any(t.encode() in data for t in tokens.values()), path
    finally:
        close(served)
    out, err = capfd.readouterr()
    assert not any(t in out + err for t in tokens.values())  # nor the server's output


def test_no_login_box_without_oauth(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/p2d-studio")
    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)
    served = serve(tmp_path / "runs", demo=True)
    try:
        assert not _has(served.app, "hf-login") and not _has(served.app, "login-push-box")
        assert "/push_login" not in served.app.get_api_info()["named_endpoints"]
    finally:
        close(served)
