"""Matrix-product peak of this machine: GFLOP/s of `M×576 @ 576×1536` (SmolLM2's FFN up-projection) at M = 64, 256
and 4,096 rows, in float32 and bfloat16, and their ratio, in one process. What the target stage's speed is
compared against in docs/PERFORMANCE.md; run it on an otherwise idle machine.

    python benchmarks/gemm_peak.py [--threads 2] [--seconds 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def gflops(rows: int, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(rows, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):  # warm-up
        a @ b
    flop, n, start = 2 * rows * 576 * 1536, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return flop * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}")
    for rows in (64, 256, 4096):
        fp32, bf16 = gflops(rows, torch.float32, args.seconds), gflops(rows, torch.bfloat16, args.seconds)
        print(f"{rows:5d} rows: float32 {fp32:6.0f} GFLOP/s, bfloat16 {bf16:6.0f} GFLOP/s, x{bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
