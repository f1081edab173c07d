"""Batch sizes: the config's on a CPU; on a CUDA device, with `batch_sizing: auto`, as large as free memory allows.

Target optimisation (`request_batches`): the first batch has the config's `v_batch_size` requests; the peak memory
it took per request (`torch.cuda.max_memory_allocated`) and the memory then free set the size of the others, so a
GPU is filled without a model-specific memory formula. `v_rows_per_pass` grows by the same factor. Targets do not
depend on the batch layout (each request is optimised on its own), so sizing changes speed, not results.
Evaluation: prompts per teacher-forced pass (`scoring_prompts`, on a GPU) and texts per sampling batch
(`sampling_rows`, GPU and CPU), from the bytes a prompt holds (activations of the widest layer) and a text holds
(its KV cache).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from .config import PMETConfig

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.7  # of the free device memory a batch may take
MAX_REQUESTS = 1024  # most requests per optimisation batch
MAX_EVAL_ROWS = 4096  # most prompts per scoring pass or generation batch
CPU_SAMPLING_BYTES = 2 * 2**30  # KV cache one sampling batch may hold on a CPU


def sizes_apply(cfg: PMETConfig, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.batch_sizing == "auto"


def free_bytes(device: torch.device) -> int:
    """Device memory free to this process: the driver's free memory plus what torch holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def request_batches(n: int, cfg: PMETConfig, device: torch.device) -> Iterator[tuple[list[int], PMETConfig]]:
    """Index batches of `n` requests with the config to optimise each under (`v_batch_size` and
    `v_rows_per_pass` raised on a CUDA device after the first batch; see the module docstring)."""
    size, start, measured = cfg.v_batch_size, 0, not sizes_apply(cfg, device)
    while start < n:
        batch = list(range(start, min(n, start + size)))
        if not measured:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        yield batch, cfg
        start += len(batch)
        if not measured:
            measured = True
            per_request = max(1, (torch.cuda.max_memory_allocated(device) - base) // len(batch))
            size = max(cfg.v_batch_size, min(MAX_REQUESTS, int(MEMORY_SHARE * free_bytes(device) // per_request)))
            grow = size / cfg.v_batch_size
            cfg = cfg.replace(v_batch_size=size, v_rows_per_pass=int(cfg.v_rows_per_pass * grow))
            log.info("first batch took %.0f MiB per request; next batches: %d requests, %d rows per pass",
                     per_request / 2**20, cfg.v_batch_size, cfg.v_rows_per_pass)


def _row_bytes(model: torch.nn.Module, length: int) -> tuple[int, int]:
    """Bytes one scored prompt and one sampled text of `length` positions hold: the prompt about 12 activations
    of width d_ff at once (no gradients); the text its KV cache (2 · layers · d_kv · length) and a row of logits."""
    cfg = model.config.get_text_config()
    width = next(p for p in model.parameters()).element_size()
    d_ff = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * length * width
    return 12 * length * d_ff * width, kv + 4 * cfg.vocab_size * 4


def scoring_prompts(model: torch.nn.Module, device: torch.device, max_length: int) -> int:
    """Prompts per teacher-forced pass that fit MEMORY_SHARE of a CUDA device's free memory, for prompts of
    `max_length` positions (`_row_bytes`): at least 64, at most MAX_EVAL_ROWS."""
    return max(64, min(MAX_EVAL_ROWS, int(MEMORY_SHARE * free_bytes(device) // _row_bytes(model, max_length)[0])))


def sampling_rows(model: torch.nn.Module, device: torch.device, length: int, wanted: int) -> int:
    """`wanted` texts per sampling batch, or fewer so that their KV caches and logits (`_row_bytes`) fit
    MEMORY_SHARE of a CUDA device's free memory, or CPU_SAMPLING_BYTES on a CPU (a 7B model's cache of 100
    positions takes ~130 MiB per text in float32)."""
    budget = MEMORY_SHARE * free_bytes(device) if device.type == "cuda" else CPU_SAMPLING_BYTES
    return max(1, min(wanted, int(budget // _row_bytes(model, length)[1])))
