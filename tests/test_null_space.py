"""The null-space option (AlphaEdit's projection, pmet/null_space.py) on random matrices and tiny models."""

from __future__ import annotations

import pytest
import torch

from pmet.arch import get_weight, layout_of
from pmet.config import config_for
from pmet.editor import edit
from pmet.errors import ConfigError
from pmet.null_space import cached_projector, projector, solve_factors

from .test_engine import REQUESTS, TEMPLATES, cfg_for
from .tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _c0(d: int, dominant: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A C0 with `dominant` eigenvalues ≥ 0.5 and the rest ≤ 1e-3, and its dominant eigenvectors (d, dominant)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.cat([0.5 + torch.rand(dominant, generator=g, dtype=torch.float64),
                        1e-3 * torch.rand(d - dominant, generator=g, dtype=torch.float64)])
    return Q @ torch.diag(values) @ Q.T, Q[:, :dominant]


def test_projector_is_the_null_space_of_the_dominant_keys(tmp_path):
    c0, dom = _c0(24, 10)
    P = projector(c0, 2e-2)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    torch.testing.assert_close(P, P.T, rtol=0, atol=0)
    assert round(float(P.trace())) == 14  # the 14 small eigenvalues
    assert float((P @ dom).norm()) < 1e-12  # P k = 0 for keys in the preserved span
    assert torch.equal(cached_projector(c0, 2e-2, tmp_path), P)  # computed, cached
    assert torch.equal(cached_projector(c0, 2e-2, tmp_path), P)  # read back
    assert round(float(cached_projector(c0, 1.6, tmp_path).trace())) == 24  # another threshold, another key


def test_update_keeps_the_dominant_directions_and_is_alphaedits_formula():
    g = torch.Generator().manual_seed(1)
    c0, dom = _c0(24, 10)
    P = projector(c0, 2e-2)
    R, K = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(24, 3, generator=g, dtype=torch.float64)
    Kp = torch.randn(24, 5, generator=g, dtype=torch.float64)
    U, V = solve_factors(R, K, P, Kp @ Kp.T, 10.0)
    delta = U @ V.T
    # AlphaEdit_main.py: upd = solve(P (K Kᵀ + cache_c) + L2·I, P K Rᵀ); W += updᵀ (Llama layout)
    upd = torch.linalg.solve(P @ (K @ K.T + Kp @ Kp.T) + 10.0 * torch.eye(24, dtype=torch.float64), P @ K @ R.T)
    torch.testing.assert_close(delta, upd.T, rtol=1e-10, atol=1e-12)
    assert float((delta @ dom).norm()) < 1e-10 * float(delta.norm())  # Δ u = 0 where P u = 0
    # earlier keys are protected by the solve: their outputs move less than without them
    U0, V0 = solve_factors(R, K, P, None, 10.0)
    assert float((delta @ Kp).norm()) < float(((U0 @ V0.T) @ Kp).norm())


def test_null_space_edit_moves_the_edited_keys_and_spares_the_preserved_ones():
    """On a tiny random model (which no edit teaches much): Δ changes the outputs of the edited keys, and leaves
    the outputs of C0's dominant key directions as they were (SmolLM2 results: docs/RESULTS.md)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lay = layout_of(model)
    d = get_weight(model, lay.edited_module(0, "ffn")).shape[1]
    c0, dom = {}, {}
    for l in (1, 2):
        c0[(l, "ffn")], dom[l] = _c0(d, d // 4, seed=l)
    res = edit(model, tok, REQUESTS, cfg_for(null_space=True, null_space_l2=0.1), c0=c0, context_templates=TEMPLATES,
               progress=False)
    for u in res.updates:
        D = u.delta.double()
        on_edited = float(torch.trace(D @ u.key_gram @ D.T).sqrt())  # ‖Δ K1‖_F
        assert on_edited > 0.1 * float(D.norm()) * float(u.key_gram.trace().sqrt()) / d**0.5
        assert float((D @ dom[u.layer]).norm()) < 1e-6 * float(D.norm())
        assert u.key_gram.shape == (d, d)


def test_null_space_is_refused_for_sequential_methods():
    for method in ("rome", "ft"):
        with pytest.raises(ConfigError, match="applies to PMET and MEMIT"):
            config_for("llama", "smollm2-135m", None, method, None, {"null_space": True})
    assert config_for("llama", "smollm2-135m", None, "memit", None, {"null_space": True}).null_space


def test_an_empty_null_space_is_refused_not_a_silent_no_op():
    from .test_engine import identity_c0

    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ConfigError, match="null space is empty"):  # every eigenvalue of C0 is 1 > 2e-2
        edit(model, tok, REQUESTS, cfg_for(null_space=True), c0=identity_c0(model, [1, 2]),
             context_templates=TEMPLATES, progress=False)


def test_a_chained_null_space_patch_keeps_the_patch_below_protected_as_a_batch_would(tmp_path):
    """Edit A, save it (its keys go into the patch), edit B on top with the keys read back from A's patch: the
    same total Δ as A and B as two sequential batches of one run; B without A's keys is another update. Altered
    keys in a patch are refused."""
    from safetensors.torch import load_file, save_file

    from pmet.errors import PatchError
    from pmet.methods.apply import apply_method
    from pmet.patch import EditResult, chain_keys

    from .test_engine import identity_c0

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = cfg_for(null_space=True, null_space_l2=1e-3)
    c0 = {k: v * 1e-3 for k, v in identity_c0(model, [1, 2]).items()}  # P = I: the earlier keys decide
    kw = dict(c0=c0, context_templates=TEMPLATES, progress=False)
    seq = apply_method("pmet", model, tok, REQUESTS, cfg, sequential_batches=2, **kw)
    seq.revert(model)

    a = edit(model, tok, REQUESTS[:2], cfg, **kw)
    a.save(tmp_path / "a")
    loaded = EditResult.load(tmp_path / "a")
    assert all(torch.equal(u.keys, v.keys) for u, v in zip(a.updates, loaded.updates, strict=True))
    earlier, without = chain_keys([loaded])
    assert without == [] and sorted(earlier) == [(1, "ffn"), (2, "ffn")]
    b = apply_method("pmet", model, tok, REQUESTS[2:], cfg, earlier_keys=earlier, **kw)
    for ua, ub, us in zip(a.updates, b.updates, seq.updates, strict=True):
        assert float((ua.delta + ub.delta - us.delta).norm()) <= 1e-5 * float(us.delta.norm())
    b.revert(model)
    unprotected = apply_method("pmet", model, tok, REQUESTS[2:], cfg, **kw)
    for ua, ub, uu in zip(a.updates, b.updates, unprotected.updates, strict=True):  # B moves A's keys less
        K_a = ua.keys.double().T
        assert float((ub.delta.double() @ K_a).norm()) < 0.5 * float((uu.delta.double() @ K_a).norm())
    unprotected.revert(model)
    a.revert(model)

    plain = edit(model, tok, REQUESTS[:1], cfg_for(), c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES,
                 progress=False)
    assert chain_keys([plain])[1] == [plain.patch_id]
    tensors = load_file(str(tmp_path / "a" / "patch.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "patch.safetensors"), "pt") as f:
        meta = f.metadata()
    name = next(k for k in tensors if k.startswith("keys::"))
    tensors[name] = tensors[name] * 1.001
    save_file(tensors, str(tmp_path / "a" / "patch.safetensors"), metadata=meta)
    with pytest.raises(PatchError, match="stored keys do not match"):
        EditResult.load(tmp_path / "a")
