"""Top-k sampling with the KV cache (pmet.sampling): the same tokens as sampling each prompt alone by full
forwards without a cache, on every architecture family; the draw follows the top-k distribution."""

from __future__ import annotations

import pytest
import torch

from pmet.sampling import MIN_SHARED, draw_top_k, row_uniforms, sample, shared_prefix

from .tiny import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _uncached(model, prompt: list[int], budget: int, seed: int, k: int, eos: list[int]) -> list[int]:
    """Reference: one prompt, no padding, no cache, a full forward per new token."""
    u = row_uniforms([seed], budget, torch.device("cpu"))[0]
    seq, new = list(prompt), []
    with torch.no_grad():
        for step in range(budget):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[:, -1]
            t = int(draw_top_k(logits, k, u[step : step + 1])[0])
            new.append(t)
            seq.append(t)
            if t in eos:
                break
    return new


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_batch_equals_each_prompt_alone(arch):
    """Prompts of different lengths (left padding), different budgets (rows finish and leave the batch) and an
    end-of-sequence id that some rows draw: every row's tokens equal the uncached one-prompt reference."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 2, 9, 3, 7)]
    budgets, seeds = [8, 3, 6, 1, 8], [11, 12, 13, 14, 15]
    free = sample(model, prompts, budgets, seeds, top_k=50, eos_ids=[], pad_id=0)
    assert [len(t) for t in free] == budgets
    eos = [free[0][4], free[2][1]]  # tokens that rows 0 and 2 draw: they must stop there
    got = sample(model, prompts, budgets, seeds, top_k=50, eos_ids=eos, pad_id=0)
    want = [_uncached(model, p, b, s, 50, eos) for p, b, s in zip(prompts, budgets, seeds, strict=True)]
    assert got == want
    assert len(got[0]) <= 5 and len(got[2]) <= 2 and got[0][-1] in eos
    assert sample(model, prompts[1:3], budgets[1:3], seeds[1:3], top_k=50, eos_ids=eos, pad_id=0) == got[1:3]


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_run_once_gives_the_same_tokens(arch, monkeypatch):
    """Prompts that share a 12-token prefix (as a chat template's system turn): the prefix runs once, in a batch of
    its own, and every row's tokens still equal the uncached one-prompt reference. A sliding window shorter than
    the texts turns sharing off (the rows' padding would fall inside the window)."""
    model = tiny_model(arch)
    torch.manual_seed(2)
    prefix = torch.randint(3, 300, (12,)).tolist()
    prompts = [prefix + torch.randint(3, 300, (n,)).tolist() for n in (4, 1, 6, 2)]
    budgets, seeds = [6, 3, 5, 6], [21, 22, 23, 24]
    assert shared_prefix(prompts) == 12 and shared_prefix([prefix, prefix]) == 11 and MIN_SHARED <= 12
    calls = []
    monkeypatch.setattr(model, "forward", _counting(model.forward, calls))
    if getattr(model.config, "sliding_window", None):
        sample(model, prompts, budgets, seeds, top_k=50, eos_ids=[], pad_id=0)
        assert calls[0] == (4, 18)  # window 4: not shared
        model.config.sliding_window, calls[:] = 64, []
    got = sample(model, prompts, budgets, seeds, top_k=50, eos_ids=[], pad_id=0)
    assert calls[0] == (1, 12)  # the prefix alone, then the rows' own tokens after it
    assert calls[1] == (4, 6)
    want = [_uncached(model, p, b, s, 50, []) for p, b, s in zip(prompts, budgets, seeds, strict=True)]
    assert got == want


def _counting(forward, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)
    return wrapped


def test_draw_follows_the_top_k_distribution():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 3.0, -5.0]]).expand(20_000, -1)
    u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000  # an even grid: counts = probabilities
    drawn = draw_top_k(logits, 3, u)
    counts = torch.bincount(drawn, minlength=6).double() / 20_000
    want = torch.zeros(6, dtype=torch.float64)
    want[[4, 0, 2]] = torch.softmax(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 0)
    assert torch.allclose(counts, want, atol=1e-3)
    assert row_uniforms([3, 4], 5, torch.device("cpu")).shape == (2, 5)
    assert torch.equal(row_uniforms([3], 5, torch.device("cpu"))[0], row_uniforms([9, 3], 5, torch.device("cpu"))[1])
