"""Benchmark records for `pmet eval`: CounterFact (full ROME/MEMIT format and EasyEdit's split) and zsRE (MEND
format and KnowEdit's), with deterministic dev/test slices.

Slices: a record is in the dev slice when blake2b(str(case_id)) mod 20 == 0 (5% of CounterFact's global
case ids; for zsRE files, which have no ids, the record's index in the file), in the test slice otherwise. The
rule depends only on the id, so the dev records of every CounterFact file (EasyEdit's train/val/edit splits, the
full-format subset) are disjoint from the test records of every other file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RequestError
from ..requests import EditRequest, make_request, parse_record

DATASETS = ("counterfact", "zsre")
SLICES = ("dev", "test", "all")
DEV_MODULUS = 20


def in_dev_slice(case_id: int | str) -> bool:
    """The dev/test split rule (module docstring)."""
    return int.from_bytes(hashlib.blake2b(str(case_id).encode(), digest_size=8).digest(), "big") % DEV_MODULUS == 0


@dataclass(frozen=True)
class EvalRecord:
    """One benchmark case: the edit request plus what only evaluation needs."""

    request: EditRequest
    case_id: int | str
    dataset: str  # "counterfact" | "zsre"
    data_format: str  # "rome" (full CounterFact) | "easyedit" | "mend" | "knowedit"
    relation_id: str | None = None  # CounterFact relation, for consistency reference texts
    target_new_id: str | None = None  # Wikidata id of the new target, for consistency reference texts
    locality_answers: tuple[str, ...] = field(default_factory=tuple)  # zsRE: answer of each unrelated question
    portability: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (question, answer) that follow
    #                                                                           from the new fact (one hop)


def _format_of(obj: dict[str, Any], dataset: str) -> str:
    if dataset == "counterfact":
        if "requested_rewrite" in obj:
            return "rome"
        if "rephrase_prompt" in obj and "locality_prompt" in obj:
            return "easyedit"
    elif dataset == "zsre":
        if {"src", "loc", "loc_ans"} <= set(obj):
            return "mend"
        if "locality" in obj and "prompt" in obj:
            return "knowedit"
    raise RequestError("", None, None, f"not a {dataset} record (unrecognised keys {sorted(obj)[:8]})")


def _portability(obj: dict[str, Any], index: int, source: str) -> tuple[tuple[str, str], ...]:
    """One-hop questions whose answer follows from the new fact: EasyEdit's `portability` field, either
    {"New Question", "New Answer"} (its One Hop CounterFact and zsRE files) or {kind: [{"prompt",
    "ground_truth"}]} (KnowEdit); () when the record has none."""
    port = obj.get("portability")
    if port is None:
        return ()
    if isinstance(port, dict) and "New Question" in port:
        items = [port]
    elif isinstance(port, dict) and all(isinstance(v, list) for v in port.values()):
        items = [x for v in port.values() for x in v]
    else:
        raise RequestError(source, index, "portability", "expected {'New Question', 'New Answer'} or "
                           "{kind: [{'prompt', 'ground_truth'}]}")
    out = []
    for item in items:
        q = item.get("New Question", item.get("prompt")) if isinstance(item, dict) else None
        a = item.get("New Answer", item.get("ground_truth")) if isinstance(item, dict) else None
        while isinstance(a, list) and a:  # KnowEdit nests answers in lists
            a = a[0]
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise RequestError(source, index, "portability", "each item needs a question and an answer string")
        out.append((q.strip(), a.strip()))
    return tuple(out)


def _record(obj: dict[str, Any], index: int, case_id: int | str, dataset: str, source: str, zsre_target: str
            ) -> EvalRecord:
    """Record number `index` (1-based, as errors name it) of the file, with its `case_id`."""
    record = _request_record(obj, index, case_id, dataset, source, zsre_target)
    return dataclasses.replace(record, portability=_portability(obj, index, source))


def _request_record(obj: dict[str, Any], index: int, case_id: int | str, dataset: str, source: str,
                    zsre_target: str) -> EvalRecord:
    fmt = _format_of(obj, dataset)
    if fmt == "mend":
        return _mend_record(obj, index, case_id, source, zsre_target)
    request = parse_record(obj, source=source, record=index)
    if dataset == "counterfact" and request.target_true is None:
        raise RequestError(source, index, "target_true", "CounterFact evaluation needs the true target")
    rel = tid = None
    if fmt == "rome":
        rr = obj["requested_rewrite"]
        rel = rr.get("relation_id")
        tid = rr["target_new"].get("id") if isinstance(rr.get("target_new"), dict) else None
    answers: tuple[str, ...] = ()
    if dataset == "zsre":
        if request.neighborhood_target is None:
            raise RequestError(source, index, "locality", "zsRE evaluation needs an unrelated question with answer")
        answers = (request.neighborhood_target,) * len(request.neighborhood_prompts)
    return EvalRecord(request, case_id, dataset, fmt, relation_id=rel, target_new_id=tid, locality_answers=answers)


def _mend_record(obj: dict[str, Any], index: int, case_id: int | str, source: str, zsre_target: str) -> EvalRecord:
    """ROME/MEMIT dsets/zsre.py: prompt = src with the subject as '{}', new target = answers[0] ("alt" with
    --zsre-target alt, as EasyEdit does), paraphrase = rephrase, unrelated question = loc + "?" answered by
    loc_ans. Errors name the file's fields."""
    def text(key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise RequestError(source, index, key, "must be a non-empty string")
        return value

    answers = obj.get("answers")
    if zsre_target == "alt":
        target = text("alt", obj.get("alt"))
    elif not isinstance(answers, list) or not answers:
        raise RequestError(source, index, "answers", "must be a non-empty list of strings")
    else:
        target = text("answers[0]", answers[0])
    subject, src = obj.get("subject"), obj.get("src")
    if not isinstance(subject, str) or not isinstance(src, str) or subject not in src:
        raise RequestError(source, index, "subject", "must be a string that occurs in 'src'")
    loc_ans = text("loc_ans", obj.get("loc_ans"))
    request = make_request(subject, src.replace(subject, "{}", 1), target,
                           paraphrase_prompts=[text("rephrase", obj.get("rephrase"))],
                           neighborhood_prompts=[text("loc", obj.get("loc")) + "?"], case_id=case_id,
                           neighborhood_target=loc_ans, source=source, record=index)
    return EvalRecord(request, case_id, "zsre", "mend", locality_answers=(loc_ans,))


def load_eval_records(path: str | Path, dataset: str, *, n: int | None = None, slice_: str = "test",
                      zsre_target: str = "answers") -> list[EvalRecord]:
    """The first `n` records of `slice_` in the JSON list at `path` (file order; n None: all of them)."""
    if dataset not in DATASETS:
        raise RequestError(str(path), None, None, f"unknown dataset '{dataset}' (choose from {', '.join(DATASETS)})")
    if slice_ not in SLICES:
        raise RequestError(str(path), None, None, f"unknown slice '{slice_}' (choose from {', '.join(SLICES)})")
    if n is not None and n < 1:
        raise RequestError(str(path), None, None, f"asked for {n} records: give at least 1 (or all)")
    source = str(path)
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(source, None, None, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(source, None, None, f"not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise RequestError(source, None, None, "expected a JSON list of records")
    out: list[EvalRecord] = []
    for i, obj in enumerate(raw):
        if not isinstance(obj, dict):
            raise RequestError(source, i + 1, None, "record must be an object")
        cid = obj.get("case_id", i)  # without case ids: the 0-based position (ROME's zsRE convention)
        if slice_ != "all" and in_dev_slice(cid) != (slice_ == "dev"):
            continue
        try:
            out.append(_record(obj, i + 1, cid, dataset, source, zsre_target))
        except RequestError as e:
            if e.source == "":
                raise RequestError(source, i + 1, None, str(e.problem)) from None
            raise
        if n is not None and len(out) == n:
            break
    if not out:
        raise RequestError(source, None, None, f"no records in slice '{slice_}'")
    return out
