"""`pmet eval`: measure a method on CounterFact or zsRE against the unedited model (docs/EVALUATION.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..console import METHOD_HELP, MODEL_HELP, NULL_SPACE_HELP, SET_HELP, console, fail, out_console
from ..errors import ConfigError, PmetError

DATA_HELP = ("Dataset JSON: full-format or EasyEdit CounterFact; MEND or KnowEdit zsRE (e.g. "
             "../shared/data/counterfact_rome_subsets/...).")
ABLATION_HELP = "no-attn-delta | update-attn | even-spread (Table 3); stream-residual (ours, docs/METHOD.md)."
ZSRE_TARGET_HELP = "zsRE MEND format: new target = answers[0] (ROME/MEMIT) or alt (EasyEdit)."
PROTOCOL_HELP = ("teacher-forced (the papers' metrics) or wild (also greedy answers judged against the targets, in "
                 "three contexts: docs/EVALUATION.md).")
BATCH_HELP = ("Prompts per teacher-forced evaluation pass, each with its targets (default: 64 on a CPU, from free "
              "memory on a GPU).")
GENERATION_BATCH_HELP = "Prompts sampled together (default: 256 on a CPU, from free memory on a GPU)."
CHECKPOINT_HELP = ("ROME, FT-W, --sequential-batches: save the edit's progress every minute (in the cache) so that "
                   "rerunning an interrupted run resumes it.")
DRIFT_HELP = ("Perplexity drift and top-1 agreement with the unedited model on 4,096 tokens of held-out text "
              "(WikiText-2's test split under $PMET_DATA_DIR, default ../shared/data).")
CURVE_HELP = ("With --sequential-batches (or ROME/FT-W): measure efficacy, generalization, specificity and perplexity "
              "every M steps of the edit and write curve.json/curve.png (docs/EVALUATION.md).")
CURVE_SAMPLE_HELP = "--curve-every: records whose neighbourhood prompts measure specificity at every point."
FORCE_HELP = "Replace the outputs of an earlier run in --out (only the files pmet wrote there)."


def eval_command(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("pmet", help=METHOD_HELP),
    dataset: str = typer.Option("counterfact", help="counterfact or zsre."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    edits: int | None = typer.Option(None, "--edits", "-n", min=1, help="Number of records (edits); default: all."),
    slice_: str = typer.Option("test", "--slice", help="dev, test or all (docs/EVALUATION.md: fixed by case id)."),
    ablation: str | None = typer.Option(None, help=ABLATION_HELP),
    config: str | None = typer.Option(None, "--config", "-c", help="Preset name or YAML/JSON hparams file."),
    sequential_batches: int | None = typer.Option(None, help="Apply the N edits as consecutive batches of K."),
    curve_every: int | None = typer.Option(None, min=1, metavar="M", help=CURVE_HELP),
    curve_sample: int = typer.Option(100, min=1, help=CURVE_SAMPLE_HELP),
    out: Path = typer.Option(..., "--out", help="Output folder (records.jsonl, summary.json/.md, PNGs)."),
    label: str | None = typer.Option(None, help="Name of the method in tables (default: method[+ablation])."),
    zsre_target: str = typer.Option("answers", help=ZSRE_TARGET_HELP),
    protocol: str = typer.Option("teacher-forced", help=PROTOCOL_HELP),
    wild_tokens: int = typer.Option(20, min=1, help="wild protocol: new tokens per greedy answer."),
    drift: bool = typer.Option(True, help=DRIFT_HELP),
    drift_text: Path | None = typer.Option(None, help="Held-out text for --drift (default: WikiText-2 test split)."),
    generation: bool = typer.Option(True, help="Sample generations for fluency/consistency (full CounterFact)."),
    generation_prompts: int | None = typer.Option(None, help="Generation prompts per record (default: all)."),
    generation_length: int = typer.Option(100, help="Tokens per generated text, prompt included."),
    tfidf_dir: Path | None = typer.Option(None, help="Folder with ROME's idf.npy and tfidf_vocab.json."),
    attribute_snippets: Path | None = typer.Option(None, help="ROME's attribute_snippets.json (consistency)."),
    batch_size: int | None = typer.Option(None, min=1, help=BATCH_HELP),
    generation_batch_size: int | None = typer.Option(None, min=1, help=GENERATION_BATCH_HELP),
    target_cache: bool = typer.Option(True, help="Reuse cached target vectors (keyed by model, request, config)."),
    checkpoint: bool = typer.Option(True, help=CHECKPOINT_HELP),
    corpus: str | None = typer.Option(None, help="C0 corpus: a text file/folder, hf:DATASET, self or auto."),
    stats_tokens: int | None = typer.Option(None, help="Tokens for C0 (default: the preset's mom2_n_tokens)."),
    layers: str | None = typer.Option(None, help="Override the edited layers, e.g. 3,4,5,6,7."),
    set_: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help=SET_HELP),
    v_dtype: str | None = typer.Option(None, help="Dtype of layers L..N-1 in the target optimisation."),
    seed: int = typer.Option(0, help="Seed of context templates and generation sampling."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
    cache_dir: Path | None = typer.Option(None, help="Cache folder (default $PMET_CACHE_DIR or ~/.cache/pmet)."),
    null_space: bool = typer.Option(False, "--null-space", help=NULL_SPACE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Edit N benchmark records with one method and report the paper's metrics, the unedited model first."""
    from ..config import config_for, parse_layers, parse_overrides
    from ..fileio import Outputs

    try:
        if (tfidf_dir is None) != (attribute_snippets is None):
            raise ConfigError("consistency needs both --tfidf-dir and --attribute-snippets")
        if zsre_target not in ("answers", "alt"):
            raise ConfigError("--zsre-target must be 'answers' or 'alt'")
        if protocol not in ("teacher-forced", "wild"):
            raise ConfigError("--protocol must be 'teacher-forced' or 'wild'")
        outputs = Outputs("pmet eval", force)
        outputs.folder(out, "--out", ("records.jsonl", "summary.json", "summary.md", "metrics.png", "margins.png",
                                      *(("curve.json", "curve.png") if curve_every else ())))
        settings = parse_overrides(set_)
        overrides = {"mom2_n_tokens": stats_tokens, "seed": seed, "v_compute_dtype": v_dtype,
                     "null_space": True if null_space else None,
                     "layers": parse_layers(layers)}
        from ..models import load_model  # torch: imported once the cheap checks passed
        from .data import load_eval_records
        from .evaluate import EvalOptions
        from .run import run_eval

        records = load_eval_records(data, dataset, n=edits, slice_=slice_, zsre_target=zsre_target)
        curve = _curve_spec(curve_every, curve_sample, method, sequential_batches, len(records))
        with console.status(f"loading {model}"):
            lm = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)
        cfg = config_for(lm.model.config.model_type, lm.preset, config, method, ablation, overrides, settings)
        opts = EvalOptions(batch_size=batch_size, generation_batch_size=generation_batch_size, generation=generation,
                           generation_prompts=generation_prompts, generation_length=generation_length, seed=seed,
                           wild=protocol == "wild", wild_tokens=wild_tokens, drift=drift,
                           drift_text=str(drift_text) if drift_text else None,
                           tfidf_dir=str(tfidf_dir) if tfidf_dir else None,
                           attribute_snippets=str(attribute_snippets) if attribute_snippets else None)
        name = label or (f"{method}+{ablation}" if ablation else method) + ("+null-space" if null_space else "")
        summary = run_eval(lm, records, method, cfg, out, label=name,
                           opts=opts, sequential_batches=sequential_batches, target_cache=target_cache,
                           cache_dir=cache_dir, corpus=corpus, progress=not quiet,
                           extra={"data": str(data), "slice": slice_, "ablation": ablation, "settings": settings},
                           checkpoint=checkpoint, outputs=outputs, curve=curve)
    except PmetError as e:
        fail(str(e))
        return
    _print_summary(summary, out)


def _curve_spec(every: int | None, sample: int, method: str, sequential_batches: int | None, n: int):
    """The curve to measure (None without --curve-every); a clear error when the edit is not sequential."""
    if every is None:
        return None
    from ..methods import get_method
    from .curve import CurveSpec

    if not get_method(method).sequential and not (sequential_batches and sequential_batches < n):
        raise ConfigError(f"--curve-every needs a sequential edit: --sequential-batches K with K < the {n} edits "
                          "(or the rome/ft methods, which edit one request at a time)")
    return CurveSpec(every=every, sample=sample)


def _print_summary(summary: dict, out: Path) -> None:
    from .report import markdown_table

    out_console.print(markdown_table([summary]))
    out_console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()))
    if summary.get("resumed_edits"):
        out_console.print(f"resumed an interrupted run after {summary['resumed_edits']} of {summary['n']} edits")
    curve = ", curve.json, curve.png" if summary.get("curve_points") else ""
    out_console.print(f"written to {out}/ (records.jsonl, summary.json, summary.md, metrics.png, margins.png{curve})")
