"""Patch sizes for N edits on SmolLM2-135M, compact (Δ's factors, no originals) against full (every Δ and every
original), with the time to load and apply each; and what the type of an exported GGUF's edited tensors does to
the edit.

    python benchmarks/patch_sizes.py sizes --edits 10 100 947
    python benchmarks/patch_sizes.py export --patch edited/     # the README example's patch folder

sizes: a real PMET edit of the first N records of the CounterFact subset with the SmolLM2 preset, except one Adam
step per target (a patch's size does not depend on the targets' values), C0 from WikiText-2 validation text.
export: the patch exported as f32, f16 and source (re-quantised to the base file's own type, Q4_1), each read back
by transformers' GGUF loader: each edited weight against the one pmet's edit made (relative to that edit's Δ),
and per prompt kind how many greedy answers state target_new (rewrite, paraphrase) or leave the base model's
top-1 as it was (neighbourhood).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def sizes(edits: list[int]) -> None:
    from pmet.config import load_config
    from pmet.editor import edit
    from pmet.models import load_model
    from pmet.patch import EditResult
    from pmet.requests import load_requests

    lm = load_model("smollm2-135m", device="cpu")
    cfg = load_config("smollm2-135m").replace(v_num_grad_steps=1)
    corpus = str(DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw")
    data = DATA / "counterfact_rome_subsets" / "counterfact_rome_format_subset.json"
    print("| edits | compact patch | full patch | ratio | load + apply compact | load + apply full |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in edits:
        reqs = load_requests(data, limit=n, one_batch=True)
        res = edit(lm.model, lm.tok, reqs, cfg, corpus=corpus, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {k: res.save(Path(tmp) / k, full=k == "full") for k in ("compact", "full")}
            res.revert(lm.model)
            secs = {}
            for kind, path in paths.items():
                t = time.perf_counter()
                EditResult.load(path).apply(lm.model)
                secs[kind] = time.perf_counter() - t
                res.revert(lm.model)
            mb = {k: p.stat().st_size / 2**20 for k, p in paths.items()}
        print(f"| {len(reqs)} | {mb['compact']:.2f} MiB | {mb['full']:.2f} MiB | {mb['full'] / mb['compact']:.1f}x "
              f"| {secs['compact']:.2f} s | {secs['full']:.2f} s |", flush=True)


def _counts(rows: list[dict], base: list[dict]) -> tuple[int, int, int, int, int, int]:
    """(rewrites stating target_new, rewrites, paraphrases stating it, paraphrases, neighbourhood top-1 kept, n)."""
    rw = sum(r["request"]["states_new"] for r in rows)
    para = [c for r in rows for c in r["checks"] if c["kind"] == "paraphrase"]
    nb = [(c, b) for r, rb in zip(rows, base, strict=True) for c, b in zip(r["checks"], rb["checks"], strict=True)
          if c["kind"] == "neighborhood"]
    return (rw, len(rows), sum(c["states_new"] for c in para), len(para),
            sum(c["top1"] == b["top1"] for c, b in nb), len(nb))


def export(patch: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pmet.card import card_metadata
    from pmet.edit_report import measure
    from pmet.export import write_gguf
    from pmet.models import gguf_file, load_model
    from pmet.patch import EditResult, apply_chain

    lm = load_model("smollm2-135m", device="cpu")
    p = EditResult.load(patch)
    base = measure(lm.model, lm.tok, p.requests)
    base_w = {n: w.detach().clone() for n, w in lm.model.state_dict().items()}
    apply_chain(lm.model, [(str(patch), p)])
    edited = {n: dict(lm.model.named_parameters())[n].detach().clone() for n in p.deltas}
    rows = [("edited model (pmet)", measure(lm.model, lm.tok, p.requests), 0.0, None)]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f32", "f16", "source"):
            out = Path(tmp) / f"{kind}.gguf"
            write_gguf(gguf_file("smollm2-135m"), str(out), edited, kind, card_metadata([p], "smollm2-135m"))
            m = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name, dtype=torch.float32).eval()
            sd = m.state_dict()
            err = max(float((sd[n] - edited[n]).norm() / (edited[n] - base_w[n]).norm()) for n in p.deltas)
            rows.append((f"GGUF, edited tensors {kind}", measure(m, lm.tok, p.requests), err,
                         out.stat().st_size / 2**20))
    print("| model | max ‖W − W_pmet‖/‖Δ‖ | rewrites stating target_new | paraphrases | neighbourhood top-1 kept "
          "| file |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, err, mb in rows:
        a, n, b, m_, c, k = _counts(r, base)
        size = "—" if mb is None else f"{mb:.1f} MiB"
        print(f"| {name} | {err:.3g} | {a}/{n} | {b}/{m_} | {c}/{k} | {size} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("sizes")
    s.add_argument("--edits", type=int, nargs="+", default=[10, 100, 947])
    e = sub.add_parser("export")
    e.add_argument("--patch", type=Path, required=True)
    args = ap.parse_args()
    sizes(args.edits) if args.part == "sizes" else export(args.patch)


if __name__ == "__main__":
    main()
