"""Numerical cross-check of our PMET, MEMIT and ROME against EasyEdit's (zjunlp/EasyEdit, `easyeditor/models/pmet`,
`memit`, `rome`) on identical inputs: the same model, requests, context templates, C0, hyper-parameters.

    python benchmarks/crosscheck_easyedit.py --easyedit PATH/TO/EasyEdit [--method pmet|memit|rome] [--requests 8]

EasyEdit is neither a dependency nor vendored: PATH is a checkout of it (the folder holding `easyeditor/`). Its
package `__init__` files import every editor and their dependencies, so only the modules the method needs are
loaded, from their files (`<method>_main`, compute_z(s) or compute_u/compute_v, compute_ks, `<method>_hparams`,
rome/repr_tools, util/nethook, util/hparams), with these shims, applied to the source text as it loads and
refused loudly if they no longer apply:

1. Devices: EasyEdit hard-codes "cuda", "cuda:0", "cuda:1", f"cuda:{hparams.device}"; they become the model's
   device, so that the check runs on a CPU.
2. Decoder-layer outputs: compute_z(s) read `.output[0]` (and MEMIT's edit hook `cur_out[0][...]`) of a decoder
   layer, a tuple in the transformers versions EasyEdit was written for; the transformers 5 used here returns the
   hidden states as a tensor, where `[0]` takes the first prompt's states and the code then fails on shapes
   (EasyEdit does not run unshimmed on it). `[0]` is taken only from a tuple.
3. Inputs: `get_context_templates` gets ours (CONTEXT_TEMPLATES_CACHE is filled, generate_fast never runs; ROME's
   as one flat list) and the covariance ours (COV_CACHE with our C0; ROME's inv_mom2_cache with its inverse;
   layer_stats never runs); `rome.layer_stats`, `util.generate` and `util.globals` are empty stand-ins.

Hyper-parameters: EasyEdit's PMET/MEMIT/ROMEHyperParams filled from our preset's method section (layers,
steps, lr, clamp, KL, decay, λ; `v_loss_layer` = the last layer, as our loss reads the model's output). With tied
embeddings the unembedding is named by the embedding (`model.embed_tokens`): `named_parameters` lists a tied
matrix once, so `lm_head.weight` would not be found. PMET and MEMIT get targets with a leading space (PMET's
compute_zs encodes `target_new` as given; ours encodes ' ' + target, NOTES.md); ROME's execute_rome prefixes one
itself, so it gets them without. The tokenizer pads on the right (compute_z(s) place the target tokens assuming
it does). `model.config.n_embd` is set to `hidden_size` where absent (PMET's
compute_zs reads it unless the model's path names llama or neo).

Prints, per request, the relative difference ‖ours − theirs‖/‖theirs‖ of the target vectors and each side's Adam
steps, and per edited matrix the relative difference of Δ: (a) each side end to end, (b) our update (Eq. 9, 11)
computed on EasyEdit's targets, which separates the update from the optimisation. ROME (sequential edits, one
request at a time on the model edited so far, as apply_rome_to_model per request): each request's Adam steps and
the summed Δ. Results: docs/RESULTS.md ("Cross-check against EasyEdit").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import types
from pathlib import Path

import torch

from pmet.arch import get_weight, layout_of
from pmet.config import load_config, parse_overrides
from pmet.editor import edit, prepare
from pmet.evaluation.data import load_eval_records
from pmet.methods.rome import edit_rome
from pmet.models import load_model
from pmet.targets import Targets, compute_targets
from pmet.update import insert

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
COMMON = ["easyeditor.util.hparams", "easyeditor.util.nethook", "easyeditor.models.rome.repr_tools"]
# per method: EasyEdit's modules in import order (main module last), the modules that hard-code CUDA devices and
# the one that reads decoder-layer outputs as tuples (shims 1 and 2 must apply there)
METHODS = {
    "pmet": dict(modules=["pmet_hparams", "compute_zs", "compute_ks", "pmet_main"], devices=["compute_zs"],
                 tuple_reads="compute_zs"),
    "memit": dict(modules=["memit_hparams", "compute_z", "compute_ks", "memit_main"], devices=["compute_z"],
                  tuple_reads="compute_z"),
    "rome": dict(modules=["rome_hparams", "compute_u", "compute_v", "rome_main"],
                 devices=["compute_u", "compute_v"], tuple_reads=None),
}
STAND_INS = {"easyeditor.models.rome.layer_stats": "layer_stats", "easyeditor.util.generate": "generate_fast",
             "easyeditor.util.globals": None}
DEVICE_STRING = re.compile(r'f?"cuda(?::[^"]*)?"')
LOSS_LAYER_READ = "tr[hparams.layer_module_tmp.format(loss_layer)].output[0]"
EDITED_LAYER_OUTPUT = "cur_out[0]["  # MEMIT's compute_z: the decoder layer's output in edit_output_fn


def _first(x):
    """Shim 2: the hidden states whether a decoder layer returns them alone or first in a tuple."""
    return x[0] if isinstance(x, tuple) else x


def _never(name: str):
    def fail(*_a, **_k):
        raise RuntimeError(f"EasyEdit's {name} was called: the cross-check passes its inputs in")
    return fail


def _shimmed_source(path: Path, devices: bool, tuple_reads: bool) -> str:
    src = path.read_text(encoding="utf-8")
    src, n_dev = DEVICE_STRING.subn("_DEVICE", src)
    if devices and not n_dev:
        sys.exit(f"error: shim 1 found no device string in {path} (EasyEdit changed); update this script")
    if tuple_reads:
        if LOSS_LAYER_READ not in src:
            sys.exit(f"error: shim 2 does not apply to {path} (EasyEdit changed); update this script")
        src = src.replace(LOSS_LAYER_READ, "_first(" + LOSS_LAYER_READ.removesuffix("[0]") + ")")
        src = src.replace(EDITED_LAYER_OUTPUT, "_first(cur_out)[")
    return src


def register_module(name: str, attrs: dict | None = None, path: Path | None = None) -> types.ModuleType:
    """Put a module `name` holding `attrs` into sys.modules (a package whose submodules load from `path`, if
    given), so that the checked code's imports find it instead of the real one."""
    mod = types.ModuleType(name)
    if path is not None:
        mod.__path__ = [str(path)]
    mod.__dict__.update(attrs or {})
    sys.modules[name] = mod
    return mod


def register_stand_ins(stand_ins: dict[str, str | None]) -> None:
    """Modules whose named function (if any) fails when called: the check passes their results in."""
    for name, fn in stand_ins.items():
        register_module(name, {fn: _never(fn)} if fn else None)


def load_easyedit(root: Path, method: str, device: torch.device) -> types.ModuleType:
    """EasyEdit's `<method>_main` and what it imports, with the shims of the module docstring."""
    for name in ["easyeditor", "easyeditor.util", "easyeditor.models", "easyeditor.models.rome",
                 f"easyeditor.models.{method}"]:
        register_module(name, path=root.joinpath(*name.split(".")))
    register_stand_ins(STAND_INS)
    spec = METHODS[method]
    names = COMMON + [f"easyeditor.models.{method}.{m}" for m in spec["modules"]]
    for name in names:
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        if not path.exists():
            sys.exit(f"error: {path} not found: --easyedit must point at an EasyEdit checkout")
        short = name.rpartition(".")[2]
        src = _shimmed_source(path, devices=short in spec["devices"], tuple_reads=short == spec["tuple_reads"])
        mod = types.ModuleType(name)
        mod.__file__, mod.__package__ = str(path), name.rpartition(".")[0]
        mod.__dict__.update(_DEVICE=str(device), _first=_first)
        sys.modules[name] = mod
        exec(compile(src, str(path), "exec"), mod.__dict__)
    return sys.modules[names[-1]]


def _pad_right(tok) -> None:
    """EasyEdit's compute_z(s) place the target tokens assuming right padding."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def _adam_steps(log: str) -> list[int]:
    """Adam steps per request from EasyEdit's printed log: one loss line per forward pass, the last takes no step."""
    blocks = log.split("Computing right vector")[1:]
    return [len(re.findall(r"^loss ", b, flags=re.M)) - 1 for b in blocks]


def hparams_from(main: types.ModuleType, method: str, cfg, layout, model) -> object:
    """EasyEdit's PMET/MEMIT/ROMEHyperParams with our preset's values and our model's module names."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    unembed = [n for n, m in model.named_modules() if m is model.get_input_embeddings()][0] if tied else \
        layout.spec.unembed.split("|")[0]
    ffn = f"{layout.spec.layers}.{{}}.{layout.spec.ffn_out}"
    common = dict(
        layers=list(cfg.layers), layer_selection="all", fact_token="subject_last",
        v_num_grad_steps=cfg.v_num_grad_steps, v_lr=cfg.v_lr, v_loss_layer=model.config.num_hidden_layers - 1,
        v_weight_decay=cfg.v_weight_decay, clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor,
        mom2_adjustment=True, mom2_update_weight=cfg.mom2_update_weight, rewrite_module_tmp=ffn,
        layer_module_tmp=f"{layout.spec.layers}.{{}}", ln_f_module=layout.spec.final_norm, lm_head_module=unembed,
        mom2_dataset="given (pmet C0)", mom2_n_samples=0, mom2_dtype="float32", device=0, model_name="",
        stats_dir="",
    )
    if method == "rome":
        drop = ("layer_selection", "mom2_update_weight")
        return main.ROMEHyperParams(**{k: v for k, v in common.items() if k not in drop},
                                    context_template_length_params=[[10, 5]], mlp_module_tmp=ffn,
                                    attn_module_tmp=f"{layout.spec.layers}.{{}}.{layout.spec.attn_out}",
                                    alg_name="ROME")
    if method == "memit":
        return main.MEMITHyperParams(**common, mlp_module_tmp=f"{layout.spec.layers}.{{}}.mlp",
                                     attn_module_tmp=f"{layout.spec.layers}.{{}}.self_attn", alg_name="MEMIT")
    return main.PMETHyperParams(**common, nll_loss_factor=cfg.nll_factor, rewrite_module_tmps=[ffn],
                                mlp_module_tmp=ffn, attn_module_tmp=f"{layout.spec.layers}.{{}}.{layout.spec.attn_out}",
                                alg_name="PMET")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


PUBLISHED = {  # the structure each side's defaults give; the check covers these only
    "pmet": dict(update_modules=["ffn"], spread="sqrt", target_site="components", attn_delta=True),
    "memit": dict(update_modules=["ffn"], spread="even", target_site="layer_output", stop_rule="loss"),
    "rome": dict(update_modules=["ffn"], target_site="components", attn_delta=False, stop_rule="loss"),
}


def run_easyedit(main_mod: types.ModuleType, method: str, model, tok, requests, cfg, layout, prep, log_file):
    """EasyEdit's execute_<method> on our inputs. Returns its Δ per weight name, its target vectors
    ({"ffn": [...], "attn": [...]}), its Adam steps per request and the seconds it took."""
    pmet_side = method == "pmet"
    hp = hparams_from(main_mod, method, cfg, layout, model)
    if not hasattr(model.config, "n_embd"):  # compute_zs sizes δ by n_embd unless the model path says llama/neo
        model.config.n_embd = model.config.hidden_size
    main_mod.CONTEXT_TEMPLATES_CACHE = prep.templates
    model_key = model.config._name_or_path.replace("/", "_")
    for l in cfg.layers:
        main_mod.COV_CACHE[(model_key, hp.rewrite_module_tmp.format(l))] = prep.c0[(l, "ffn")].float().cpu()
    targets: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}
    compute = main_mod.compute_zs if pmet_side else main_mod.compute_z

    def recording(*a, **k):  # EasyEdit's target vectors, as its main module receives them
        out = compute(*a, **k)
        v_attn, v_ffn = out if pmet_side else (None, out)
        targets["ffn"].append(v_ffn.detach().float().cpu())
        if v_attn is not None:
            targets["attn"].append(v_attn.detach().float().cpu())
        return out

    setattr(main_mod, compute.__name__, recording)
    _pad_right(tok)
    ee_requests = [{"prompt": r.prompt, "subject": r.subject, "target_new": " " + r.target_new.strip(),
                    "case_id": r.case_id} for r in requests]
    before = {f"{hp.rewrite_module_tmp.format(l)}.weight": get_weight(model, hp.rewrite_module_tmp.format(l))
              .detach().clone() for l in cfg.layers}
    log = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(log):
        deltas = (main_mod.execute_pmet if pmet_side else main_mod.execute_memit)(model, tok, ee_requests, hp)
    seconds = time.perf_counter() - t
    if log_file:
        log_file.write_text(log.getvalue(), encoding="utf-8")
    if not pmet_side:  # MEMIT returns (adj_k, resid) per matrix; Δ = resid adj_kᵀ in the weight's layout
        deltas = {n: main_mod.upd_matrix_match_shape(r @ k.T, before[n].shape) for n, (k, r) in deltas.items()}
    for n, w in before.items():  # EasyEdit restores the weights; check it did
        if not torch.equal(get_weight(model, n.removesuffix(".weight")), w):
            sys.exit(f"error: EasyEdit left {n} changed")
    steps = _adam_steps(log.getvalue())
    return {n: d.detach().float().cpu() for n, d in deltas.items()}, targets, steps, seconds


def run_easyedit_rome(main_mod: types.ModuleType, model, tok, requests, cfg, layout, prep, log_file):
    """EasyEdit's ROME on our inputs, one request after another on the model as edited so far (apply_rome_to_model
    per request). Returns the summed Δ per weight name, Adam steps per request, seconds; the weights are restored."""
    hp = hparams_from(main_mod, "rome", cfg, layout, model)
    main_mod.CONTEXT_TEMPLATES_CACHE = [t for group in prep.templates for t in group]  # ROME's flat list
    inv_cache = sys.modules["easyeditor.models.rome.compute_u"].inv_mom2_cache
    model_key = model.config._name_or_path.replace("/", "_")
    for l in cfg.layers:
        inv_cache[(model_key, hp.rewrite_module_tmp.format(l))] = torch.inverse(prep.c0[(l, "ffn")].float())
    _pad_right(tok)
    names = [f"{hp.rewrite_module_tmp.format(l)}.weight" for l in cfg.layers]
    before = {n: get_weight(model, n.removesuffix(".weight")).detach().clone() for n in names}
    log = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(log), torch.no_grad():
        for r in requests:  # execute_rome prefixes the space itself
            req = {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new.strip(), "case_id": r.case_id}
            with torch.enable_grad():
                deltas = main_mod.execute_rome(model, tok, req, hp)
            for n, (left, right) in deltas.items():
                w = get_weight(model, n.removesuffix(".weight"))
                w += main_mod.upd_matrix_match_shape(left.unsqueeze(1) @ right.unsqueeze(0), w.shape)
    seconds = time.perf_counter() - t
    if log_file:
        log_file.write_text(log.getvalue(), encoding="utf-8")
    total = {}
    with torch.no_grad():
        for n, w0 in before.items():
            w = get_weight(model, n.removesuffix(".weight"))
            total[n] = (w - w0).detach().float().cpu()
            w.copy_(w0)
    steps = _adam_steps(log.getvalue())
    return total, steps, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--easyedit", required=True, type=Path, help="EasyEdit checkout (the folder holding easyeditor/)")
    ap.add_argument("--method", choices=sorted(METHODS), default="pmet")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=None, help="preset name or YAML file (default: the model's preset)")
    ap.add_argument("--requests", type=int, default=4, help="first N CounterFact test-slice records")
    ap.add_argument("--data", type=Path,
                    default=DATA / "counterfact_rome_subsets" / "counterfact_rome_format_subset.json")
    ap.add_argument("--corpus", default=str(DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log", type=Path, default=None, help="write EasyEdit's printed output here")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also compare EasyEdit's targets with ours optimised one request at a time, as EasyEdit "
                         "does (separates a method difference from sensitivity to the batch's float order)")
    args = ap.parse_args()
    pmet_side = args.method == "pmet"

    lm = load_model(args.model, dtype="float32", device=args.device)
    model, tok = lm.model, lm.tok
    layout = layout_of(model)
    if not (args.config or lm.preset):
        sys.exit(f"error: no preset for {args.model}; pass --config")
    cfg = load_config(args.config or lm.preset, args.method, settings=parse_overrides(args.set))
    off = [f"{k}={getattr(cfg, k)!r}" for k, v in PUBLISHED[args.method].items() if getattr(cfg, k) != v]
    if off:
        sys.exit(f"error: the cross-check covers {args.method} as published; the config has {', '.join(off)}")
    requests = [r.request for r in load_eval_records(args.data, "counterfact", n=args.requests)]
    prep = prepare(model, tok, cfg, corpus=args.corpus, progress=False)
    device = next(model.parameters()).device

    main_mod = load_easyedit(args.easyedit.resolve(), args.method, device)
    if args.method == "rome":
        compare_rome(main_mod, model, tok, requests, cfg, layout, prep, args)
        return
    theirs, theirs_v, steps_theirs, t_theirs = run_easyedit(main_mod, args.method, model, tok, requests, cfg,
                                                            layout, prep, args.log)
    singles = [compute_targets(model, tok, layout, [r], prep.templates, cfg).ffn[0].cpu() for r in requests] \
        if args.one_at_a_time else None
    t = time.perf_counter()
    ours = edit(model, tok, requests, cfg, c0=prep.c0, context_templates=prep.templates, progress=False,
                fingerprint=prep.fingerprint)
    t_ours = time.perf_counter() - t
    ours.revert(model)
    given = Targets(ffn=torch.stack(theirs_v["ffn"]).to(device),
                    attn=torch.stack(theirs_v["attn"]).to(device) if pmet_side else None)
    # our update on their targets (edits the model; its last use)
    on_theirs, _ = insert(model, tok, layout, requests, prep.templates, given, prep.c0, cfg)

    print(f"{args.method}, model {args.model}, {len(requests)} CounterFact test requests, preset {lm.preset}: "
          f"layers {list(cfg.layers)}, steps {cfg.v_num_grad_steps}, clamp {cfg.clamp_norm_factor}, "
          f"λ {cfg.mom2_update_weight}")
    print(f"time (a check, not a benchmark): EasyEdit {t_theirs:.1f} s, pmet {t_ours:.1f} s")
    print("\nper request: relative difference of v (ours vs EasyEdit), Adam steps (ours / EasyEdit's)")
    for i, r in enumerate(requests):
        d = ours.targets.diagnostics[i]
        v_attn = f", v_attn {rel(ours.targets.attn[i].cpu(), theirs_v['attn'][i]):.2e}" if pmet_side else ""
        single = f", v one at a time {rel(singles[i], theirs_v['ffn'][i]):.2e}" if singles else ""
        print(f"  {i}: {r.subject!r} -> {r.target_new!r}: v {rel(ours.targets.ffn[i].cpu(), theirs_v['ffn'][i]):.2e}"
              f"{v_attn}{single}, steps {d.steps}/{steps_theirs[i]} ({d.stop})")
    print("\nper matrix: relative difference of Δ (ours vs EasyEdit); ‖Δ‖ EasyEdit")
    for u, v in zip(ours.updates, on_theirs, strict=True):
        ref = theirs[u.weight]
        print(f"  {u.weight}: end to end {rel(u.delta, ref):.2e}, our update on EasyEdit's targets "
              f"{rel(v.delta, ref):.2e}; ‖Δ‖ {float(ref.norm()):.4f}")


def compare_rome(main_mod, model, tok, requests, cfg, layout, prep, args) -> None:
    """ROME: each side edits the requests in sequence; compares the summed Δ and each request's Adam steps."""
    theirs, steps_theirs, t_theirs = run_easyedit_rome(main_mod, model, tok, requests, cfg, layout, prep, args.log)
    t = time.perf_counter()
    ours = edit_rome(model, tok, requests, cfg, c0=prep.c0, context_templates=prep.templates, progress=False,
                     fingerprint=prep.fingerprint)
    t_ours = time.perf_counter() - t
    ours.revert(model)
    print(f"rome, model {args.model}, {len(requests)} CounterFact test requests in sequence, layer {cfg.layers}, "
          f"steps {cfg.v_num_grad_steps}, clamp {cfg.clamp_norm_factor}")
    print(f"time (a check, not a benchmark): EasyEdit {t_theirs:.1f} s, pmet {t_ours:.1f} s")
    print("\nper request: Adam steps (ours / EasyEdit's)")
    for i, r in enumerate(requests):
        d = ours.targets.diagnostics[i]
        print(f"  {i}: {r.subject!r} -> {r.target_new!r}: steps {d.steps}/{steps_theirs[i]} ({d.stop})")
    print("\nsummed Δ: relative difference (ours vs EasyEdit); ‖Δ‖ EasyEdit")
    for u in ours.updates:
        ref = theirs[u.weight]
        print(f"  {u.weight}: {rel(u.delta, ref):.2e}; ‖Δ‖ {float(ref.norm()):.4f}")


if __name__ == "__main__":
    main()
