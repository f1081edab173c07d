"""Batch sizes (pmet.sizing): the config's on a CPU or when pinned; on a CUDA device the first batch's peak memory
per request sets the size of the others (the CUDA memory queries are faked here: no GPU in tests)."""

from __future__ import annotations

import pytest
import torch

from pmet import sizing
from pmet.config import PMETConfig

GIB = 2**30


def _batches(n, cfg, device):
    return [(b, c.v_batch_size, c.v_rows_per_pass) for b, c in sizing.request_batches(n, cfg, device)]


def test_cpu_and_fixed_sizing_keep_the_config():
    cfg = PMETConfig(v_batch_size=4, v_rows_per_pass=8)
    got = _batches(10, cfg, torch.device("cpu"))
    assert [b for b, _, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and {s for _, s, _ in got} == {4}
    fixed = _batches(10, cfg.replace(batch_sizing="fixed"), torch.device("cuda"))  # no CUDA call is made
    assert [b for b, _, _ in fixed] == [b for b, _, _ in got]


def test_cuda_batches_grow_to_the_free_memory(monkeypatch):
    state = {"allocated": 1 * GIB, "peak": 0}
    fake = {"synchronize": lambda d=None: None,
            "reset_peak_memory_stats": lambda d=None: state.update(peak=state["allocated"]),
            "memory_allocated": lambda d=None: state["allocated"],
            "max_memory_allocated": lambda d=None: state["peak"],
            "memory_reserved": lambda d=None: state["allocated"] + 2 * GIB,  # 2 GiB cached by torch, unused
            "mem_get_info": lambda d=None: (8 * GIB, 16 * GIB)}
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cfg = PMETConfig(v_batch_size=4, v_rows_per_pass=8)
    seen = []
    for batch, c in sizing.request_batches(100, cfg, torch.device("cuda")):
        seen.append((len(batch), c.v_batch_size, c.v_rows_per_pass))
        state["peak"] = state["allocated"] + len(batch) * 100 * 2**20  # 100 MiB per request
    # free = 8 + 2 GiB; 0.7 of it / 100 MiB = 71 requests; rows per pass grow by the same factor (71 / 4)
    assert seen == [(4, 4, 8), (71, 71, 142), (25, 71, 142)]
    assert sum(n for n, _, _ in seen) == 100


def test_eval_sizes_follow_the_model_shapes(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(sizing, "free_bytes", lambda d: 10 * GIB)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    cuda = torch.device("cuda")
    score = sizing.scoring_prompts(model, cuda, 100)
    gen = sizing.sampling_rows(model, cuda, 100, sizing.MAX_EVAL_ROWS)
    assert score == sizing.MAX_EVAL_ROWS and gen == sizing.MAX_EVAL_ROWS  # a tiny model: capped
    monkeypatch.setattr(sizing, "free_bytes", lambda d: 64 * 2**20)
    score = sizing.scoring_prompts(model, cuda, 100)
    gen = sizing.sampling_rows(model, cuda, 100, sizing.MAX_EVAL_ROWS)
    assert score == int(0.7 * 64 * 2**20 // (12 * 100 * 128 * 4))
    assert gen == int(0.7 * 64 * 2**20 // (2 * 2 * 2 * 16 * 100 * 4 + 4 * 1000 * 4))


def test_batch_sizing_is_validated():
    from pmet.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_sizing"):
        PMETConfig(batch_sizing="huge").replace()


def test_sampling_rows_bound_the_kv_cache(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    cpu = torch.device("cpu")
    assert sizing.sampling_rows(model, cpu, 100, 256) == 256  # a tiny model: what was asked for
    per_text = 2 * 2 * 2 * 16 * 100 * 4 + 4 * 1000 * 4
    monkeypatch.setattr(sizing, "CPU_SAMPLING_BYTES", 10 * per_text)
    assert sizing.sampling_rows(model, cpu, 100, 256) == 10
    monkeypatch.setattr(sizing, "CPU_SAMPLING_BYTES", per_text // 2)
    assert sizing.sampling_rows(model, cpu, 100, 256) == 1
