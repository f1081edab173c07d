"""What an edit costs the model on ordinary text: perplexity drift and top-1 agreement with the unedited model.

The text is held out from everything an edit reads (default: WikiText-2's test split, while C0 reads the
validation split): the first CHUNKS × LENGTH tokens, cut into CHUNKS consecutive chunks of LENGTH tokens (each
preceded by the tokenizer's BOS token when it adds one). For each chunk: the mean negative log-likelihood of its
tokens (each predicted from the chunk's earlier tokens) and the argmax prediction at each position. Reported
(summary.json `metrics`):

    perplexity          exp(mean NLL over all chunks), for the unedited and the edited model
    perplexity_delta    per chunk exp(NLL edited) − exp(NLL unedited), mean ± 95% CI over chunks
    top1_agreement      per chunk the fraction of positions whose argmax is the unedited model's, mean ± 95% CI
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import ConfigError
from .metrics import mean_ci95

CHUNKS = 32
LENGTH = 128
BATCH = 8  # chunks per forward pass (the logits of one pass: BATCH × LENGTH × vocabulary floats)
DEFAULT_TEXT = Path("wikitext") / "wikitext-2-raw" / "wiki.test.raw"


def default_text() -> Path | None:
    """WikiText-2's test split under $PMET_DATA_DIR (default ../shared/data), or None when it is not there."""
    path = Path(os.environ.get("PMET_DATA_DIR") or "../shared/data") / DEFAULT_TEXT
    return path if path.is_file() else None


def text_chunks(tok: PreTrainedTokenizerBase, path: str | os.PathLike, chunks: int = CHUNKS,
                length: int = LENGTH) -> list[list[int]]:
    """The first `chunks` × `length` tokens of the text file at `path`, as `chunks` rows (BOS first, if the
    tokenizer adds one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--drift-text {path}: cannot read: {e}") from None
    first = tok("a")["input_ids"][:1]
    bos = first if tok.bos_token_id is not None and first == [tok.bos_token_id] else []
    ids = tok(text[: 16 * chunks * length], add_special_tokens=False)["input_ids"]
    n = length - len(bos)
    if len(ids) < chunks * n:
        raise ConfigError(f"--drift-text {path}: {len(ids)} tokens, fewer than the {chunks * n} needed")
    return [bos + ids[i * n : (i + 1) * n] for i in range(chunks)]


@torch.no_grad()
def language_stats(model: PreTrainedModel, rows: list[list[int]]) -> dict[str, list]:
    """Per chunk: the mean NLL of its tokens after the first, and the argmax prediction at each position."""
    device = next(model.parameters()).device
    nll: list[float] = []
    argmax: list[list[int]] = []
    for start in range(0, len(rows), BATCH):
        ids = torch.tensor(rows[start : start + BATCH], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll += (-logp.mean(-1)).tolist()
        argmax += logits.argmax(-1).tolist()
    return {"nll": nll, "argmax": argmax}


def drift_metrics(unedited: dict[str, list], edited: dict[str, list] | None) -> dict[str, dict[str, Any]]:
    """The summary's perplexity metrics (module docstring); `edited` None: the unedited model's own."""
    now = edited or unedited

    def ppl(stats: dict[str, list]) -> float:
        return math.exp(sum(stats["nll"]) / len(stats["nll"]))

    out: dict[str, dict[str, Any]] = {"perplexity": {"mean": ppl(now), "ci95": None, "n": len(now["nll"])}}
    deltas = [math.exp(a) - math.exp(b) for a, b in zip(now["nll"], unedited["nll"], strict=True)]
    agree = [sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
             for a, b in zip(now["argmax"], unedited["argmax"], strict=True)]
    for name, values in (("perplexity_delta", deltas), ("top1_agreement", agree)):
        mean, ci = mean_ci95(values)
        out[name] = {"mean": mean, "ci95": ci, "n": len(values)}
    return out
