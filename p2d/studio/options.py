"""How the app is served: `python -m p2d studio` flags (and `python app.py`'s), as one dataclass.

Environment variables give the defaults where Spaces and containers set them: GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, P2D_DEMO, P2D_STUDIO_RUNS. This module imports no Gradio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from p2d.config import normalize_fields, setting


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class StudioOptions:
    """Serving options of P2D Studio."""

    host: str = setting(None, "serve", "Host", "interface to listen on (env GRADIO_SERVER_NAME; 0.0.0.0 for all)",
                        factory=lambda: os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1")
    port: int = setting(None, "serve", "Port", "port (env GRADIO_SERVER_PORT)", minimum=1, maximum=65535,
                        factory=lambda: int(os.environ.get("GRADIO_SERVER_PORT") or 7860))
    demo: bool = setting(None, "serve", "Public demo", "public demo limits for a shared Space (env P2D_DEMO=1)",
                         factory=lambda: _env_flag("P2D_DEMO"))
    runs: str = setting(None, "serve", "Runs folder", "folder for the per-session run folders (env P2D_STUDIO_RUNS)",
                        factory=lambda: os.environ.get("P2D_STUDIO_RUNS") or os.path.join("runs", "studio"))
    share: bool = setting(False, "serve", "Share link", "create a public gradio.live link (implies the public demo "
                          "limits unless --trusted)")
    trusted: bool = setting(False, "serve", "Trusted", "with --share: keep the local (unlimited) mode; only for "
                            "links you give to people you trust")
    config: str | None = setting(None, "serve", "Settings file", "run settings (the YAML the app saves and `python "
                                 "-m p2d run` takes) to fill the form with")

    def __post_init__(self):
        normalize_fields(self)
        if self.share and not self.trusted:
            self.demo = True
