"""The text C0 is estimated from (paper Eq. 9: "a large set of generic text"): which corpus, its texts in order,
and their tokens packed into fixed-length sequences.

Corpora (`parse_corpus`):
- ``PATH``: a text file, or a folder of text files (``*.txt``, ``*.raw``, ``*.md``, recursive, sorted);
  every non-blank line is one text, kept as it is in the file (trailing newline included).
- ``hf:DATASET[:CONFIG][:SPLIT]``: a Hugging Face dataset, streamed with the optional `datasets` library;
  the text column is ``text`` and the split defaults to ``train``.
- ``self``: text sampled from the model itself (see `iter_corpus_texts`).
- ``auto``: ``hf:Salesforce/wikitext:wikitext-103-raw-v1:train`` when `datasets` is importable and the hub
  reachable, else ``self`` with a logged warning; `StatsInfo.corpus_kind` says which one was used.

Tokenization and packing (`iter_batches`): each text is tokenized with the tokenizer's defaults (so a BOS is added
per text exactly when the tokenizer adds one by default; nothing else is inserted), the token streams of
consecutive texts are concatenated and cut into sequences of `seq_len` tokens (greedy packing: a long text spills
into the next sequence), and sequences are batched and right-padded.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .cache import files_stamp
from .errors import CorpusError
from .models import hub_reachable
from .prompts import pad_right
from .sampling import SCHEME, eos_token_ids, sample
from .sizing import sampling_rows

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw", ".md")
AUTO_HF = "Salesforce/wikitext:wikitext-103-raw-v1:train"
# "self" corpus: sampling settings (documented choices).
SELF_BATCH = 256  # most sequences sampled at a time (fewer when fewer tokens are asked for)
SELF_NEW_TOKENS = 128  # new tokens per sequence (fewer when the model emits EOS)
SELF_MARGIN = 1.25  # texts sampled per batch: this × the tokens asked for / SELF_NEW_TOKENS (texts ending at EOS
#                     are shorter: SmolLM2's average 112 of 128), so that one batch usually suffices
SELF_TOP_K = 50  # top-k sampling, temperature 1 (Hugging Face's default top_k)
SELF_STARTS = ("The", "In", "A", "It", "This", "When", "He", "She", "There", "After", "On", "We")
_NO_DATASETS = "corpus '{spec}': the `datasets` library is not installed (pip install 'pmet[hf]')"
_TOKENIZE_CHUNK = 64  # texts tokenized per tokenizer call


@dataclass(frozen=True)
class CorpusSpec:
    """A statistics corpus: kind 'file' (ident = resolved path), 'hf' (ident = DATASET[:CONFIG][:SPLIT])
    or 'self' (ident = 'self')."""

    kind: str
    ident: str

    def __str__(self) -> str:
        return {"file": self.ident, "hf": f"hf:{self.ident}"}.get(self.kind, self.kind)


def _hf_available() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _split_hf(ident: str) -> tuple[str, str | None, str]:
    parts = ident.split(":")
    dataset = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return dataset, config, split


def _corpus_files(path: Path, label: str) -> list[Path]:
    """The text files of a file corpus, sorted; CorpusError if missing, unreadable or an empty folder."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(
                f"corpus '{label}': folder has no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)})"
            )
    elif path.exists():
        raise CorpusError(f"corpus '{label}': not a regular file or folder")
    else:
        raise CorpusError(f"corpus '{label}': no such file or folder")
    for f in files:
        if not os.access(f, os.R_OK):
            raise CorpusError(f"corpus '{label}': cannot read {f}")
    return files


def parse_corpus(spec: str | CorpusSpec) -> CorpusSpec:
    """Parse 'PATH', 'hf:DATASET[:CONFIG][:SPLIT]', 'self' or 'auto' (see the module docstring).

    Raises CorpusError (one line, naming the corpus) for a missing or unreadable path, a folder without text
    files, or an 'hf:' corpus when the `datasets` library is not installed.
    """
    if isinstance(spec, CorpusSpec):
        return spec
    spec = spec.strip()
    if spec == "self":
        return CorpusSpec("self", "self")
    if spec == "auto":
        if _hf_available() and hub_reachable():
            return CorpusSpec("hf", AUTO_HF)
        why = "the `datasets` library is not installed" if not _hf_available() else "the hub is unreachable"
        log.warning("corpus 'auto': %s; sampling the statistics corpus from the model itself ('self')", why)
        return CorpusSpec("self", "self")
    if spec.startswith("hf:"):
        ident = spec[3:]
        if not _split_hf(ident)[0]:
            raise CorpusError(f"corpus '{spec}': expected hf:DATASET[:CONFIG][:SPLIT]")
        if not _hf_available():
            raise CorpusError(_NO_DATASETS.format(spec=spec))
        return CorpusSpec("hf", ident)
    if not spec:
        raise CorpusError("corpus '': empty corpus name (give a path, hf:DATASET, self or auto)")
    path = Path(spec).expanduser()
    _corpus_files(path, spec)
    return CorpusSpec("file", str(path.resolve()))


def _iter_file_texts(spec: CorpusSpec) -> Iterator[str]:
    for f in _corpus_files(Path(spec.ident), spec.ident):
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.strip():
                        yield line
        except OSError as e:
            raise CorpusError(f"corpus '{spec.ident}': cannot read {f}: {e.strerror or e}") from None


def _iter_hf_texts(spec: CorpusSpec) -> Iterator[str]:
    if not _hf_available():
        raise CorpusError(_NO_DATASETS.format(spec=spec))
    import datasets  # optional dependency

    dataset, config, split = _split_hf(spec.ident)
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        for row in ds:
            if "text" not in row:
                raise CorpusError(f"corpus '{spec}': the dataset has no 'text' column")
            text = row["text"]
            if isinstance(text, str) and text.strip():
                yield text
    except CorpusError:
        raise
    except Exception as e:  # the datasets library raises many kinds of errors (network, missing config, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"corpus '{spec}': cannot load the dataset ({first})") from None


def _bos_is_document_start(tok: PreTrainedTokenizerBase) -> bool:
    """True when the BOS token marks a document start: the tokenizer adds it by default (Llama, Gemma) or it
    is also the end-of-text token (GPT-2's <|endoftext|>). SmolLM2's BOS is the chat token <|im_start|>,
    which the tokenizer does not add: such a model is started from generic words instead."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    if bos == tok.eos_token_id:
        return True
    return bos in tok("a")["input_ids"] and bos not in tok("a", add_special_tokens=False)["input_ids"]


def _iter_self_texts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, seed: int,
                     rows: int = SELF_BATCH) -> Iterator[str]:
    """Endless texts sampled from the model with the KV cache (`pmet.sampling.sample`). Text j has up to
    SELF_NEW_TOKENS new tokens, drawn by top-k (k=SELF_TOP_K) sampling at temperature 1 with the random stream
    seeded by seed · 1,000,003 + j; it starts from the BOS token when that marks document starts, else from
    the word SELF_STARTS[j mod 12] (kept in the text). Texts are sampled `rows` at a time (at most
    SELF_BATCH, and fewer where their KV caches would not fit: pmet.sizing.sampling_rows); which texts come out
    does not depend on `rows`."""
    starts = [[tok.bos_token_id]] if _bos_is_document_start(tok) else [tok(w)["input_ids"] for w in SELF_STARTS]
    length = max(map(len, starts)) + SELF_NEW_TOKENS
    rows = sampling_rows(model, next(model.parameters()).device, length, max(1, min(rows, SELF_BATCH)))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = eos_token_ids(model, tok)
    empty_batches, j = 0, 0
    while True:
        idx = range(j, j + rows)
        prompts = [starts[i % len(starts)] for i in idx]
        new = sample(model, prompts, [SELF_NEW_TOKENS] * rows, [seed * 1_000_003 + i for i in idx],
                     top_k=SELF_TOP_K, eos_ids=eos, pad_id=pad_id)
        texts = [t for t in tok.batch_decode([p + n for p, n in zip(prompts, new, strict=True)],
                                             skip_special_tokens=True) if t.strip()]
        empty_batches = 0 if texts else empty_batches + 1
        if empty_batches >= 10:
            raise CorpusError("corpus 'self': the model generated no text in 10 batches")
        yield from texts
        j += rows


def iter_corpus_texts(
    spec: CorpusSpec | str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, *, seed: int = 0,
    n_tokens: int | None = None,
) -> Iterator[str]:
    """The texts of a corpus, in order: non-blank lines of the file(s), the 'text' column of a dataset, or
    (endlessly) texts sampled from `model` (deterministic given `seed`; see `_iter_self_texts`), as many at a
    time as about `n_tokens` tokens need."""
    spec = parse_corpus(spec)
    if spec.kind == "file":
        return _iter_file_texts(spec)
    if spec.kind == "hf":
        return _iter_hf_texts(spec)
    if spec.kind == "self":
        rows = SELF_BATCH if n_tokens is None else math.ceil(SELF_MARGIN * n_tokens / SELF_NEW_TOKENS)
        return _iter_self_texts(model, tok, seed, rows)
    raise CorpusError(f"corpus '{spec}': unknown kind '{spec.kind}'")


def pack_sequences(texts: Iterable[str], tok: PreTrainedTokenizerBase, seq_len: int) -> Iterator[list[int]]:
    """Tokenize texts (tokenizer defaults) and cut the concatenated token stream into sequences of
    `seq_len` tokens; the last one may be shorter."""
    buf: list[int] = []
    chunk: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal buf
        for ids in tok(chunk)["input_ids"]:
            buf.extend(ids)
        chunk.clear()
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]

    for text in texts:
        chunk.append(text)
        if len(chunk) >= _TOKENIZE_CHUNK:
            yield from flush()
    if chunk:
        yield from flush()
    if buf:
        yield buf


def iter_batches(
    texts: Iterable[str], tok: PreTrainedTokenizerBase, *, seq_len: int, batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) CPU batches of packed sequences, right-padded with `pad_id`."""
    batch: list[list[int]] = []
    for seq in pack_sequences(texts, tok, seq_len):
        batch.append(seq)
        if len(batch) == batch_size:
            yield pad_right(batch, pad_id)
            batch = []
    if batch:
        yield pad_right(batch, pad_id)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "corpus"


def corpus_id(spec: CorpusSpec, *, seed: int = 0) -> str:
    """A short filesystem-safe id of a corpus: file name + hash of (paths, sizes, mtimes); the dataset id;
    or 'self-<sampling.SCHEME>-seed{seed}'."""
    if spec.kind == "file":
        files = _corpus_files(Path(spec.ident), spec.ident)
        return f"{_safe(Path(spec.ident).name)[:48]}-{files_stamp(files)}"
    if spec.kind == "hf":
        return _safe(spec.ident)[:96]
    return f"self-{SCHEME}-seed{seed}"
