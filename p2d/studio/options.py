"""How the app is served: `python -m p2d studio` flags (and `python app.py`'s), as one dataclass.

Environment variables give the defaults where Spaces and containers set them: GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, P2D_DEMO, P2D_STUDIO_RUNS, P2D_MODEL_ALLOWLIST, P2D_AUTH, P2D_PROXY_HOPS. This
module imports no Gradio.

Who gets the unlimited local mode: a server on this machine. A public share link (``--share``) and a
Hugging Face Space get the public demo limits unless the owner says otherwise: ``--trusted`` (a link
given to people you trust) or a login (``--auth``) keep the local mode with ``--share``; on Spaces
``P2D_DEMO=0`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from p2d.config import normalize_fields, setting
from p2d.errors import UserError

from .limits import env_demo


@dataclass
class StudioOptions:
    """Serving options of P2D Studio."""

    host: str = setting(None, "serve", "Host", "interface to listen on (env GRADIO_SERVER_NAME; 0.0.0.0 for all)",
                        factory=lambda: os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1")
    port: int = setting(None, "serve", "Port", "port (env GRADIO_SERVER_PORT)", minimum=1, maximum=65535,
                        factory=lambda: int(os.environ.get("GRADIO_SERVER_PORT") or 7860))
    demo: bool = setting(None, "serve", "Public demo", "public demo limits for a shared Space (env P2D_DEMO=1; on by "
                         "default on Hugging Face Spaces unless P2D_DEMO=0)", factory=env_demo)
    runs: str = setting(None, "serve", "Runs folder", "folder for the per-session run folders (env P2D_STUDIO_RUNS)",
                        factory=lambda: os.environ.get("P2D_STUDIO_RUNS") or os.path.join("runs", "studio"))
    share: bool = setting(False, "serve", "Share link", "create a public gradio.live link (implies the public demo "
                          "limits unless --trusted or --auth)")
    trusted: bool = setting(False, "serve", "Trusted", "with --share: keep the local (unlimited) mode; only for "
                            "links you give to people you trust")
    auth: str | None = setting(None, "serve", "Login", "require a login: user:password, or a file with one "
                               "user:password per line (env P2D_AUTH); with --share the local mode stays",
                               factory=lambda: os.environ.get("P2D_AUTH") or None)
    model_allowlist: str | None = setting(None, "serve", "Model allowlist", "public demo: the hub ids visitors may "
                                          "load besides the embedded model, comma-separated (env "
                                          "P2D_MODEL_ALLOWLIST; default: SmolLM2-135M/360M-Instruct)",
                                          factory=lambda: os.environ.get("P2D_MODEL_ALLOWLIST") or None)
    expire_hours: float = setting(24.0, "serve", "Expire after (hours)", "public demo: a session's workspace and "
                                  "its files are deleted after this many hours without use (0: never)", minimum=0)
    proxy_hops: int | None = setting(None, "serve", "Proxy hops", "trusted proxies in front of the app, for the "
                                     "client address of the per-address caps (env P2D_PROXY_HOPS; default 1 on "
                                     "Spaces, else 0)", minimum=0)
    config: str | None = setting(None, "serve", "Settings file", "run settings (the YAML the app saves and `python "
                                 "-m p2d run` takes) to fill the form with")

    def __post_init__(self):
        normalize_fields(self)
        if self.share and not self.trusted and not self.auth:
            self.demo = True

    def auth_pairs(self) -> list[tuple[str, str]] | None:
        """``auth`` as Gradio's ``launch(auth=...)`` list of (user, password); None without a login."""
        return parse_auth(self.auth)


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``user:password`` or a file of such lines (blank lines and ``#`` comments skipped)."""
    if not spec or not str(spec).strip():
        return None
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"Login (auth): could not read {path}: {exc}") from None
        where = str(path)
    else:
        lines, where = [spec], "the --auth value"
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"Login (auth): {where} needs user:password (one per line in a file)")
        pairs.append((user.strip(), password))
    if not pairs:
        raise UserError(f"Login (auth): {where} has no user:password line")
    return pairs
