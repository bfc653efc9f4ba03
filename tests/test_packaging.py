"""Packaging (issue 21): the wheel's metadata declares the library's dependencies as ranges with the app,
quantisation and trackers as extras; every third-party import of p2d/ is declared where it is needed; the
library and the CLI work without the app's packages; `pip install .` gives a working `p2d` command."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "PIL": "pillow"}
#: the app's packages (the `studio` extra): only p2d/studio/ may import them
STUDIO = {"gradio", "plotly", "pandas", "starlette"}
#: optional imports outside p2d/studio/ and the extra that provides them
OPTIONAL = {"trackio": "track", "wandb": "track", "bitsandbytes": "quantize"}
#: the benchmark report draws its chart when plotly is there (the studio extra) and skips it otherwise
OPTIONAL_IN = {("bench/report.py", "plotly"): "studio"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, 1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The METADATA of a wheel built from a copy of the package, the way `pip install .` builds it: in an isolated
build environment with the setuptools pyproject.toml asks for (fetched from the package index), so the
interpreter's own setuptools (65.5 in a fresh Python 3.11 venv) plays no part."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "p2d", src / "p2d", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(out.glob("p2d_studio-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "p2d/studio/server.py" in z.namelist() and not any(n.startswith("tests/") for n in z.namelist())
        entry = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "p2d = p2d.cli:main" in entry
    return Parser().parsestr(text)


def _requirements(meta) -> dict[str | None, dict[str, str]]:
    """extra (None: the base) -> {distribution: requirement}."""
    out: dict[str | None, dict[str, str]] = {}
    for req in meta.get_all("Requires-Dist"):
        spec, _, marker = req.partition(";")
        extra = re.search(r'extra == "([^"]+)"', marker)
        out.setdefault(extra.group(1) if extra else None, {})[_name(spec)] = spec.strip()
    return out


def test_wheel_metadata(metadata):
    assert metadata["Requires-Python"] == ">=3.11"
    reqs = _requirements(metadata)
    assert set(metadata.get_all("Provides-Extra")) == {"studio", "quantize", "track", "dev"}
    assert set(reqs["studio"]) == {"gradio", "plotly", "pandas", "starlette"} and "oauth" in reqs["studio"]["gradio"]
    assert set(reqs["quantize"]) == {"bitsandbytes"} and set(reqs["track"]) == {"tensorboard", "trackio", "wandb"}
    base = reqs[None]
    assert not set(base) & {"gradio", "plotly", "pandas", "starlette", "bitsandbytes", "tensorboard", "wandb", "trackio"}
    for req in (r for extra in reqs.values() for r in extra.values()):
        assert "==" not in req, f"{req}: exact pins belong in requirements*.txt, the package declares ranges"
    pins = {_name(line): line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    from packaging.requirements import Requirement

    for name, req in {**base, **reqs["studio"], **reqs["quantize"]}.items():  # the pins CI tests satisfy the ranges
        version = pins[name].split("==")[1].split()[0]
        assert Requirement(req).specifier.contains(version), f"{pins[name]} is outside {req}"


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "p2d"}


def test_every_import_is_declared(metadata):
    """Each third-party module p2d/ imports is a declared dependency: the base for the library, the studio extra
    for p2d/studio/, the named extra for the optional trackers and quantisation."""
    reqs = _requirements(metadata)
    base, studio = set(reqs[None]), set(reqs["studio"])
    for path in sorted((ROOT / "p2d").rglob("*.py")):
        in_studio = "studio" in path.relative_to(ROOT / "p2d").parts
        for name in _third_party_imports(path):
            dist = DIST.get(name, name).replace("_", "-")
            if name in ("playwright", "PIL"):  # the README's screenshot script, a dev tool
                assert path.name == "screenshots.py" and dist in reqs["dev"], f"{path}: {name}"
            elif (path.relative_to(ROOT / "p2d").as_posix(), name) in OPTIONAL_IN:
                assert dist in reqs[OPTIONAL_IN[path.relative_to(ROOT / "p2d").as_posix(), name]]
                assert "except ImportError" in path.read_text(), f"{path}: {name} must stay optional"
            elif name in OPTIONAL:
                assert dist in reqs[OPTIONAL[name]], f"{path}: {name} not in the {OPTIONAL[name]} extra"
            elif name in STUDIO:
                assert in_studio and dist in studio, f"{path}: {name} is the app's, the library must not import it"
            else:
                assert dist in base or (in_studio and dist in studio), f"{path}: imports {name}, which is not declared"
    # torch.utils.tensorboard needs the tensorboard package: the track extra has it
    assert "torch.utils.tensorboard" in (ROOT / "p2d" / "tracking.py").read_text() and "tensorboard" in reqs["track"]


_BLOCK_APP = ("import sys\nfor name in ('gradio', 'plotly', 'pandas', 'starlette'):\n    sys.modules[name] = None  # as if not "
              "installed: importing it raises ModuleNotFoundError\n")


@pytest.mark.slow
def test_library_and_cli_work_without_the_app_packages():
    """Every library module imports with gradio, plotly and pandas missing; `p2d --help` works and `p2d studio`
    says which extra to install (exit 2, one line)."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "p2d").rglob("*.py")
                     if "studio" not in p.parts and p.name != "__main__.py")
    code = _BLOCK_APP + (f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
                         "from p2d.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code, "studio", "--port", "7999"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == ("error: the app needs the studio extra (gradio is not installed): "
                                                   "pip install 'p2d-studio[studio]'")
    assert "Traceback" not in run.stderr
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env,
                            timeout=300, cwd=ROOT)
    assert helped.returncode == 0 and "studio" in helped.stdout and "export" in helped.stdout


def _see_these_packages(venv: Path) -> None:
    """Let the interpreter of ``venv`` import the packages of the running one (a .pth file naming its
    site-packages folders), so `pip install` finds the dependencies installed and downloads none (a bare
    environment would fetch torch's multi-GB CUDA build). Unlike ``--system-site-packages`` this also works
    when the running interpreter is itself a venv, as on a newcomer's machine."""
    import site

    folders = [p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), *sys.path])
               if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(inner, "outer-packages.pth").write_text("".join(f"{p}\n" for p in folders))


@pytest.mark.slow
def test_pip_install_gives_a_working_p2d_command(tmp_path):
    """The README's `pip install .`, as a newcomer runs it: into a fresh virtual environment, with pip's
    defaults (build isolation on: the build gets the setuptools pyproject.toml asks for, whatever setuptools
    the interpreter bundles), gives the `p2d` command. The environment sees this interpreter's packages
    (`_see_these_packages`), so only the build tools are fetched."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    _see_these_packages(venv)
    py = venv / "bin" / "python"
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                             "assets", "tests"))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "."],
                             capture_output=True, text=True, timeout=600, cwd=src)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([str(venv / "bin" / "p2d"), "--help"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0 and "usage: python -m p2d" in out.stdout, out.stderr[-2000:]
    where = subprocess.run([str(py), "-c", "import p2d; print(p2d.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert str(venv) in where.stdout  # the installed copy, not the repo's
