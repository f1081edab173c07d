"""C0 = E[k kᵀ] (Eq. 9): pmet.stats and its corpora (pmet.corpus) on tiny random models built offline, with a
tiny byte-level BPE."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pmet import corpus, stats
from pmet.corpus import CorpusSpec, iter_batches, iter_corpus_texts, parse_corpus
from pmet.errors import CorpusError
from pmet.stats import batch_keys, c0_from_keys, compute_c0, get_c0

from .tiny import SENTENCES, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def gpt2(tok) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=128)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    lines = []
    for i in range(12):
        lines += [f" = Section {i} = \n", "\n"] + [f" {s} ({i})\n" for s in SENTENCES] + ["\n"]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wiki_valid() -> Path:
    root = Path(os.environ.get("PMET_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    path = root / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found (set PMET_DATA_DIR)")
    return path


def _n_corpus_tokens(tok, path: Path) -> int:
    texts = list(iter_corpus_texts(parse_corpus(str(path)), None, tok, seed=0))
    return sum(len(ids) for ids in tok(texts)["input_ids"])


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    return torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


# --------------------------------------------------------------------------------------------- Eq. 9 math


def test_c0_from_keys_is_mean_outer_product():
    keys = torch.randn(50, 6)
    expected = sum(torch.outer(k, k) for k in keys.double()) / 50
    got = c0_from_keys(keys)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected)


def test_compute_c0_matches_hand_computation_two_layers(llama, tok, corpus_file):
    seq_len, batch_size = 32, 4
    total = _n_corpus_tokens(tok, corpus_file)
    n = 2 * seq_len * batch_size + 37  # three batches, the last one trimmed mid-row
    assert total > n
    c0, info = compute_c0(
        llama, tok, [1, 2], str(corpus_file), n, seq_len=seq_len, batch_size=batch_size, progress=False
    )
    assert info.n_tokens == n and info.corpus_kind == "file" and info.dtype == "float32"
    assert info.from_cache == {1: False, 2: False}

    # Packing: the concatenated non-padding ids are exactly the tokenized texts, in order.
    texts = list(iter_corpus_texts(str(corpus_file), llama, tok, seed=0))
    batches = list(iter_batches(texts, tok, seq_len=seq_len, batch_size=batch_size, pad_id=tok.pad_token_id))
    stream = torch.cat([ids[mask.bool()] for ids, mask in batches])
    assert stream.tolist() == [t for ids in tok(texts)["input_ids"] for t in ids]
    assert all(ids.shape[1] <= seq_len and ids.shape[0] <= batch_size for ids, _ in batches)

    # Hand computation: plain forward hooks on down_proj of a full forward pass.
    got: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    handles, current = [], {}
    for layer in (1, 2):
        mod = llama.model.layers[layer].mlp.down_proj
        handles.append(mod.register_forward_hook(lambda m, a, o, i=layer: got[i].append(a[0][current["m"]])))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                current["m"] = mask.bool()
                llama(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for layer in (1, 2):
        k = torch.cat(got[layer])[:n].double()
        assert k.shape == (n, 64)
        expected = k.T @ k / n
        assert c0[layer].dtype == torch.float64 and c0[layer].device.type == "cpu"
        assert _close(c0[layer], expected), (c0[layer] - expected).abs().max()


def test_padding_tokens_are_excluded(llama, tok):
    torch.manual_seed(1)
    a = torch.randint(3, len(tok), (24,))
    b = torch.randint(3, len(tok), (5,))
    ids = torch.zeros(2, 24, dtype=torch.long)  # pad id 0
    mask = torch.zeros(2, 24, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :5], mask[1, :5] = b, 1
    name = "model.layers.2.mlp.down_proj"
    padded = batch_keys(llama, ids, mask, [name])[name]
    alone = torch.cat(
        [batch_keys(llama, s[None], torch.ones(1, len(s), dtype=torch.long), [name])[name] for s in (a, b)]
    )
    assert padded.shape == (29, 64)
    assert _close(c0_from_keys(padded), c0_from_keys(alone), rtol=1e-5)
    # The test means something: including the 19 padding positions changes C0.
    everything = batch_keys(llama, ids, torch.ones_like(mask), [name])[name]
    assert not _close(c0_from_keys(everything), c0_from_keys(alone), rtol=1e-3)


def test_padding_batch_size_invariance(llama, tok, corpus_file):
    # seq_len 100 leaves a short last sequence: batched, it is padded; with batch_size 1 it is not.
    total = _n_corpus_tokens(tok, corpus_file)
    assert total % 100 != 0
    one, _ = compute_c0(llama, tok, [3], str(corpus_file), total, seq_len=100, batch_size=1, progress=False)
    many, _ = compute_c0(llama, tok, [3], str(corpus_file), total, seq_len=100, batch_size=8, progress=False)
    assert _close(many[3], one[3], rtol=1e-5)


def test_one_pass_stops_after_highest_layer(llama, tok, corpus_file):
    calls = {i: 0 for i in range(4)}
    handles = [
        llama.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i in range(4)
    ]
    head = {"n": 0}
    handles.append(llama.lm_head.register_forward_pre_hook(lambda m, a: head.__setitem__("n", head["n"] + 1)))
    try:
        c0, _ = compute_c0(
            llama, tok, [1, 0], str(corpus_file), 300, seq_len=32, batch_size=4, progress=False
        )
    finally:
        for h in handles:
            h.remove()
    assert sorted(c0) == [0, 1]
    assert calls[0] == calls[1] == 3  # 300 tokens = 3 batches of up to 128; each batch runs once
    assert calls[2] == calls[3] == head["n"] == 0


# ------------------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_layout(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(cache_dir=cache, seq_len=32, batch_size=4, progress=False)
    c0, info = get_c0(llama, tok, [1, 2], str(corpus_file), 200, **kw)
    assert info.from_cache == {1: False, 2: False} and info.fingerprint
    again, info2 = get_c0(llama, tok, [2, 1], str(corpus_file), 200, **kw)
    assert info2.from_cache == {1: True, 2: True}
    for layer in (1, 2):
        assert torch.equal(again[layer], c0[layer])

    files = sorted((cache / "stats" / info.fingerprint).iterdir())
    assert [f.name.split("__")[0] for f in files] == [
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
    ]
    assert all("__corpus.txt-" in f.name for f in files)
    assert all(f.name.endswith("__200__float32__s32.safetensors") for f in files)
    raw = files[0].read_bytes()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK") and b"pickle" not in raw
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)
    loaded = safetensors.torch.load_file(str(files[0]))
    assert set(loaded) == {"mom2"} and loaded["mom2"].dtype == torch.float64
    with safetensors.safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["n_tokens"] == "200" and meta["module"] == "model.layers.1.mlp.down_proj"
    assert meta["dtype"] == "float32" and meta["fingerprint"] == info.fingerprint and meta["corpus"]

    # A different n_tokens is a different file.
    _, info3 = get_c0(llama, tok, [1], str(corpus_file), 150, **kw)
    assert info3.from_cache == {1: False}
    assert len(list((cache / "stats" / info.fingerprint).iterdir())) == 3


def test_cache_partial_layers_computed_in_one_pass(llama, tok, corpus_file, tmp_path):
    kw = dict(cache_dir=tmp_path, fingerprint="fp", seq_len=32, batch_size=4, progress=False)
    first, _ = get_c0(llama, tok, [1], str(corpus_file), 200, **kw)
    calls = []
    orig = stats.compute_c0

    def spy(model, tok_, layers, *a, **k):
        calls.append(list(layers))
        return orig(model, tok_, layers, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "compute_c0", spy)
        both, info = get_c0(llama, tok, [1, 3, 2], str(corpus_file), 200, **kw)
    assert calls == [[2, 3]]
    assert info.from_cache == {1: True, 2: False, 3: False}
    assert torch.equal(both[1], first[1]) and both[2].shape == (64, 64)
    # force recomputes everything
    _, info = get_c0(llama, tok, [1], str(corpus_file), 200, force=True, **kw)
    assert info.from_cache == {1: False}


def test_interrupted_write_leaves_no_file(llama, tok, corpus_file, tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    kw = dict(cache_dir=tmp_path, fingerprint="fp", seq_len=32, batch_size=4, progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        get_c0(llama, tok, [1], str(corpus_file), 100, **kw)
    folder = tmp_path / "stats" / "fp"
    assert list(folder.iterdir()) == []  # neither the final file nor the temp file
    monkeypatch.undo()
    _, info = get_c0(llama, tok, [1], str(corpus_file), 100, **kw)
    assert info.from_cache == {1: False}
    assert len(list(folder.glob("*.safetensors"))) == 1


def test_corrupt_cache_is_recomputed(llama, tok, corpus_file, tmp_path, caplog):
    kw = dict(cache_dir=tmp_path, fingerprint="fp", seq_len=32, batch_size=4, progress=False)
    c0, _ = get_c0(llama, tok, [1], str(corpus_file), 100, **kw)
    (path,) = (tmp_path / "stats" / "fp").glob("*.safetensors")
    path.write_bytes(b"\x00garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="pmet.stats"):
        again, info = get_c0(llama, tok, [1], str(corpus_file), 100, **kw)
    assert info.from_cache == {1: False}
    assert torch.equal(again[1], c0[1])
    assert any("unreadable" in r.message for r in caplog.records)
    _, info = get_c0(llama, tok, [1], str(corpus_file), 100, **kw)
    assert info.from_cache == {1: True}


def test_corpus_id_tracks_file_changes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one line\n")
    spec = parse_corpus(str(p))
    first = corpus.corpus_id(spec)
    assert first.startswith("a.txt-") and len(first.split("-")[-1]) == 12
    p.write_text("another, longer line\n")
    assert corpus.corpus_id(spec) != first
    assert corpus.corpus_id(CorpusSpec("self", "self"), seed=3) == "self-rows1-seed3"


# ------------------------------------------------------------------------------------------------ corpora


def test_corpus_errors(llama, tok, tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        parse_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no text files"):
        parse_corpus(str(empty))
    with pytest.raises(CorpusError, match="no text files"):
        compute_c0(llama, tok, [0], str(empty), 10, progress=False)
    (empty / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(CorpusError, match="empty"):
        compute_c0(llama, tok, [0], str(empty), 10, progress=False)
    (empty / "small.md").write_text("a few words\n")
    with pytest.raises(CorpusError, match="fewer than the 100000 requested"):
        compute_c0(llama, tok, [0], str(empty), 100_000, progress=False)
    msg = ""
    try:
        parse_corpus(str(tmp_path / "missing.txt"))
    except CorpusError as e:
        msg = str(e)
    assert "\n" not in msg and "missing.txt" in msg


def test_parse_corpus_kinds(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second\n")
    (folder / "sub" / "a.raw").write_text("first\n\nthird\n")
    (folder / "ignored.json").write_text("{}\n")
    spec = parse_corpus(str(folder))
    assert spec.kind == "file"
    assert list(iter_corpus_texts(spec, None, None)) == ["second\n", "first\n", "third\n"]
    assert parse_corpus("self") == CorpusSpec("self", "self")
    monkeypatch.setattr(corpus, "_hf_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pmet.corpus"):
        assert parse_corpus("auto") == CorpusSpec("self", "self")
    assert any("self" in r.message for r in caplog.records)
    with pytest.raises(CorpusError, match="datasets"):
        parse_corpus("hf:wikitext:wikitext-2-raw-v1")
    monkeypatch.setattr(corpus, "_hf_available", lambda: True)
    assert parse_corpus("hf:wikitext:wikitext-2-raw-v1") == CorpusSpec("hf", "wikitext:wikitext-2-raw-v1")
    assert corpus._split_hf("wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "train")


def test_self_corpus_exact_count_and_deterministic(llama, tok, monkeypatch):
    _, info = compute_c0(llama, tok, [1], "self", 300, seq_len=64, batch_size=4, seed=5, progress=False)
    assert info.n_tokens == 300 and info.corpus_kind == "self" and info.corpus == "self"
    monkeypatch.setattr(corpus, "SELF_NEW_TOKENS", 40)  # shorter generations for the repeats below
    c0, _ = compute_c0(llama, tok, [1], "self", 300, seq_len=64, batch_size=4, seed=5, progress=False)
    again, _ = compute_c0(llama, tok, [1], "self", 300, seq_len=64, batch_size=4, seed=5, progress=False)
    assert torch.equal(c0[1], again[1])
    other, _ = compute_c0(llama, tok, [1], "self", 300, seq_len=64, batch_size=4, seed=6, progress=False)
    assert not torch.equal(c0[1], other[1])
    # the texts do not depend on how many are sampled at a time
    rows1 = corpus._iter_self_texts(llama, tok, 5, rows=1)
    assert [next(rows1) for _ in range(6)] == list(itertools.islice(corpus._iter_self_texts(llama, tok, 5, 4), 6))
    # sampling must not disturb the caller's RNG stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter_corpus_texts("self", llama, tok, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_gpt2_conv1d(gpt2, tok, corpus_file):
    c0, info = compute_c0(gpt2, tok, [0, 1], str(corpus_file), 150, seq_len=32, batch_size=4, progress=False)
    assert c0[0].shape == c0[1].shape == (128, 128)  # 4 * n_embd
    assert info.modules == {0: "transformer.h.0.mlp.c_proj", 1: "transformer.h.1.mlp.c_proj"}
    texts = list(iter_corpus_texts(str(corpus_file), gpt2, tok))
    ids, mask = next(iter_batches(texts, tok, seq_len=32, batch_size=8, pad_id=tok.pad_token_id))
    keys = batch_keys(gpt2, ids, mask, ["transformer.h.1.mlp.c_proj"])["transformer.h.1.mlp.c_proj"]
    assert _close(c0[1], c0_from_keys(keys[:150]))
    attn, _ = compute_c0(gpt2, tok, [2], str(corpus_file), 50, component="attn", progress=False)
    assert attn[2].shape == (32, 32)


def test_wikitext_smoke(llama, tok, wiki_valid, tmp_path):
    c0, info = get_c0(
        llama, tok, [0, 3], str(wiki_valid), 2000, cache_dir=tmp_path, fingerprint="fp", progress=False
    )
    assert info.n_tokens == 2000 and info.corpus == str(wiki_valid.resolve())
    names = sorted(p.name for p in (tmp_path / "stats" / "fp").iterdir())
    assert names[0].startswith("model.layers.0.mlp.down_proj__wiki.valid.raw-")
    assert names[0].endswith("__2000__float32.safetensors")  # default seq_len: no suffix
    for c in c0.values():
        assert torch.isfinite(c).all() and torch.allclose(c, c.T)
        assert torch.linalg.eigvalsh(c).min() > -1e-8  # positive semi-definite
