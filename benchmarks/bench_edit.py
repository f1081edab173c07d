"""Speed of the two batched stages, each against its baseline run in the same process.

0. Target optimisation (Eq. 10), suffix replay (the default: each step replays layers L..N-1 only at positions
   from the subject's last token on) vs full replay (every position), same requests and config: time per
   request and per Adam step, step counts, the largest relative difference of v, and the peak memory of each.
   `--only-replay` runs this part alone.

1. Target optimisation (Eq. 10) for N CounterFact requests: all requests in one batch vs one request at a
   time (the reference's loop), same config and context templates.
2. C0 statistics for all critical layers: one pass over the corpus vs one pass per layer.

    python benchmarks/bench_edit.py [--requests 32] [--steps 20] [--stats-tokens 20000] [--dtype float32]

3. With `--variant "FIELD=VALUE FIELD=VALUE"` (repeatable): the batched target optimisation under each variant of
   the config (e.g. larger batches on a GPU, `v_compute_dtype=bfloat16`) against the preset's, same process,
   with the largest relative difference of v. `--only-variants` skips 0, 1 and 2. On a CUDA device the preset's
   `batch_sizing: auto` sizes the batches from free memory (logged); `--variant batch_sizing=fixed` is the baseline.

    python benchmarks/bench_edit.py --only-variants --variant "v_batch_size=128 v_rows_per_pass=256" \
        --variant "v_compute_dtype=bfloat16"

Prints the timings and ratios; record them in docs/PERFORMANCE.md with the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from pmet.arch import layout_of
from pmet.config import load_config, parse_overrides
from pmet.corpus import parse_corpus
from pmet.editor import context_templates_for
from pmet.models import fingerprint, load_model
from pmet.requests import load_requests
from pmet.stats import compute_c0
from pmet.targets import compute_targets

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variant", action="append", default=[], metavar='"FIELD=VALUE ..."',
                    help="config variant of the batched targets, timed against the preset's (repeatable)")
    ap.add_argument("--only-variants", action="store_true", help="skip the one-at-a-time and C0 comparisons")
    ap.add_argument("--only-replay", action="store_true", help="run the suffix-vs-full replay comparison only")
    ap.add_argument("--peak-memory-of", choices=["full", "suffix"], help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args()
    variants = [parse_overrides(v.split(), option="--variant") for v in args.variant]

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("pmet.sizing").setLevel(logging.INFO)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    model, tok = lm.model, lm.tok
    layout = layout_of(model)
    cfg = load_config(lm.preset or "smollm2-135m")
    if args.steps:
        cfg = cfg.replace(v_num_grad_steps=args.steps)
    reqs = load_requests(DATA / "counterfact_easyedit" / "counterfact-train.json", limit=args.requests)
    templates = context_templates_for(model, tok, cfg, fingerprint(model))
    dev = next(model.parameters()).device
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, device {dev}, dtype {args.dtype}")
    print(f"model {args.model}, layers {cfg.layers}, {len(reqs)} requests, {cfg.v_num_grad_steps} steps budget")

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    # warm-up (kernels, allocator, CUDA context) so that the first timed run is not charged for it
    compute_targets(model, tok, layout, reqs[:2], templates, cfg.replace(v_num_grad_steps=2))
    if args.peak_memory_of:
        print(peak_memory_of(lambda c: compute_targets(model, tok, layout, reqs, templates, c),
                             cfg.replace(replay=args.peak_memory_of), dev))
        return
    if not args.only_variants:
        argv = [a for a in sys.argv[1:] if a != "--only-replay"]
        compare_replay(lambda c: timed(lambda: compute_targets(model, tok, layout, reqs, templates, c)), cfg,
                       len(reqs), dev, argv)
    if args.only_replay:
        return
    batched, t_batched = timed(lambda: compute_targets(model, tok, layout, reqs, templates, cfg))
    steps = sum(d.steps for d in batched.diagnostics)
    print(f"targets, preset batches (v_batch_size {cfg.v_batch_size}, v_rows_per_pass {cfg.v_rows_per_pass}, "
          f"{cfg.v_compute_dtype}): {t_batched:.1f} s, {steps} Adam steps in all")
    for items, text in zip(variants, args.variant, strict=True):
        vcfg = cfg.replace(**items)
        other, t_other = timed(lambda c=vcfg: compute_targets(model, tok, layout, reqs, templates, c))
        diff = (other.ffn - batched.ffn).norm(dim=-1) / batched.ffn.norm(dim=-1)
        print(f"targets, {text}: {t_other:.1f} s, speed-up x{t_batched / t_other:.2f} "
              f"({sum(d.steps for d in other.diagnostics)} Adam steps; relative difference of v: max "
              f"{float(diff.max()):.2e}, median {float(diff.median()):.2e})")
    if args.only_variants:
        return
    single_cfg = cfg.replace(v_batch_size=1)
    singles, t_single = timed(lambda: compute_targets(model, tok, layout, reqs, templates, single_cfg))
    diff = (batched.ffn - singles.ffn).norm(dim=-1) / singles.ffn.norm(dim=-1)
    print(f"targets: batched {t_batched:.1f} s, one at a time {t_single:.1f} s, "
          f"speed-up x{t_single / t_batched:.2f} ({steps} Adam steps in all; max relative difference of v "
          f"{float(diff.max()):.2e})")

    corpus = parse_corpus(str(DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"))
    _, t_one = timed(lambda: compute_c0(model, tok, cfg.layers, corpus, args.stats_tokens, progress=False))
    _, t_per = timed(lambda: [compute_c0(model, tok, [layer], corpus, args.stats_tokens, progress=False)
                              for layer in cfg.layers])
    print(f"stats ({args.stats_tokens} tokens, {len(cfg.layers)} layers): one pass {t_one:.1f} s, "
          f"one pass per layer {t_per:.1f} s, speed-up x{t_per / t_one:.2f}")


def compare_replay(run, cfg, n: int, dev: torch.device, argv: list[str]) -> None:
    """Full vs suffix replay of the same target optimisation: time, Adam steps, differences; then the peak memory
    of each, measured in a child process of its own (a sampling thread would slow the timed runs)."""
    res = {mode: run(cfg.replace(replay=mode)) for mode in ("full", "suffix")}
    (full, t_full), (suffix, t_suffix) = res["full"], res["suffix"]
    steps_f, steps_s = ([d.steps for d in r.diagnostics] for r in (full, suffix))
    diff = (suffix.ffn - full.ffn).norm(dim=-1) / full.ffn.norm(dim=-1)
    for mode, (r, t) in res.items():
        steps = sum(d.steps for d in r.diagnostics)
        print(f"targets, {mode} replay: {t:.1f} s, {t / n:.2f} s per request, {1000 * t / max(steps, 1):.0f} ms per "
              f"request-step ({steps} Adam steps summed over requests)")
    print(f"suffix replay speed-up x{t_full / t_suffix:.2f}; step counts "
          f"{'equal for every request' if steps_f == steps_s else f'differ: {steps_f} vs {steps_s}'}; max relative "
          f"difference of v {float(diff.max()):.2e}")
    peaks = {mode: _child_peak(argv, mode) for mode in ("full", "suffix")}
    print(f"peak memory of the target stage (own process each): full {peaks['full']:.0f} MiB, suffix "
          f"{peaks['suffix']:.0f} MiB, x{peaks['suffix'] / max(peaks['full'], 1e-9):.2f}")


def _child_peak(argv: list[str], mode: str) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--peak-memory-of", mode], capture_output=True,
                         text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def peak_memory_of(run, cfg, dev: torch.device) -> float:
    """MiB the target stage adds at its peak: CUDA allocator statistics, or on a CPU the process's resident-set
    high-water mark (VmHWM), reset just before the stage so that loading the model does not count."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run(cfg)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current resident set
    start = _status_kib("VmRSS")
    run(cfg)
    return (_status_kib("VmHWM") - start) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


if __name__ == "__main__":
    main()
