"""C0 = E[k kᵀ] (paper Eq. 9): the uncentred second moment of the keys of an edited projection over a corpus.

A key is the input of the edited projection (the FFN output projection by default, Eq. 12), one per
non-padding token. Eq. 9 writes C0 = K0 K0ᵀ = λ E_k[k kᵀ]; this module estimates E_k[k kᵀ] (λ is applied by
the solver). All requested layers are read in ONE pass over the corpus (pmet/corpus.py: which text, packed into
sequences of `seq_len` tokens): the forward pass is stopped right after the highest requested layer's edited
module (`Trace(stop_after=...)`), so layers above it never run. Kᵀ K is accumulated in float64, one matmul per
layer per batch, and divided by the token count at the end. Only positions with attention_mask == 1 are counted,
and the last batch is trimmed so that exactly `n_tokens` keys enter the mean.

Cache (`get_c0`): one safetensors file per layer (never pickle) under
``cache_root()/stats/<fingerprint>/<module>__<corpus_id>__<n_tokens>__<dtype>.safetensors``, written
atomically; a ``__s<seq_len>`` suffix is added before the extension only when seq_len differs from the default
256, so that statistics taken with another context length are never mixed up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import layout_of
from .cache import cache_root
from .corpus import CorpusSpec, corpus_id, iter_batches, iter_corpus_texts, parse_corpus
from .errors import CorpusError
from .fileio import atomic_write
from .hooks import Trace
from .models import fingerprint as model_fingerprint

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 256


@dataclass
class StatsInfo:
    """What a C0 estimate was computed from, and how (Eq. 9)."""

    corpus: str  # the corpus as a string: a path, 'hf:...' or 'self'
    corpus_kind: str  # 'file' | 'hf' | 'self' (what 'auto' resolved to)
    n_tokens: int
    dtype: str  # dtype of the model the keys were read from
    seconds: float
    from_cache: dict[int, bool] = field(default_factory=dict)
    fingerprint: str | None = None
    component: str = "ffn"
    modules: dict[int, str] = field(default_factory=dict)
    seq_len: int = DEFAULT_SEQ_LEN
    corpus_id: str | None = None


# --------------------------------------------------------------------------------------------- keys, C0


def batch_keys(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    modules: list[str],
    *,
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run one batch under no_grad and return, per module, its inputs at attention_mask == 1 positions as an
    (n_tokens, d_in) matrix in row-major (row, position) order. Stops after `stop_after` if given."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad(), Trace(model, inputs=modules, stop_after=stop_after) as tr:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    keep = mask.bool()
    return {m: tr.inputs[m][keep] for m in modules}


def c0_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """E[k kᵀ] over the rows of `keys` (n, d), in float64: the C0 of Eq. 9 (without λ)."""
    k = keys.reshape(-1, keys.shape[-1]).to(torch.float64)
    return k.T @ k / k.shape[0]


def _model_dtype(model: PreTrainedModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _usable_seq_len(model: PreTrainedModel, seq_len: int) -> int:
    """`seq_len`, capped at the model's number of positions where its config states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(model.config, name, None)
        if isinstance(v, int) and v > 0:
            return min(seq_len, v)
    return seq_len


def compute_c0(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layers: list[int],
    corpus: CorpusSpec | str,
    n_tokens: int,
    *,
    component: str = "ffn",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], StatsInfo]:
    """Estimate C0 = E[k kᵀ] (Eq. 9) at the input of `layout.edited_module(l, component)` for every layer in
    `layers`, over exactly `n_tokens` non-padding tokens of `corpus`, in one pass that stops after the highest
    layer's edited module. Returns {layer: (d_in, d_in) float64 CPU tensor} and a StatsInfo (fingerprint
    None, from_cache all False). CorpusError if the corpus is empty or has fewer than `n_tokens` tokens."""
    start = time.perf_counter()
    spec = parse_corpus(corpus)
    layout = layout_of(model)
    layers = sorted(set(layers))
    _check_c0_request(layout.n_layers, layers, component, n_tokens)
    usable = _usable_seq_len(model, seq_len)
    if usable < seq_len:
        log.info("seq_len %d exceeds the model's %d positions; using %d", seq_len, usable, usable)
        seq_len = usable
    names = {l: layout.edited_module(l, component) for l in layers}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    texts = iter_corpus_texts(spec, model, tok, seed=seed, n_tokens=n_tokens)
    batches = iter_batches(texts, tok, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id)
    sums, counted = _key_gram_sums(model, batches, names, n_tokens, progress)
    if counted == 0:
        raise CorpusError(f"corpus '{spec}': empty (no text to read statistics from)")
    if counted < n_tokens:
        raise CorpusError(
            f"corpus '{spec}': only {counted} tokens, fewer than the {n_tokens} requested (ask for fewer)"
        )
    c0 = {l: s.div_(counted).cpu() for l, s in sums.items()}  # in place: one d_k² matrix per layer
    info = StatsInfo(
        corpus=str(spec),
        corpus_kind=spec.kind,
        n_tokens=counted,
        dtype=_model_dtype(model),
        seconds=time.perf_counter() - start,
        from_cache={l: False for l in layers},
        fingerprint=None,
        component=component,
        modules=names,
        seq_len=seq_len,
    )
    log.info("C0 for layers %s from %d tokens of %s in %.1f s", layers, counted, spec, info.seconds)
    return c0, info


def _check_c0_request(n_layers: int, layers: list[int], component: str, n_tokens: int) -> None:
    if not layers:
        raise ValueError("compute_c0: no layers requested")
    if component not in ("ffn", "attn"):
        raise ValueError(f"compute_c0: component must be 'ffn' or 'attn', not '{component}'")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"compute_c0: layers {bad} out of range (model has {n_layers})")
    if n_tokens <= 0:
        raise ValueError(f"compute_c0: n_tokens must be positive, not {n_tokens}")


def _key_gram_sums(model: PreTrainedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   names: dict[int, str], n_tokens: int, progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    """Σ k kᵀ (float64) per layer over the first `n_tokens` non-padding tokens of `batches` (fewer if they run out),
    one forward per batch stopping after the highest layer's module; returns the sums and the tokens counted."""
    sums: dict[int, torch.Tensor] = {}
    counted = 0
    stop_after = names[max(names)]
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="C0 keys", disable=not progress) as bar:
        for ids, mask in batches:
            remaining = n_tokens - counted
            # Drop whole rows the count no longer needs (only ever in the last batch).
            rows = int(torch.searchsorted(mask.sum(1).cumsum(0), remaining)) + 1
            ids, mask = ids[:rows], mask[:rows]
            keys = batch_keys(model, ids, mask, list(names.values()), stop_after=stop_after)
            take = min(remaining, int(mask.sum()))
            for l, name in names.items():
                k = keys[name][:take].to(torch.float64)
                if l not in sums:
                    sums[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
                sums[l].addmm_(k.T, k)
            counted += take
            bar.update(take)
            if counted >= n_tokens:
                break
    return sums, counted


# ------------------------------------------------------------------------------------------------- cache


def _cache_file(folder: Path, module: str, cid: str, n_tokens: int, dtype: str, seq_len: int) -> Path:
    suffix = "" if seq_len == DEFAULT_SEQ_LEN else f"__s{seq_len}"
    return folder / f"{module}__{cid}__{n_tokens}__{dtype}{suffix}.safetensors"


def _load_cached(path: Path, n_tokens: int) -> torch.Tensor | None:
    """The cached C0 at `path`, or None if absent; a file that fails to load is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = f.get_tensor("mom2")
        if t.dtype != torch.float64 or t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"unexpected tensor {tuple(t.shape)} {t.dtype}")
        if meta.get("n_tokens") not in (None, str(n_tokens)):
            raise ValueError(f"n_tokens {meta.get('n_tokens')} != {n_tokens}")
        return t
    except Exception as e:  # a corrupt file can fail in many ways; it is simply recomputed
        log.warning("statistics cache %s is unreadable (%s); recomputing it", path, e)
        return None


def _save_atomic(path: Path, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write {'mom2': tensor} as safetensors, atomically."""
    atomic_write(path, lambda tmp: safetensors.torch.save_file({"mom2": tensor.contiguous()}, tmp, metadata=metadata))


def _save_c0(path: Path, c0: torch.Tensor, info: StatsInfo, module: str, fingerprint: str) -> None:
    """Cache one layer's C0 with what it was computed from; a cache that cannot be written is reported, not fatal."""
    meta = {"n_tokens": str(info.n_tokens), "corpus": info.corpus, "corpus_kind": info.corpus_kind,
            "module": module, "dtype": info.dtype, "fingerprint": fingerprint, "seq_len": str(info.seq_len)}
    try:
        _save_atomic(path, c0, meta)
    except OSError as e:
        log.warning("cannot write the statistics cache %s (%s); continuing without it", path, e)


def get_c0(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layers: list[int],
    corpus: str | CorpusSpec,
    n_tokens: int,
    *,
    component: str = "ffn",
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    force: bool = False,
    **kw,
) -> tuple[dict[int, torch.Tensor], StatsInfo]:
    """C0 = E[k kᵀ] (Eq. 9) per layer, from the cache when present, else computed (the missing layers only,
    in one pass) and cached. `kw` goes to `compute_c0` (seq_len, batch_size, seed, progress). `force`
    recomputes every layer. A cache that cannot be written (OSError) is reported and skipped."""
    start = time.perf_counter()
    spec = parse_corpus(corpus)
    layout = layout_of(model)
    layers = sorted(set(layers))
    fp = fingerprint or model_fingerprint(model)
    dtype = _model_dtype(model)
    seq_len = _usable_seq_len(model, kw.get("seq_len", DEFAULT_SEQ_LEN))  # as compute_c0 will use it
    cid = corpus_id(spec, seed=kw.get("seed", 0))
    folder = cache_root(cache_dir) / "stats" / fp
    names = {l: layout.edited_module(l, component) for l in layers}
    paths = {l: _cache_file(folder, names[l], cid, n_tokens, dtype, seq_len) for l in layers}

    c0: dict[int, torch.Tensor] = {}
    if not force:
        for l in layers:
            t = _load_cached(paths[l], n_tokens)
            if t is not None:
                c0[l] = t
    cached = set(c0)
    missing = [l for l in layers if l not in cached]
    if missing:
        computed, cinfo = compute_c0(model, tok, missing, spec, n_tokens, component=component, **kw)
        for l in missing:
            _save_c0(paths[l], computed[l], cinfo, names[l], fp)
            c0[l] = computed[l]
    else:
        log.info("C0 for layers %s loaded from %s", layers, folder)
    info = StatsInfo(
        corpus=str(spec),
        corpus_kind=spec.kind,
        n_tokens=n_tokens,
        dtype=dtype,
        seconds=time.perf_counter() - start,
        from_cache={l: l in cached for l in layers},
        fingerprint=fp,
        component=component,
        modules=names,
        seq_len=seq_len,
        corpus_id=cid,
    )
    return {l: c0[l] for l in layers}, info
