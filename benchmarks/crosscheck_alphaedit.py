"""Numerical cross-check of the null-space option (pmet/null_space.py) against AlphaEdit's own code
(jianghoucheng/AlphaEdit: `AlphaEdit/AlphaEdit_main.py`, and `get_project` of `experiments/evaluate.py`) on
identical inputs: MEMIT + null space (AlphaEdit's update) on SmolLM2, N CounterFact requests in sequential batches.

    python benchmarks/crosscheck_alphaedit.py --alphaedit PATH/TO/AlphaEdit [--requests 8] [--batch 4]

AlphaEdit is neither a dependency nor vendored: PATH is a checkout of it (the folder holding `AlphaEdit/`, `util/`,
`experiments/`). What runs from its files: `get_project` (P from the SVD of the covariance and the threshold) and
`apply_AlphaEdit_to_model` (residual z − h at the last edited layer, spread over the remaining layers; the solve
`solve(P (K Kᵀ + cache_c) + L2·I, P K Rᵀ)`; the in-place weight update; `cache_c += K Kᵀ` after each batch). What
they get from pmet, as the check's inputs: the covariance C0 (`get_cov`), the context templates, each batch's target
vectors z (`compute_z`: ours, optimised on the model as our earlier batches left it), and the keys (`compute_ks`) and
layer-L hidden states (`get_module_input_output_at_words`), read from the model as it is at that moment (AlphaEdit's
model, mid-edit) by pmet's readers, which are MEMIT's definitions (subject's last token; keys averaged over the
context templates in two stages). Shims: "cuda" and `.cuda()` become the model's device; the modules
AlphaEdit_main imports for statistics and generation are stand-ins that fail if called.

Prints, per layer, the rank of P and its relative difference to ours when AlphaEdit's get_project reads C0 in
float32 (as its get_cov returns it) and in float64; per edited matrix the relative difference of Δ after all
batches, ‖ours − AlphaEdit‖/‖AlphaEdit‖, for AlphaEdit's edit with either P (its solve is float32 either way).
Results: docs/RESULTS.md ("Cross-check against AlphaEdit").
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosscheck_easyedit import DATA, DEVICE_STRING, _never, register_module, register_stand_ins, rel  # noqa: E402

from pmet.arch import get_weight, layout_of  # noqa: E402
from pmet.config import load_config, parse_overrides  # noqa: E402
from pmet.editor import prepare  # noqa: E402
from pmet.evaluation.data import load_eval_records  # noqa: E402
from pmet.keys import Site, average_two_stage, key_rows, read_at_subject  # noqa: E402
from pmet.methods.apply import apply_method  # noqa: E402
from pmet.models import load_model  # noqa: E402
from pmet.null_space import projector  # noqa: E402

CUDA_CALL = re.compile(r"\.cuda\(\)")
STAND_INS = {"rome": None, "rome.layer_stats": "layer_stats", "util.generate": "generate_fast", "util.globals": None}


def load_alphaedit(root: Path, device: torch.device, shims: dict) -> types.ModuleType:
    """AlphaEdit's AlphaEdit_main with its hparams, util.nethook and util.hparams; compute_ks and compute_z are
    the modules of `shims` (name -> function)."""
    for name in ("util", "AlphaEdit"):
        register_module(name, path=root / name)
    register_stand_ins(STAND_INS)
    for name, fns in (("AlphaEdit.compute_ks", ["compute_ks"]),
                      ("AlphaEdit.compute_z", ["compute_z", "get_module_input_output_at_words",
                                               "find_fact_lookup_idx"])):
        register_module(name, {fn: shims.get(fn, _never(fn)) for fn in fns})
    path = root / "AlphaEdit" / "AlphaEdit_main.py"
    if not path.exists():
        sys.exit(f"error: {path} not found: --alphaedit must point at an AlphaEdit checkout")
    src = path.read_text(encoding="utf-8")
    src, n_dev = DEVICE_STRING.subn("_DEVICE", src)
    src, n_call = CUDA_CALL.subn(".to(_DEVICE)", src)
    if not (n_dev and n_call) or "P[i,:,:]" not in src:
        sys.exit(f"error: the device shims or the solve line no longer match {path}; update this script")
    mod = types.ModuleType("AlphaEdit.AlphaEdit_main")
    mod.__file__, mod.__package__ = str(path), "AlphaEdit"
    mod.__dict__["_DEVICE"] = str(device)
    sys.modules[mod.__name__] = mod
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod


def get_project_from(root: Path, covariances: dict[str, torch.Tensor]):
    """AlphaEdit's get_project, its source taken from experiments/evaluate.py, reading `covariances` (module name ->
    C0 as AlphaEdit's get_cov returns it: float32)."""
    path = root / "experiments" / "evaluate.py"
    src = path.read_text(encoding="utf-8")
    fn = next((n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "get_project"), None)
    if fn is None:
        sys.exit(f"error: get_project not found in {path}; update this script")
    ns = {"torch": torch, "get_cov": lambda model, tok, name, *a, **k: covariances[name].clone()}
    exec(compile(ast.get_source_segment(src, fn), str(path), "exec"), ns)
    return ns["get_project"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphaedit", required=True, type=Path, help="AlphaEdit checkout")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8, help="first N CounterFact test-slice records")
    ap.add_argument("--batch", type=int, default=4, help="requests per sequential batch")
    ap.add_argument("--data", type=Path,
                    default=DATA / "counterfact_rome_subsets" / "counterfact_rome_format_subset.json")
    ap.add_argument("--corpus", default=str(DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    args = ap.parse_args()

    lm = load_model(args.model, dtype="float32", device="cpu")
    model, tok = lm.model, lm.tok
    layout = layout_of(model)
    cfg = load_config(lm.preset, "memit", settings={"null_space": True, **parse_overrides(args.set)})
    requests = [r.request for r in load_eval_records(args.data, "counterfact", n=args.requests)]
    prep = prepare(model, tok, cfg, corpus=args.corpus, progress=False)
    device = next(model.parameters()).device
    names = {l: layout.edited_module(l, "ffn") for l in cfg.layers}
    originals = {l: get_weight(model, n).detach().clone() for l, n in names.items()}

    ours = apply_method("memit", model, tok, requests, cfg, sequential_batches=args.batch, c0=prep.c0,
                        context_templates=prep.templates, progress=False)
    ours.revert(model)
    z = {i: ours.targets.ffn[i].detach().to(device) for i in range(len(requests))}

    def ours_of(reqs: list[dict]) -> list:
        return [requests[int(r["case_id"])] for r in reqs]

    def compute_ks(model_, tok_, reqs, hparams, layer, context_templates):
        got = read_at_subject(model_, key_rows(tok_, ours_of(reqs), prep.templates),
                              [Site(names[layer], "in")], pad_id=tok_.pad_token_id)
        return average_two_stage(got[Site(names[layer], "in")], prep.templates)

    def get_module_input_output_at_words(model_, tok_, layer, context_templates, words, module_template,
                                         fact_token_strategy):
        if list(words) != [r["subject"] for r in pending]:  # AlphaEdit reads the batch's own prompts, in order
            sys.exit("error: AlphaEdit read hidden states of other prompts than the batch's; update this script")
        reqs = pending
        site = Site(layout.layer(layer), "out")
        got = read_at_subject(model_, key_rows(tok_, ours_of(reqs), [["{}"]]), [site], pad_id=tok_.pad_token_id)
        return None, got[site]

    shims = {"compute_ks": compute_ks, "get_module_input_output_at_words": get_module_input_output_at_words,
             "compute_z": lambda model_, tok_, request, *a: z[int(request["case_id"])]}
    main_mod = load_alphaedit(args.alphaedit.resolve(), device, shims)
    main_mod.CONTEXT_TEMPLATES_CACHE = prep.templates
    covs = {names[l]: prep.c0[(l, "ffn")].float().cpu() for l in cfg.layers}
    get_project = get_project_from(args.alphaedit.resolve(), covs)
    hp = main_mod.AlphaEditHyperParams(
        model_name="", layers=list(cfg.layers), layer_selection="all", fact_token="subject_last",
        v_num_grad_steps=cfg.v_num_grad_steps, v_lr=cfg.v_lr, v_loss_layer=layout.n_layers - 1,
        v_weight_decay=cfg.v_weight_decay, clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor,
        mom2_adjustment=True, mom2_update_weight=cfg.mom2_update_weight,
        rewrite_module_tmp=f"{layout.spec.layers}.{{}}.{layout.spec.ffn_out}",
        layer_module_tmp=f"{layout.spec.layers}.{{}}", mlp_module_tmp=f"{layout.spec.layers}.{{}}.mlp",
        attn_module_tmp=f"{layout.spec.layers}.{{}}.self_attn", ln_f_module=layout.spec.final_norm,
        lm_head_module="lm_head", mom2_dataset="given (pmet C0)", mom2_n_samples=0, mom2_dtype="float32",
        nullspace_threshold=cfg.null_space_threshold, L2=cfg.null_space_l2)
    log = io.StringIO()

    def run_alphaedit(P: torch.Tensor) -> dict[int, torch.Tensor]:
        """AlphaEdit's sequential batches with projectors P (layers, d_k, d_k); its Δ per layer, then reverted."""
        nonlocal pending
        cache_c = torch.zeros(P.shape)
        with contextlib.redirect_stdout(log):
            for start in range(0, len(requests), args.batch):
                pending = [{"case_id": i, "prompt": r.prompt, "subject": r.subject,
                            "target_new": {"str": r.target_new}}
                           for i, r in enumerate(requests[start : start + args.batch], start)]
                main_mod.apply_AlphaEdit_to_model(model, tok, pending, hp, cache_c=cache_c, P=P)
        deltas = {l: get_weight(model, n).detach() - originals[l] for l, n in names.items()}
        with torch.no_grad():
            for l, n in names.items():
                get_weight(model, n).copy_(originals[l])
        return deltas

    pending: list[dict] = []
    with contextlib.redirect_stdout(log):
        P32 = torch.stack([get_project(model, tok, l, hp) for l in cfg.layers])  # as AlphaEdit runs
        covs.update({names[l]: prep.c0[(l, "ffn")].double().cpu() for l in cfg.layers})
        P64 = torch.stack([get_project(model, tok, l, hp) for l in cfg.layers])  # its code, float64 input
    theirs = run_alphaedit(P32)
    theirs64 = run_alphaedit(P64.float())

    print(f"MEMIT + null space (AlphaEdit) on {args.model}: {len(requests)} CounterFact test requests in sequential "
          f"batches of {args.batch}, layers {list(cfg.layers)}, threshold {cfg.null_space_threshold}, "
          f"L2 {cfg.null_space_l2}")
    print("\nper layer: rank of P, AlphaEdit's / ours; relative difference of P to ours, AlphaEdit's get_project on "
          "the float32 C0 (as its get_cov returns it) and on the float64 C0; C0's eigenvalues either side of the "
          "threshold")
    for i, l in enumerate(cfg.layers):
        mine = projector(prep.c0[(l, "ffn")], cfg.null_space_threshold)
        values = torch.linalg.eigvalsh(prep.c0[(l, "ffn")].double())
        below, above = values[values < cfg.null_space_threshold].max(), values[values >= cfg.null_space_threshold].min()
        print(f"  layer {l}: rank {round(float(P32[i].trace()))} / {round(float(mine.trace()))}; "
              f"float32 C0 {rel(mine, P32[i]):.2e}, float64 C0 {rel(mine, P64[i]):.2e}; "
              f"eigenvalues {float(below):.6f} | {float(above):.6f}")
    print("\nper matrix: Δ after all batches, relative difference ours vs AlphaEdit's edit with its float32 P, and "
          "with P from the float64 C0; ‖Δ‖ AlphaEdit")
    for u in ours.updates:
        print(f"  {u.weight}: {rel(u.delta, theirs[u.layer]):.2e}, {rel(u.delta, theirs64[u.layer]):.2e}; "
              f"‖Δ‖ {float(theirs[u.layer].norm()):.4f}")

if __name__ == "__main__":
    main()
