"""Peak memory at scale, each measurement in a child process of its own (peak RSS above the process's start):

1. `--part llama8b`: one randomly initialised layer with Llama-3-8B's shapes (d = 4096, d_ff = d_k = 14,336,
   32 heads, 8 KV heads; no hub, no weights): C0 of its FFN keys from WikiText text (`compute_c0`, float64), then
   the Eq. 9 solve for 1,000 requests (`solve_delta`, float64) — against the size of one d_k × d_k float64 matrix.
2. `--part targets`: the target stage on SmolLM2 for a growing number of requests at a fixed batch size
   (v_batch_size 16, 2 Adam steps): the peak must not grow with the number of requests.

    python benchmarks/bench_memory.py [--part llama8b|targets|all]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
MIB = 2**20


class PeakRSS:
    """The process's resident set size, sampled every 5 ms by a thread: peak above the value at start."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / MIB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def llama8b_layer(stage: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pmet.models import load_model
    from pmet.stats import compute_c0
    from pmet.update import solve_delta

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    tok = load_model("smollm2-135m", device="cpu").tok  # any tokenizer whose ids fit the vocabulary
    d_k, one = cfg.intermediate_size, cfg.intermediate_size**2 * 8 / MIB
    corpus = str(DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw")
    if stage == "c0":
        with PeakRSS() as peak:
            t = time.perf_counter()
            c0, _ = compute_c0(model, tok, [0], corpus, 8192, batch_size=8, progress=False)
        return (f"Llama-3-8B-shaped layer, C0 over 8,192 tokens (d_k {d_k}): {time.perf_counter() - t:.0f} s, "
                f"peak +{peak.mib:.0f} MiB = {peak.mib / one:.2f} d_k² float64 matrices of {one:.0f} MiB")
    c0 = torch.eye(d_k, dtype=torch.float64)
    K, R = torch.randn(d_k, 1000), torch.randn(cfg.hidden_size, 1000)
    with PeakRSS() as peak:
        t = time.perf_counter()
        solve_delta(R, K, c0, 15000.0)
    return (f"Llama-3-8B-shaped layer, Eq. 9 solve for 1,000 requests: {time.perf_counter() - t:.0f} s, peak "
            f"+{peak.mib:.0f} MiB above C0 = {peak.mib / one:.2f} d_k² float64 matrices of {one:.0f} MiB")


def targets(n: int) -> str:
    from pmet.arch import layout_of
    from pmet.config import load_config
    from pmet.editor import context_templates_for
    from pmet.models import fingerprint, load_model
    from pmet.requests import load_requests
    from pmet.targets import compute_targets

    lm = load_model("smollm2-135m", device="cpu")
    cfg = load_config("smollm2-135m").replace(v_batch_size=16, v_num_grad_steps=2)
    reqs = load_requests(DATA / "counterfact_easyedit" / "counterfact-train.json", limit=n)
    templates = context_templates_for(lm.model, lm.tok, cfg, fingerprint(lm.model))
    with PeakRSS() as peak:
        t = time.perf_counter()
        compute_targets(lm.model, lm.tok, layout_of(lm.model), reqs, templates, cfg)
    return (f"targets, {n} requests in batches of 16 (2 steps): {time.perf_counter() - t:.0f} s, "
            f"peak +{peak.mib:.0f} MiB")


def child(*args: str) -> str:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["llama8b", "targets", "all"], default="all")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        kind, value = args.child
        print(llama8b_layer(value) if kind == "llama8b" else targets(int(value)))
        return
    if args.part in ("llama8b", "all"):
        for stage in ("c0", "solve"):
            print(child("llama8b", stage), flush=True)
    if args.part in ("targets", "all"):
        for n in (16, 64, 256):
            print(child("targets", str(n)), flush=True)


if __name__ == "__main__":
    main()
