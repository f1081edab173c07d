"""The source shims of benchmarks/crosscheck_easyedit.py on hand-written snippets in EasyEdit's style (EasyEdit
itself is not available in CI): each shim rewrites what it must and refuses a source it no longer fits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crosscheck_easyedit.py"
spec = importlib.util.spec_from_file_location("crosscheck_easyedit", SCRIPT)
crosscheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crosscheck)

COMPUTE_Z = '''
def f(tr, hparams, loss_layer, cur_out, delta, tok):
    ids = tok.encode("x").to(f"cuda:{hparams.device}")
    z = torch.zeros(3, device="cuda")
    cur_out[0][0, 1] += delta
    return tr[hparams.layer_module_tmp.format(loss_layer)].output[0][:2], z.to("cuda:1"), ids
'''


def test_shims_rewrite_devices_and_tuple_reads(tmp_path):
    path = tmp_path / "compute_z.py"
    path.write_text(COMPUTE_Z)
    src = crosscheck._shimmed_source(path, devices=True, tuple_reads=True)
    assert "cuda" not in src
    assert src.count("_DEVICE") == 3
    assert "_first(tr[hparams.layer_module_tmp.format(loss_layer)].output)[:2]" in src
    assert "_first(cur_out)[0, 1] += delta" in src


def test_first_takes_element_zero_of_a_tuple_only():
    h = torch.arange(6.0).reshape(2, 3)
    assert crosscheck._first((h, None)) is h
    assert crosscheck._first(h) is h  # a tensor (transformers 5) is the hidden states themselves


def test_shims_refuse_a_source_they_do_not_fit(tmp_path):
    path = tmp_path / "compute_z.py"
    path.write_text(COMPUTE_Z.replace(".output[0]", ".output"))
    with pytest.raises(SystemExit, match="shim 2"):
        crosscheck._shimmed_source(path, devices=True, tuple_reads=True)
    path.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="shim 1"):
        crosscheck._shimmed_source(path, devices=True, tuple_reads=False)
