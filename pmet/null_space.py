"""AlphaEdit's null-space constrained update (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for
Language Models", ICLR 2025), an option beside Eq. 9 (config `null_space`; off by default: the paper's PMET).

    P  = Û Ûᵀ, Û = the eigenvectors of C0 with eigenvalue < null_space_threshold        (AlphaEdit, Eq. 7-8)
    Δ  = R K1ᵀ P (P (K1 K1ᵀ + K_p K_pᵀ) + α I)⁻ᵀ                                          (AlphaEdit, Eq. 14)

as AlphaEdit's code computes it (AlphaEdit_main.py: `solve(P (K Kᵀ + cache_c) + L2·I, P K Rᵀ)`, then transposed),
with K_p K_pᵀ the keys of earlier edits of a sequential run (its `cache_c`) and α = null_space_l2. It replaces
λ C0 in Eq. 9: for any u with P u = 0 (C0's dominant key directions), Δ u = 0 exactly, so the outputs there are
kept. As Eq. 9, Δ = U Vᵀ with U = R, V = (P (K1 K1ᵀ + K_p K_pᵀ) + α I)⁻¹ P K1 (rank ≤ n, a compact patch's factors).
The projectors are cached beside C0, keyed on the exact C0 bytes and the threshold.
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file

from .cache import cache_root, digest, tensor_sha256
from .fileio import atomic_write


def projector(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over C0's eigenvectors with eigenvalue < threshold (float64; C0 is symmetric, so its SVD in
    AlphaEdit's code is this eigen-decomposition)."""
    values, vectors = torch.linalg.eigh(c0.double())
    small = vectors[:, values < threshold]
    return small @ small.T


def cached_projector(c0: torch.Tensor, threshold: float, cache_dir: str | os.PathLike | None = None
                     ) -> torch.Tensor:
    """`projector(c0, threshold)`, from the cache when this exact C0 and threshold were seen before."""
    key = digest([tensor_sha256(c0), str(c0.dtype), threshold], 16)
    path = cache_root(cache_dir) / "stats" / "null_space" / f"P-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["P"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is recomputed and replaced
    P = projector(c0, threshold)
    with contextlib.suppress(OSError):  # a cache that cannot be written is skipped
        atomic_write(path, lambda tmp: save_file({"P": P.contiguous()}, tmp))
    return P


def solve_factors(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, earlier: torch.Tensor | None, alpha: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update as factors U = R, V = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K, float64.

    R: (d_out, n) residuals; K: (d_in, n) keys; P: (d_in, d_in); earlier: K_p K_pᵀ (d_in, d_in) or None."""
    R, K = R.double(), K.double()
    P = P.to(device=K.device, dtype=torch.float64)
    M = K @ K.T
    if earlier is not None:
        M.add_(earlier.to(device=K.device, dtype=torch.float64))
    A = P @ M
    A.diagonal().add_(alpha)
    return R, torch.linalg.solve(A, P @ K)
