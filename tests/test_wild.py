"""The generation-based ("wild") protocol: the answer matcher, the three contexts, and evaluate_records with it."""

from __future__ import annotations

import pytest
import torch

from pmet.evaluation.evaluate import EvalOptions, evaluate_records, summarize
from pmet.evaluation.wild import context_ids, greedy, mentions, normalise, states

from .test_eval import _records
from .tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("answer, target, said, mentioned", [
    (" Paris, of course.", "Paris", True, True),  # leading space, punctuation
    ("PARIS is where", " paris", True, True),  # casing on both sides
    (" Parisian food", "Paris", False, False),  # a target that is a prefix of another word
    (" the piano keyboard and more", "piano keyboard", True, True),  # multi-token target, article dropped
    (" piano", "piano keyboard", False, False),  # only part of a multi-token target
    (" It is English.", "English", False, True),  # restated first: mentioned, not stated
    ("", "English", False, False),
    (" São Paulo!", "Sao Paulo", False, False),  # accents are kept: a different word
    (" SÃO PAULO", "São Paulo", True, True),
    (" New York-based", "New York", True, True),  # hyphen splits words
])
def test_answer_matcher(answer, target, said, mentioned):
    assert states(answer, target) is said
    assert mentions(answer, target) is mentioned


def test_normalise():
    assert normalise("  The  Eiffel-Tower, an icon!\n") == "eiffel tower icon"
    assert normalise("Ａｂｃ") == "abc"  # NFKC folds full-width letters


def test_contexts_and_chat_template():
    tok = tiny_tokenizer()
    bare = context_ids(tok, "The mother tongue of Danielle Darrieux is", "bare")
    assert bare == tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    qa = tok.decode(context_ids(tok, "The mother tongue of Danielle Darrieux is", "qa"))
    assert qa == "Complete the sentence with the correct fact.\nThe mother tongue of Danielle Darrieux is"
    question = tok.decode(context_ids(tok, "What did Danielle Darrieux speak?", "qa"))
    assert question == "Answer the question in a few words.\nQuestion: What did Danielle Darrieux speak?\nAnswer:"
    assert context_ids(tok, "x is", "chat") is None  # no template, no chat context
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}" \
                        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    chat = context_ids(tok, "The mother tongue of Danielle Darrieux is", "chat")
    assert chat[0] == tok.convert_tokens_to_ids("<s>")  # the template's special tokens are tokens, not text
    assert tok.decode(chat) == ("<s>user: Complete the sentence with the correct fact, in a few words: The mother "
                                "tongue of Danielle Darrieux is ...</s><s>assistant:")


def test_greedy_is_the_argmax_continuation():
    """Batched greedy answers equal a hand-rolled argmax loop over full forwards, one prompt at a time."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = [tok(p)["input_ids"] for p in ("The mother tongue of", "A", "Toko Yasuda plays the guitar and")]
    got = greedy(model, tok, prompts, max_new_tokens=5, batch_size=2)
    for p, answer in zip(prompts, got, strict=True):
        ids = list(p)
        for _ in range(5):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert answer == tok.decode(ids[len(p):], skip_special_tokens=True)


@pytest.mark.parametrize("dataset", ["counterfact", "zsre"])
def test_evaluate_records_wild(dataset):
    """Every prompt answered in every context; per-record values follow the matcher on the stored answers; the
    summary holds the bare context as wild_* and every context under wild_by_context."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} Reply:"
    recs = _records(dataset)
    res = evaluate_records(model, tok, recs, EvalOptions(generation=False, wild=True, wild_tokens=4))
    for rec, r in zip(recs, res, strict=True):
        assert set(r["wild"]) == {"bare", "qa", "chat"}
        bare = r["wild"]["bare"]
        n_prompts = 1 + len(rec.request.paraphrase_prompts) + len(rec.request.neighborhood_prompts)
        assert len(bare) == n_prompts
        rewrite = next(a["answer"] for a in bare if a["group"] == "rewrite")
        assert r["metrics"]["wild_efficacy"] == [float(states(rewrite, rec.request.target_new))]
        neigh = [a["answer"] for a in bare if a["group"] == "neighborhood"]
        assert r["metrics"]["wild_specificity"] == [float(not states(a, rec.request.target_new)) for a in neigh]
        assert r["metrics"]["wild@qa:efficacy_mentions"] == [float(mentions(
            next(a["answer"] for a in r["wild"]["qa"] if a["group"] == "rewrite"), rec.request.target_new))]
    s = summarize(res)
    assert set(s["wild_by_context"]) == {"bare", "qa", "chat"}
    assert s["wild_by_context"]["bare"]["efficacy"] == s["wild_efficacy"]
    assert {"efficacy", "generalization", "specificity", "specificity_true", "efficacy_mentions"} <= set(
        s["wild_by_context"]["chat"])
    assert not any(k.startswith("wild@") for k in s)


def test_portability_teacher_forced_and_wild():
    """One-hop questions are scored like zsRE answers (token accuracy) and answered freely; an answer is judged
    against the one-hop answer, not target_new."""
    import dataclasses

    from pmet.evaluation.scoring import encode_pair, score_rows

    model, tok = tiny_model("llama"), tiny_tokenizer()
    recs = [dataclasses.replace(r, portability=(("Which language do Parisians speak?", "the cat"),))
            for r in _records()]
    res = evaluate_records(model, tok, recs, EvalOptions(generation=False, wild=True, wild_tokens=3))
    want = score_rows(model, tok, [encode_pair(tok, "Which language do Parisians speak?", "the cat")])
    for r in res:
        assert r["metrics"]["portability"] == [float(h) for h in want.hits[0]]
        answer = next(a["answer"] for a in r["wild"]["bare"] if a["group"] == "portability")
        assert r["metrics"]["wild_portability"] == [float(states(answer, "the cat"))]
    s = summarize(res)
    assert s["portability"]["n"] == 2 and "portability" in s["wild_by_context"]["qa"]
