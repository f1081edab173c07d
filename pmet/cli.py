"""The `pmet` command: edit, apply, revert, stats.

Bad input ends with one line on stderr (`error: <file>: record N: field 'x': problem`) and exit code 2;
outputs (report, patch, saved model) are written only after the whole job succeeded, each atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import typer

from .console import FORCE_HELP, METHOD_HELP, MODEL_HELP, NULL_SPACE_HELP, SET_HELP, console, out_console
from .console import fail as _fail
from .console import fail_line as _fail_line
from .errors import ConfigError, PmetError
from .fileio import Outputs, json_writer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PMET: precise model editing in a transformer (Li et al., AAAI 2024).")


def _config_for(lm: Any, config: str | None, method: str, ablation: str | None = None,
                overrides: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Any:
    """config.config_for for a loaded model (its preset, else its family's)."""
    from .config import config_for

    return config_for(lm.model.config.model_type, lm.preset, config, method, ablation, overrides or {}, settings)


@app.command()
def edit(
    requests: Path = typer.Option(..., "--requests", "-r", help="JSONL, JSON or CSV file of edit requests."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    config: str | None = typer.Option(None, "--config", "-c", help="Preset name or YAML/JSON hparams file."),
    method: str = typer.Option("pmet", help=METHOD_HELP),
    ablation: str | None = typer.Option(
        None, help="no-attn-delta | update-attn | even-spread (Table 3); stream-residual (ours, docs/METHOD.md)."),
    report: Path | None = typer.Option(None, "--report", help="Write the before/after report JSON here."),
    out: Path | None = typer.Option(None, "--out", help="Write the patch (patch.safetensors) into this folder."),
    save_model: bool = typer.Option(False, "--save-model", help="With --out: also save the edited model there."),
    corpus: str | None = typer.Option(None, help="C0 corpus: a text file/folder, hf:DATASET, self or auto."),
    stats_tokens: int | None = typer.Option(None, help="Tokens for C0 (default: the preset's mom2_n_tokens)."),
    limit: int | None = typer.Option(None, help="Use only the first N requests."),
    layers: str | None = typer.Option(None, help="Override the critical layers, e.g. 3,4,5,6,7."),
    set_: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help=SET_HELP),
    seed: int | None = typer.Option(None, help="Seed of the context templates and self-sampled corpora."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    v_dtype: str | None = typer.Option(None, help="Dtype of layers L..N-1 in the target optimisation."),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
    cache_dir: Path | None = typer.Option(None, help="Cache folder (default $PMET_CACHE_DIR or ~/.cache/pmet)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    max_target_tokens: int = typer.Option(64, help="Refuse a target_new longer than this many tokens."),
    target_cache: bool = typer.Option(True, help="Reuse target vectors cached by an earlier (or interrupted) run "
                                      "(keyed by model, request, templates and config)."),
    null_space: bool = typer.Option(False, "--null-space", help=NULL_SPACE_HELP),
    full_patch: bool = typer.Option(False, "--full-patch", help="Store every Δ in full and the original weights "
                                    "in the patch (reverts without the base model; larger)."),
    patch_on: list[Path] = typer.Option([], "--patch-on", help="Apply these patches (in order) first and edit the "
                                        "model they make; the new patch records them as its chain (repeatable)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Apply all requests to a model as ONE batch edit and show what each edit did."""
    from .config import parse_layers, parse_overrides
    from .requests import check_target_lengths, load_requests

    try:
        outputs = _edit_outputs(out, report, save_model, force)
        settings = parse_overrides(set_)
        overrides = {"mom2_n_tokens": stats_tokens, "seed": seed, "v_compute_dtype": v_dtype,
                     "null_space": True if null_space else None,
                     "layers": parse_layers(layers)}
        reqs = load_requests(requests, limit=limit, one_batch=True)
        from .edit_report import measure  # torch: imported once the cheap checks passed
        from .methods.apply import apply_method
        from .models import load_model

        t0 = time.perf_counter()
        with console.status(f"loading {model}"):
            lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        load_s = time.perf_counter() - t0
        check_target_lengths(reqs, lm.tok, max_target_tokens, str(requests))
        cfg = _config_for(lm, config, method, ablation, overrides, settings)
        chain, given = _on_chain(lm, patch_on, method, cfg, corpus, cache_dir, quiet)
        t = time.perf_counter()
        before = measure(lm.model, lm.tok, reqs)
        measure_s = time.perf_counter() - t
        result = apply_method(method, lm.model, lm.tok, reqs, cfg, corpus=corpus, cache_dir=cache_dir,
                              model_name=model, progress=not quiet, target_cache=target_cache, **given)
        _chain_onto(result, chain)
        if result.stats.get("target_cache_hits"):
            console.print(f"reused {result.stats['target_cache_hits']} of {len(reqs)} target vectors from the cache "
                          "(an earlier or interrupted run)")
        t = time.perf_counter()
        after = measure(lm.model, lm.tok, reqs)
        measure_s += time.perf_counter() - t
    except PmetError as e:
        _fail(str(e))
        return
    from .edit_report import report_rows, summary_line, table

    rows = report_rows(reqs, before, after, result.diagnostics())
    out_console.print(table(rows))
    out_console.print(summary_line(rows, result))
    data = {
        "model": model, "config": cfg.to_dict(),
        "timings": {"load": load_s, **result.timings, "measure": measure_s},
        "stats": result.stats, "context_templates": result.context_templates,
        "delta_norms": result.delta_norms(), "stream_check": result.stream_check, "requests": rows,
    }
    _write_edit(outputs, out, report, save_model, lm, result, data, full_patch, [p for _, p in chain])


def _on_chain(lm: Any, patch_on: list[Path], method: str, cfg: Any, corpus: str | None, cache_dir: Path | None,
              quiet: bool) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """With --patch-on: the chain applied to the base model, and the base model's context templates and C0 for
    the edit on top (the sequential protocol of --sequential-batches: statistics of the unedited model), and with
    --null-space the keys the chain's patches stored (K_p K_pᵀ, as earlier batches')."""
    if not patch_on:
        return [], {}
    from .editor import prepare
    from .methods import get_method
    from .patch import apply_chain, chain_keys, short
    from .patch_cli import load_chain

    chain = load_chain(patch_on)
    given: dict[str, Any] = {}
    if get_method(method).statistics:
        prep = prepare(lm.model, lm.tok, cfg, corpus=corpus, cache_dir=cache_dir, progress=not quiet)
        given = {"c0": prep.c0, "context_templates": prep.templates}
    if cfg.null_space:  # the chain's edits are protected as earlier batches are (their stored keys)
        given["earlier_keys"], without = chain_keys([p for _, p in chain])
        if without:
            console.print(f"note: patch{'es' if len(without) > 1 else ''} {', '.join(short(x) for x in without)} "
                          "stored no keys (made without --null-space): the null space does not protect their edits")
    apply_chain(lm.model, chain)
    return chain, given


def _chain_onto(result: Any, chain: list[tuple[str, Any]]) -> None:
    """Record the patches the edit was made on top of (ids in order) and the chain's base model."""
    if chain:
        root = chain[0][1]
        result.parents = [*root.parents, *(p.patch_id for _, p in chain)]
        result.base_fingerprint = root.base_fingerprint or root.fingerprint


def _edit_outputs(out: Path | None, report: Path | None, save_model: bool, force: bool) -> Outputs:
    """`pmet edit`'s outputs, declared (and checked) before any work."""
    if save_model and out is None:
        raise ConfigError("--save-model needs --out DIR")
    outputs = Outputs("pmet edit", force)
    if out is not None:
        outputs.folder(out, "--out", ("patch.safetensors", "model"))
    if report is not None:
        outputs.file(report, "--report")
    return outputs


def _write_edit(outputs: Outputs, out: Path | None, report: Path | None, save_model: bool, lm: Any, result: Any,
                data: dict, full_patch: bool, chain: list[Any]) -> None:
    """Write the patch (and the edited model, with its model card) into `out` and the report, all or nothing
    (fileio.Outputs)."""
    from .patch_cli import model_writer

    writers: dict[Path, Any] = {}
    if out is not None:
        writers[out] = lambda folder: (result.save(folder, full=full_patch), save_model and model_writer(
            lm, [*chain, result], data["model"])(folder / "model"))
    if report is not None:
        writers[report] = json_writer(data)
    outputs.write(writers)  # a PmetError here is reported by main() as one line
    if out is not None:
        out_console.print(f"patch written to {out / 'patch.safetensors'}"
                          + (f"; edited model in {out / 'model'}" if save_model else ""))
    if report is not None:
        out_console.print(f"report written to {report}")


@app.command()
def stats(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    corpus: str = typer.Option("auto", help="A text file/folder, hf:DATASET[:CONFIG[:SPLIT]], self or auto."),
    tokens: int = typer.Option(100_000, "--tokens", help="Number of corpus tokens."),
    config: str | None = typer.Option(None, "--config", "-c", help="Preset or file giving the critical layers."),
    layers: str | None = typer.Option(None, help="Layers, e.g. 3,4,5 (default: the config's)."),
    component: str = typer.Option("ffn", help="ffn (FFN output projection keys) or attn (MHSA output projection)."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto"),
    cache_dir: Path | None = typer.Option(None),
    force: bool = typer.Option(False, help="Recompute even if cached."),
) -> None:
    """Compute and cache C0 = E(k kᵀ) of the FFN keys for all critical layers, in one pass over a corpus."""
    try:
        from .config import parse_layers

        chosen = parse_layers(layers)
        if component not in ("ffn", "attn"):
            raise ConfigError("--component must be ffn or attn")
        from .models import fingerprint, load_model  # torch: imported once the cheap checks passed
        from .stats import get_c0

        lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        layer_list = chosen or _config_for(lm, config, "pmet").layers
        c0, info = get_c0(lm.model, lm.tok, layer_list, corpus, tokens, component=component, cache_dir=cache_dir,
                          fingerprint=fingerprint(lm.model), force=force)
    except PmetError as e:
        _fail(str(e))
        return
    source = "text sampled from the model itself" if info.corpus_kind == "self" else info.corpus
    out_console.print(f"C0 for layers {layer_list} ({component}) from {source}: {info.n_tokens} tokens, "
                      f"{info.seconds:.1f} s")
    for layer, t in sorted(c0.items()):
        out_console.print(f"  layer {layer}: {tuple(t.shape)}, trace {float(t.trace()):.4g}")


@app.command()
def trace(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    facts: Path = typer.Option(..., "--facts", help="ROME's known_1000.json (prompt, subject, attribute)."),
    n: int = typer.Option(50, "--n", help="Facts to trace: the first N the model knows."),
    samples: int = typer.Option(10, help="Noise samples per fact (ROME: 10)."),
    window: int = typer.Option(10, help="Layers restored together for ffn/attn (ROME: 10)."),
    kinds: str = typer.Option("hidden,ffn,attn", help="States to restore: hidden, ffn, attn."),
    span: int | None = typer.Option(None, help="Size of the suggested layer range (default: the preset's)."),
    plot_facts: int = typer.Option(3, help="Also plot the per-token heatmaps of the first K facts."),
    out: Path = typer.Option(..., "--out", help="Output folder (trace.json, heatmaps)."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto"),
    cache_dir: Path | None = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Causal tracing (ROME): where does the model recall facts? Heatmaps and a suggested critical-layer range."""
    try:
        outputs = Outputs("pmet trace", force)
        outputs.folder(out, "--out", ("trace.json", "average_indirect_effect.png"))
        try:
            raw = json.loads(facts.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # missing, not UTF-8, not JSON
            raise ConfigError(f"{facts}: cannot read facts: {e}") from None
        for i, f in enumerate(raw):
            for key in ("prompt", "subject", "attribute"):
                if not isinstance(f, dict) or not isinstance(f.get(key), str):
                    raise ConfigError(f"{facts}: record {i}: field '{key}': required string")
        import numpy as np  # torch: imported once the cheap checks passed
        from tqdm.auto import tqdm

        from . import causal_trace as ct
        from .models import load_model

        kind_list = tuple(k.strip() for k in kinds.split(","))
        if not set(kind_list) <= set(ct.KINDS):
            raise ConfigError(f"--kinds must be a subset of {','.join(ct.KINDS)}")
        lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        span = span or len(_config_for(lm, None, "pmet").layers)
        chosen = ct.known_facts(lm.model, lm.tok, raw, n)
        if not chosen:
            raise ConfigError(f"{facts}: the model knows none of the facts (greedy answer = attribute)")
        noise = 3 * ct.embedding_noise_std(lm.model, lm.tok, [f["subject"] for f in raw])
        traces = [ct.trace_fact(lm.model, lm.tok, f["prompt"], f["subject"], noise=noise, samples=samples,
                                window=window, kinds=kind_list)
                  for f in tqdm(chosen, desc="tracing", unit="fact", disable=quiet)]
    except PmetError as e:
        _fail(str(e))
        return
    mean = {k: np.nanmean(np.stack([t.grouped(k) for t in traces]), axis=0) for k in kind_list}
    suggested = ct.suggest_layers(mean, span) if "ffn" in mean else None
    data = {
        "model": model, "n_facts": len(traces), "samples": samples, "window": window, "noise": noise,
        "groups": list(ct.GROUPS), "average_indirect_effect": {k: v.tolist() for k, v in mean.items()},
        "suggested_layers": suggested,
        "facts": [{"prompt": t.prompt, "subject": t.subject, "answer": t.answer, "clean": t.clean,
                   "corrupted": t.corrupted, "tokens": t.tokens, "subject_range": list(t.subject_range),
                   "scores": {k: v.tolist() for k, v in t.scores.items()}} for t in traces],
    }

    def write(folder: Path) -> None:
        json_writer(data)(folder / "trace.json")
        ct.plot_grouped(mean, len(traces), model, str(folder / "average_indirect_effect.png"))
        for i, t in enumerate(traces[:plot_facts]):
            ct.plot_fact(t, str(folder / f"fact_{i}.png"))

    outputs.write({out: write})  # a PmetError here is reported by main() as one line
    out_console.print(f"traced {len(traces)} facts the model knows (of {len(raw)}); noise {noise:.3g}")
    if suggested is not None:
        out_console.print(f"suggested critical layers (max FFN effect at the last subject token, span {span}): "
                          f"{suggested[0]}-{suggested[-1]}")
    out_console.print(f"written to {out}/ (trace.json, average_indirect_effect.png, fact_*.png)")


from .analysis.cli import app as analyze_app  # noqa: E402
from .evaluation.cli import eval_command  # noqa: E402
from .patch_cli import apply_command, export_command, revert_command, show_command  # noqa: E402

app.command("eval")(eval_command)
app.command("apply")(apply_command)
app.command("revert")(revert_command)
app.command("show")(show_command)
app.command("export")(export_command)

app.add_typer(analyze_app, name="analyze", help="Reproduce the paper's analyses (Figure 2, Figure 4).")


# click's errors, and the copy of them that newer typer versions vendor (typer._click) and raise instead
_CLICK_ERRORS = tuple({click.ClickException,
                       next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})


def main() -> None:
    """The `pmet` entry point: every failure ends as one line on stderr; `--debug` shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries only our progress bars and one-line errors
    hf_logging.set_verbosity_error()
    interrupted = "interrupted: no output written (finished work is cached; rerun to resume)"
    try:
        code = app(standalone_mode=False)  # typer returns 130 for Ctrl-C
    except (click.exceptions.Abort, KeyboardInterrupt):
        code = 130
    except _CLICK_ERRORS as e:  # usage errors: an unknown option, a value of the wrong type or range
        _fail_line(f"{e.format_message()} (see --help)")
        sys.exit(e.exit_code)
    except PmetError as e:
        if debug:
            raise
        _fail_line(str(e))
        sys.exit(2)
    except Exception as e:  # a failure no check above foresaw: still one line, the traceback on request
        if debug:
            raise
        _fail_line(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        sys.exit(1)
    if code == 130:
        console.print(interrupted)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
