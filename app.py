"""P2D Studio for Hugging Face Spaces (`app_file: app.py`): the same as `python -m p2d studio`.

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or --host / --port; P2D_DEMO=1 (or
--demo) turns on the public demo limits; P2D_STUDIO_RUNS (or --runs) sets the runs folder; --config
FILE.yaml fills the form with saved settings.
"""

import sys

from p2d.cli import main

if __name__ == "__main__":
    sys.exit(main(["studio", *sys.argv[1:]]))
