"""`pmet apply`, `pmet revert`, `pmet show`: what is done with patches after the edit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .console import FORCE_HELP, MODEL_HELP, out_console
from .console import fail as _fail
from .errors import ConfigError, PmetError
from .fileio import Outputs

MODEL_FILES = ("config.json", "model.safetensors", "README.md")
DTYPE_OPTION = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16.")
DEVICE_OPTION = typer.Option("cpu", help="cpu, cuda, cuda:N or auto.")
CACHE_OPTION = typer.Option(None, help="Cache folder (default $PMET_CACHE_DIR or ~/.cache/pmet).")
FORCE_OPTION = typer.Option(False, "--force", help=FORCE_HELP)


def load_chain(paths: list[Path]) -> list[tuple[str, Any]]:
    """(source, EditResult) for each patch path, in the order given."""
    from .patch import EditResult

    return [(str(p), EditResult.load(p)) for p in paths]


def model_writer(lm: Any, chain: list[Any], base: str) -> Any:
    """A writer of the model, its tokenizer (save_pretrained) and, when patches are applied, their model card."""
    def write(folder: Path) -> None:
        lm.model.save_pretrained(folder)
        lm.tok.save_pretrained(folder)
        if chain:
            from .card import card_text

            (folder / "README.md").write_text(card_text(chain, base), encoding="utf-8")
    return write


def apply_command(
    patches: list[Path] = typer.Argument(..., help="Patches (patch.safetensors, or folders holding one), in the "
                                         "order they were made."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="Save the patched model (save_pretrained format + README.md "
                             "model card) here."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    cache_dir: Path | None = CACHE_OPTION,
    force: bool = FORCE_OPTION,
) -> None:
    """Apply saved patches, in order, to the base model they were made on, and save the edited model."""
    try:
        outputs = Outputs("pmet apply", force)
        outputs.folder(out, "--out", MODEL_FILES)
        from .models import load_model  # torch and transformers: imported once the cheap checks passed
        from .patch import apply_chain

        chain = load_chain(patches)
        lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        apply_chain(lm.model, chain)
        outputs.write({out: model_writer(lm, [p for _, p in chain], model)})
    except PmetError as e:
        _fail(str(e))
        return
    n = sum(len(p.requests) for _, p in chain)
    out_console.print(f"applied {len(chain)} patch{'es' if len(chain) > 1 else ''} ({n} requests); saved to {out}")


def revert_command(
    patches: list[Path] = typer.Argument(..., help="Patches to undo, last applied first."),
    model: str = typer.Option(..., "--model", "-m", help="The edited model (directory, or any model source)."),
    out: Path = typer.Option(..., "--out", help="Save the restored model here."),
    base: str | None = typer.Option(None, help="The unedited base model, where compact patches read the original "
                                    "weights (default: the model the first patch of the chain was made on)."),
    keep: list[Path] = typer.Option([], "--keep", help="Patches below these in their chain that stay applied, in "
                                    "order (repeatable): compact patches rebuild their originals from them."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    cache_dir: Path | None = CACHE_OPTION,
    force: bool = FORCE_OPTION,
) -> None:
    """Restore the weights an edited model had before its last patches, bit-exactly."""
    try:
        outputs = Outputs("pmet revert", force)
        outputs.folder(out, "--out", MODEL_FILES)
        from .models import load_model  # torch and transformers: imported once the cheap checks passed
        from .patch import revert_chain

        undo, kept = load_chain(patches), load_chain(keep)
        base_name = base or (kept or undo[::-1])[0][1].model_name
        lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        loaded: dict[str, Any] = {}

        def base_model() -> Any:
            if "m" not in loaded:
                loaded["m"] = load_model(base_name, dtype=dtype, device="cpu", cache_dir=cache_dir).model
            return loaded["m"]

        revert_chain(lm.model, undo, kept, base_model if base_name else None)
        outputs.write({out: model_writer(lm, [p for _, p in kept], base_name or "the base model")})
    except PmetError as e:
        _fail(str(e))
        return
    n = sum(len(p.updates) for _, p in undo)
    out_console.print(f"reverted {len(undo)} patch{'es' if len(undo) > 1 else ''} ({n} weights restored); saved to "
                      f"{out}")


def show_command(patch: Path = typer.Argument(..., help="patch.safetensors, or the folder holding it.")) -> None:
    """Print what a patch holds (model, method, requests, layers, norms, sizes) without loading a model."""
    from .patch_info import describe

    try:
        out_console.print(describe(patch), highlight=False, markup=False, soft_wrap=True)
    except PmetError as e:
        _fail(str(e))


def export_command(
    patches: list[Path] = typer.Argument(..., help="Patches to apply, in the order they were made."),
    model: str = typer.Option(..., "--model", "-m", help="The base model: an embedded alias or a .gguf file."),
    gguf: Path = typer.Option(..., "--gguf", help="The GGUF file to write."),
    tensor_type: str = typer.Option("f32", help="Type of the edited tensors: f32 (the exact edited weights), f16 "
                                    "(rounded), or source (re-quantised to the base tensor's type: may erase the "
                                    "edit, docs/PATCHES.md)."),
    cache_dir: Path | None = CACHE_OPTION,
    force: bool = FORCE_OPTION,
) -> None:
    """Write the edited model as a GGUF file (llama.cpp, ollama): the base GGUF with the edited tensors replaced
    and the model card in its metadata; every other tensor keeps its quantisation."""
    try:
        outputs = Outputs("pmet export", force)
        outputs.file(gguf, "--gguf")
        if tensor_type not in ("f32", "f16", "source"):
            raise ConfigError("--tensor-type must be f32, f16 or source")
        from .card import card_metadata  # torch and transformers: imported once the cheap checks passed
        from .export import write_gguf
        from .models import gguf_file, load_model
        from .patch import apply_chain, get_weight_by_name

        source = gguf_file(model, cache_dir)
        if source is None:
            raise ConfigError(f"--model {model}: pmet export writes a GGUF for a model loaded from one (an embedded "
                              "alias or a .gguf file); for other models use pmet apply (Hugging Face format)")
        chain = load_chain(patches)
        lm = load_model(model, dtype="float32", device="cpu", cache_dir=cache_dir)
        apply_chain(lm.model, chain)
        names = list(dict.fromkeys(n for _, p in chain for n in p.deltas))
        edited = {n: get_weight_by_name(lm.model, n) for n in names}
        card = card_metadata([p for _, p in chain], model)
        outputs.write({gguf: lambda tmp: write_gguf(source, str(tmp), edited, tensor_type, card)})
    except PmetError as e:
        _fail(str(e))
        return
    out_console.print(f"wrote {gguf}: {len(names)} edited tensors ({tensor_type}), every other tensor as in "
                      f"{source.name}")
