"""P2D Studio: `python app.py` starts the app on the embedded model and the built-in task pool.

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or --host / --port (default
127.0.0.1:7860). P2D_DEMO=1 (or --demo) turns on the public demo limits; P2D_STUDIO_RUNS (or
--runs) sets where the per-session run folders go (default runs/studio). On Hugging Face Spaces
this file is the `app_file`.
"""

from __future__ import annotations

import argparse
import os

from studio.app import build_app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="P2D Studio (Gradio app)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                   help="interface to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1, 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                   help="port (env GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--demo", action="store_true", default=None, help="public demo limits (env P2D_DEMO=1)")
    p.add_argument("--runs", default=None, help="folder for per-session run folders (env P2D_STUDIO_RUNS)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = p.parse_args(argv)
    app = build_app(demo=args.demo, runs_root=args.runs)
    app.launch(server_name=args.host, server_port=args.port, share=args.share or None,
               footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
