"""`pmet analyze components|deltas`: the paper's Figure 2 and Figure 4 as JSON, CSV, PNG and a table.

Bad input ends with one line on stderr and exit code 2; output files are written only after the whole job
succeeded (staged beside their destination, then moved into place: fileio.Outputs).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from ..console import MODEL_HELP, out_console
from ..console import fail as _fail
from ..errors import ConfigError, PmetError
from ..fileio import Outputs, json_writer

FORCE_HELP = "Replace outputs that exist in --out (only the files pmet wrote there)."

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproduce the paper's analyses (Figure 2, Figure 4).")


def _write_outputs(outputs: Outputs, out: Path, writers: dict[str, Callable[[Path], object]]) -> list[Path]:
    """Call each writer on a staging path, then move every file into `out` (fileio.Outputs' rules)."""
    outputs.write({out: lambda folder: [write(folder / name) for name, write in writers.items()]})
    return [out / name for name in writers]


def _csv_writer(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    return write


@app.command()
def components(
    facts: Path = typer.Option(..., "--facts", "-f",
                               help="ROME known_1000.json, a JSON/JSONL list of {\"prompt\": ...}, a pmet "
                                    "request file, or a .txt file with one prompt per line."),
    out: Path = typer.Option(..., "--out", help="Folder for components.json, components.csv, components.png."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    top_k: int = typer.Option(50, "--top-k", help="k of the top-k vocabulary sets (Eq. 7; the paper uses 50)."),
    limit: int | None = typer.Option(None, help="Use only the first N facts."),
    batch_size: int = typer.Option(32, help="Prompts per forward pass."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
    cache_dir: Path | None = typer.Option(None, help="Cache folder (default $PMET_CACHE_DIR or ~/.cache/pmet)."),
    after_post_norms: bool = typer.Option(
        False, "--after-post-norms",
        help="Gemma 3 (architectures that normalise component outputs): read a^l and m^l after those norms, "
             "i.e. the contributions actually added to the residual stream. No effect elsewhere."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Figure 2: cosine and top-k Jaccard similarity between each MHSA/FFN component's input and output."""
    from ..arch import layout_of
    from ..models import load_model
    from .components import component_similarity, load_prompts
    from .plots import plot_components

    try:
        outputs = Outputs("pmet analyze components", force)
        outputs.folder(out, "--out")
        if top_k < 1:
            raise ConfigError(f"--top-k must be positive, got {top_k}")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {batch_size}")
        prompts = load_prompts(facts, limit=limit)
        t0 = time.perf_counter()
        lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        vocab = lm.model.get_submodule(layout_of(lm.model).spec.unembed).weight.shape[0]
        if top_k > vocab:
            raise ConfigError(f"--top-k {top_k} exceeds the vocabulary size {vocab}")
        t1 = time.perf_counter()
        stats = component_similarity(lm.model, lm.tok, prompts, top_k=top_k, batch_size=batch_size,
                                     progress=not quiet, after_post_norms=after_post_norms)
        t2 = time.perf_counter()
    except PmetError as e:
        _fail(str(e))
        return
    summary = {"model": model, **stats.summary(), "facts": str(facts),
               "timings": {"load_s": round(t1 - t0, 2), "analysis_s": round(t2 - t1, 2)}}
    title = f"{model}: hidden-state change through MHSA and FFN (last token, {stats.n_facts} facts, k={top_k})"
    paths = _write_outputs(outputs, out, {
        "components.json": json_writer(summary, ensure_ascii=False),
        "components.csv": _csv_writer(stats.csv_rows()),
        "components.png": lambda p: plot_components(summary, p, title=title),
    })
    out_console.print(_components_table(summary))
    out_console.print(f"FFN input: {stats.ffn_input}")
    out_console.print(f"{stats.n_facts} facts, {len(stats.layers)} layers in {t2 - t1:.1f} s "
                      f"(model load {t1 - t0:.1f} s); wrote " + ", ".join(str(p) for p in paths))


def _components_table(s: dict) -> Table:
    t = Table(title=f"mean over {s['n_facts']} facts (± std)")
    for col in ("layer", "MHSA cos", "MHSA Jaccard", "FFN cos", "FFN Jaccard"):
        t.add_column(col, justify="right")
    for l in s["layers"]:
        t.add_row(str(l), *(f"{s[c][m][l]:.3f} ± {s[c]['std'][m][l]:.3f}"
                            for c in ("mhsa", "ffn") for m in ("cosine", "jaccard")))
    return t


@app.command()
def deltas(
    patches: list[Path] = typer.Argument(..., help="patch.safetensors files (or folders holding one)."),
    labels: str | None = typer.Option(None, help="Comma-separated line labels, one per patch "
                                                 "(default: the folder name or file stem)."),
    out: Path | None = typer.Option(None, "--out", help="Also write deltas.json, deltas.csv, deltas.png here."),
    title: str = typer.Option("", help="Plot title."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Figure 4: the Frobenius norm of Δ per layer and edited matrix, for one or more edits."""
    from .deltas import COMPONENT_NAMES, delta_norm_table, series
    from .plots import plot_deltas

    try:
        outputs = Outputs("pmet analyze deltas", force)
        if out is not None:
            outputs.folder(out, "--out")
        names = [x.strip() for x in labels.split(",")] if labels else None
        rows = delta_norm_table(patches, names)
    except PmetError as e:
        _fail(str(e))
        return
    t = Table(title="‖Δ‖_F per edited matrix (W_O of the FFN or the MHSA)")
    for col in ("edit", "method", "layer", "matrix", "‖Δ‖_F", "requests"):
        t.add_column(col, justify="right" if col in ("layer", "‖Δ‖_F", "requests") else "left", overflow="fold")
    for r in rows:
        t.add_row(r["label"], r["method"], str(r["layer"]), COMPONENT_NAMES.get(r["component"], r["component"]),
                  f"{r['norm']:.4g}", str(r["n_requests"]))
    out_console.print(t)
    if out is not None:
        lines = series(rows)
        data = {"rows": rows, "series": {k: {"layers": v[0], "norms": v[1]} for k, v in lines.items()}}
        paths = _write_outputs(outputs, out, {
            "deltas.json": json_writer(data, ensure_ascii=False),
            "deltas.csv": _csv_writer(rows),
            "deltas.png": lambda p: plot_deltas(lines, p, title=title),
        })
        out_console.print("wrote " + ", ".join(str(p) for p in paths))
