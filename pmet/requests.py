"""Edit requests: turns request files (native, CounterFact, EasyEdit, zsRE) into EditRequest objects.

Every bad input raises :class:`pmet.errors.RequestError`, whose one-line message names the file, the
1-based record number and the field (as it is spelt in the file).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmet.errors import ConfigError, RequestError

__all__ = ["EditRequest", "make_request", "parse_record", "load_requests", "save_requests", "SUFFIXES"]

#: File extensions that :func:`load_requests` reads.
SUFFIXES = (".jsonl", ".json", ".csv")

_LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")
_NATIVE_FIELDS = (
    "subject",
    "prompt",
    "target_new",
    "target_true",
    *_LIST_FIELDS,
    "case_id",
    "neighborhood_target",
)
# Keys that only the native format has: their presence means "native", whatever else is there.
_NATIVE_ONLY = frozenset({"target_true", "neighborhood_target", *_LIST_FIELDS})
_ZSRE_KEYS = frozenset({"src", "alt", "loc", "loc_ans"})
_EASYEDIT_KEYS = frozenset(
    {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "locality"}
)
_UNRECOGNISED = (
    "unrecognised record: expected fields subject, prompt, target_new (or a CounterFact/EasyEdit/zsRE record)"
)
log = logging.getLogger(__name__)
_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: the model should complete ``prompt`` (subject filled in) with target_new.

    ``prompt`` keeps its '{}'; paraphrase and generation prompts are stored filled (a '{}' in them was the
    subject); neighbourhood prompts are about other subjects and never contain '{}'."""

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    case_id: int | str | None = None
    neighborhood_target: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (safe for subjects that contain braces)."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict in the native format; :func:`parse_record` turns it back into an equal request."""
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "generation_prompts": list(self.generation_prompts),
            "neighborhood_target": self.neighborhood_target,
        }


# ----------------------------------------------------------------------------------------------------
# validation


class _Checker:
    """Validates values of one record, naming fields as they are spelt in the file (``names``)."""

    def __init__(self, source: str, record: int | str | None, names: Mapping[str, str] | None = None):
        self.source, self.record, self.names = source, record, names or {}

    def error(self, field: str | None, problem: str) -> RequestError:
        name = None if field is None else self.names.get(field, field)
        return RequestError(self.source, self.record, name, problem)

    def string(self, field: str, value: Any, *, required: bool) -> str | None:
        """A stripped non-empty string, or None when optional and absent."""
        if value is None:
            if required:
                raise self.error(field, "required field is missing")
            return None
        return self._nonempty(field, value)

    def _nonempty(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {_type_name(value)}")
        value = value.strip()
        if not value:
            raise self.error(field, "must not be empty")
        return value

    def prompts(self, field: str, value: Any) -> tuple[str, ...]:
        """A tuple of stripped non-empty strings; a single string counts as a one-element list."""
        if value is None:
            return ()
        if isinstance(value, str):
            return (self._nonempty(field, value),)
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"must be a list of strings, got {_type_name(value)}")
        name = self.names.get(field, field)
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(
                    self.source, self.record, f"{name}[{i}]", f"must be a string, got {_type_name(item)}"
                )
            item = item.strip()
            if not item:
                raise RequestError(self.source, self.record, f"{name}[{i}]", "must not be empty")
            out.append(item)
        return tuple(out)


    def filled(self, field: str, value: Any, subject: str) -> tuple[str, ...]:
        """`prompts`, with a '{}' in a prompt standing for the subject as in the `prompt` field (at most one)."""
        out = []
        for i, item in enumerate(self.prompts(field, value)):
            n = item.count("{}") - subject.count("{}") * (subject in item)
            if n > 1:
                raise self.item_error(field, i, value, f"must contain at most one '{{}}' (the subject), found {n}")
            out.append(item.replace("{}", subject, 1) if n == 1 else item)
        return tuple(out)

    def no_placeholder(self, field: str, value: Any) -> tuple[str, ...]:
        """`prompts` about other subjects than the request's: a '{}' there has no subject to stand for."""
        items = self.prompts(field, value)
        for i, item in enumerate(items):
            if "{}" in item:
                raise self.item_error(field, i, value, "is about another subject: write it out instead of '{}'")
        return items

    def item_error(self, field: str, i: int, value: Any, problem: str) -> RequestError:
        name = self.names.get(field, field)
        return RequestError(self.source, self.record, name if isinstance(value, str) else f"{name}[{i}]", problem)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _template(prompt: str, subject: str, check: _Checker) -> str:
    """Return ``prompt`` as a template with exactly one ``{}`` standing for the subject."""
    n = prompt.count("{}")
    # A prompt without "{}" (or whose only "{}" are the subject's own) has the subject written in.
    if n == 0 or (n == subject.count("{}") and subject in prompt):
        i = prompt.find(subject)
        if i < 0:
            raise check.error("prompt", f"subject '{subject}' not found in prompt")
        return prompt[:i] + "{}" + prompt[i + len(subject) :]
    if n > 1:
        raise check.error("prompt", f"must contain exactly one '{{}}' placeholder for the subject, found {n}")
    return prompt


def _required(values: Mapping[str, Any], field: str, check: _Checker) -> Any:
    value = values.get(field)
    if value is None:
        raise check.error(field, "required field is missing")
    return value


def _build(values: Mapping[str, Any], check: _Checker) -> EditRequest:
    subject = check._nonempty("subject", _required(values, "subject", check))
    prompt = check._nonempty("prompt", _required(values, "prompt", check))
    target_new = check._nonempty("target_new", _required(values, "target_new", check))
    case_id = values.get("case_id")
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (int, str))):
        raise check.error("case_id", f"must be an integer or a string, got {_type_name(case_id)}")
    return EditRequest(
        subject=subject,
        prompt=_template(prompt, subject, check),
        target_new=target_new,
        target_true=check.string("target_true", values.get("target_true"), required=False),
        paraphrase_prompts=check.filled("paraphrase_prompts", values.get("paraphrase_prompts"), subject),
        neighborhood_prompts=check.no_placeholder("neighborhood_prompts", values.get("neighborhood_prompts")),
        generation_prompts=check.filled("generation_prompts", values.get("generation_prompts"), subject),
        case_id=case_id,
        neighborhood_target=check.string(
            "neighborhood_target", values.get("neighborhood_target"), required=False
        ),
    )


def make_request(
    subject: str,
    prompt: str,
    target_new: str,
    target_true: str | None = None,
    paraphrase_prompts: str | Sequence[str] = (),
    neighborhood_prompts: str | Sequence[str] = (),
    generation_prompts: str | Sequence[str] = (),
    case_id: int | str | None = None,
    neighborhood_target: str | None = None,
    *,
    source: str = "<api>",
    record: int | str | None = None,
) -> EditRequest:
    """Validate and normalise one request.

    Strings are stripped of surrounding whitespace (the separator before a target is added at tokenization).
    A prompt without ``{}`` gets the first occurrence of the subject replaced by ``{}``. A single string is
    accepted where a list of prompts is expected. Raises RequestError naming the offending field.
    """
    values = {
        "subject": subject,
        "prompt": prompt,
        "target_new": target_new,
        "target_true": target_true,
        "paraphrase_prompts": paraphrase_prompts,
        "neighborhood_prompts": neighborhood_prompts,
        "generation_prompts": generation_prompts,
        "case_id": case_id,
        "neighborhood_target": neighborhood_target,
    }
    return _build(values, _Checker(source, record))


# ----------------------------------------------------------------------------------------------------
# record formats


def _first_string(value: Any) -> str | None:
    """The first string in a (possibly nested) list of answers, the string itself, or None."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value if isinstance(value, str) else None


def _answer(obj: Mapping[str, Any], key: str, names: dict[str, str], field: str, check: _Checker) -> Any:
    """``obj[key]`` when it is a string, else the first of a list of answers (naming ``key[0]``)."""
    value = obj.get(key)
    if isinstance(value, list):
        names[field] = f"{key}[0]"
        first = _first_string(value)
        if value and first is None:
            raise check.error(field, f"must be a string, got {_type_name(value[0])}")
        return first
    names[field] = key
    return value


def _parse_counterfact(obj: Mapping[str, Any], check: _Checker) -> EditRequest:
    """CounterFact as released with ROME/MEMIT: the edit is nested in ``requested_rewrite``."""
    rr = obj["requested_rewrite"]
    if not isinstance(rr, dict):
        raise RequestError(
            check.source, check.record, "requested_rewrite", f"must be an object, got {_type_name(rr)}"
        )
    names = {f: f"requested_rewrite.{f}" for f in ("subject", "prompt", "target_new", "target_true")}
    values: dict[str, Any] = {"subject": rr.get("subject"), "prompt": rr.get("prompt")}
    for field in ("target_new", "target_true"):
        target = rr.get(field)
        if isinstance(target, dict):
            names[field] += ".str"
            if "str" not in target:
                raise RequestError(check.source, check.record, names[field], "required field is missing")
            target = target["str"]
        values[field] = target
    for field in (*_LIST_FIELDS, "case_id"):
        values[field] = obj.get(field)
    check.names = names
    return _build(values, check)


def _parse_zsre(obj: Mapping[str, Any], check: _Checker) -> EditRequest:
    """zsRE as released with MEND/ROME (``src``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``)."""
    names = check.names = {
        "prompt": "src",
        "target_new": "alt",
        "paraphrase_prompts": "rephrase",
        "neighborhood_prompts": "loc",
        "neighborhood_target": "loc_ans",
    }
    answers = obj.get("answers")
    if answers is not None and not isinstance(answers, (list, str)):
        raise RequestError(
            check.source, check.record, "answers", f"must be a list, got {_type_name(answers)}"
        )
    values = {
        "subject": obj.get("subject"),
        "prompt": obj.get("src"),
        "target_new": obj.get("alt"),
        "target_true": _answer(obj, "answers", names, "target_true", check),
        "paraphrase_prompts": obj.get("rephrase"),
        "neighborhood_prompts": obj.get("loc"),
        "neighborhood_target": obj.get("loc_ans"),
        "case_id": obj.get("case_id"),
    }
    return _build(values, check)


def _parse_easyedit(obj: Mapping[str, Any], check: _Checker) -> EditRequest:
    """EasyEdit records: CounterFact (``locality_prompt``) and KnowEdit (``locality: {kind: [{prompt}]}``).

    Neighbourhood prompts are taken from ``locality_prompt`` and then from every ``locality`` group; since a
    request holds a single neighbourhood answer, prompts whose answer differs from the first one are dropped.
    """
    names = check.names = {"paraphrase_prompts": "rephrase_prompt"}
    values: dict[str, Any] = {
        "subject": obj.get("subject"),
        "prompt": obj.get("prompt"),
        "target_new": obj.get("target_new"),
        "target_true": _answer(obj, "ground_truth", names, "target_true", check),
        "paraphrase_prompts": obj.get("rephrase_prompt"),
        "case_id": obj.get("case_id"),
    }
    # (prompt, answer, field name) triples, in file order.
    pairs: list[tuple[Any, str | None, str]] = []
    if obj.get("locality_prompt") is not None:
        lp = obj["locality_prompt"]
        answer = _first_string(obj.get("locality_ground_truth"))
        for i, p in enumerate(lp if isinstance(lp, list) else [lp]):
            name = f"locality_prompt[{i}]" if isinstance(lp, list) else "locality_prompt"
            pairs.append((p, answer, name))
    locality = obj.get("locality")
    if locality is not None:
        if not isinstance(locality, dict):
            raise RequestError(
                check.source, check.record, "locality", f"must be an object, got {_type_name(locality)}"
            )
        for kind, items in locality.items():
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                where = f"locality.{kind}[{i}]"
                if not isinstance(item, dict) or "prompt" not in item:
                    raise RequestError(
                        check.source, check.record, where, "must be an object with a 'prompt' field"
                    )
                answer = _first_string(item.get("ground_truth"))
                prompts = item["prompt"]
                for j, p in enumerate(prompts if isinstance(prompts, list) else [prompts]):
                    name = f"{where}.prompt[{j}]" if isinstance(prompts, list) else f"{where}.prompt"
                    pairs.append((p, answer, name))
    neighborhood: list[str] = []
    target: str | None = None
    plain = _Checker(check.source, check.record)
    for k, (p, answer, name) in enumerate(pairs):
        p = plain._nonempty(name, p)
        if answer is not None:
            answer = answer.strip() or None
        if k == 0:
            target = answer
        if answer == target:
            neighborhood.append(p)
    values["neighborhood_prompts"] = neighborhood
    values["neighborhood_target"] = target
    return _build(values, check)


def _parse_native(obj: Mapping[str, Any], check: _Checker) -> EditRequest:
    return _build({f: obj.get(f) for f in _NATIVE_FIELDS}, check)


def parse_record(obj: Any, *, source: str, record: int | str | None) -> EditRequest:
    """Turn one record (native, CounterFact ROME/MEMIT, EasyEdit/KnowEdit or zsRE MEND) into a request.

    The format is recognised by its keys; errors name fields as they are spelt in the record.
    """
    check = _Checker(source, record)
    if not isinstance(obj, dict):
        raise RequestError(source, record, None, f"expected a JSON object, got {_type_name(obj)}")
    keys = obj.keys()
    native_only = not _NATIVE_ONLY.isdisjoint(keys)
    if "requested_rewrite" in obj:
        return _parse_counterfact(obj, check)
    if not native_only and not _ZSRE_KEYS.isdisjoint(keys):
        return _parse_zsre(obj, check)
    if not native_only and not _EASYEDIT_KEYS.isdisjoint(keys):
        return _parse_easyedit(obj, check)
    if native_only or not {"subject", "prompt", "target_new"}.isdisjoint(keys):
        return _parse_native(obj, check)
    raise RequestError(source, record, None, _UNRECOGNISED)


# ----------------------------------------------------------------------------------------------------
# files


def _read_text(path: Path, source: str) -> str:
    if path.suffix.lower() not in SUFFIXES:
        raise RequestError(
            source, None, None, f"unknown file type '{path.suffix}': expected one of {', '.join(SUFFIXES)}"
        )
    if not path.exists():
        raise RequestError(source, None, None, "file not found")
    if not path.is_file():
        raise RequestError(source, None, None, "not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(source, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RequestError(source, None, None, f"cannot read: {e.strerror or e}") from None


def _csv_list(value: str, check: _Checker, field: str) -> list[str]:
    """A CSV cell holding a JSON array of strings, or values separated by " | "."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("[") and value.endswith("]"):
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            items = None  # not JSON after all: a prompt that happens to be bracketed
        if items is not None:
            if not isinstance(items, list):
                raise check.error(field, "must be a JSON array of strings")
            return items
    return value.split(" | ")


def _csv_records(text: str, source: str, limit: int | None) -> list[EditRequest]:
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None:
        return []
    header = [h.strip() for h in header]
    out: list[EditRequest] = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if limit is not None and len(out) >= limit:
            break
        number = len(out) + 1
        check = _Checker(source, number)
        if len(row) > len(header):
            raise check.error(None, f"has {len(row)} values but the header has {len(header)} columns")
        obj: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=False):
            if name not in _NATIVE_FIELDS:
                continue
            if name in _LIST_FIELDS:
                obj[name] = _csv_list(cell, check, name)
            elif not cell.strip() and name not in ("subject", "prompt", "target_new"):
                continue  # an empty optional cell means "not given"
            elif name == "case_id" and _INT_RE.fullmatch(cell.strip()):
                obj[name] = int(cell.strip())
            else:
                obj[name] = cell
        for name in ("subject", "prompt", "target_new"):
            if name not in obj:
                raise check.error(
                    name, "required field is missing" + ("" if name in header else " (no such column)")
                )
        out.append(_parse_native(obj, check))
    return out


def load_requests(path: str | Path, *, limit: int | None = None, one_batch: bool = False) -> list[EditRequest]:
    """Read requests from a ``.jsonl``, ``.json`` or ``.csv`` file (the first ``limit`` of them if given).
    With ``one_batch`` (the requests are edited together), repeats are merged and conflicts refused
    (:func:`merge_duplicates`).

    Record numbers in error messages are 1-based: the line number for JSONL, the position for JSON and CSV.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    path = Path(path)
    source = str(path)
    text = _read_text(path, source)
    suffix = path.suffix.lower()
    out: list[EditRequest] = []
    numbers: list[int] = []
    if suffix == ".jsonl":
        # split on "\n" only: str.splitlines() would also break at U+2028 etc., which JSON strings may hold
        for number, line in enumerate(text.split("\n"), start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RequestError(source, number, None, f"malformed JSON: {e}") from None
            out.append(parse_record(obj, source=source, record=number))
            numbers.append(number)
    elif suffix == ".json":
        if not text.strip():
            raise RequestError(source, None, None, "empty file: no records")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(source, None, None, f"malformed JSON: {e}") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise RequestError(
                source, None, None, f"expected a list of records or one record object, got {_type_name(data)}"
            )
        for number, obj in enumerate(data[:limit] if limit is not None else data, start=1):
            out.append(parse_record(obj, source=source, record=number))
            numbers.append(number)
    else:
        out = _csv_records(text, source, limit)
        numbers = list(range(1, len(out) + 1))
    if not out:
        raise RequestError(source, None, None, "empty file: no records")
    return merge_duplicates(out, numbers, source) if one_batch else out


def merge_duplicates(requests: list[EditRequest], numbers: list[int], source: str) -> list[EditRequest]:
    """Drop repeats of one edit (same subject, prompt and target_new) with a warning; two different targets
    for the same subject and prompt are an error naming both records."""
    first: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    kept: list[EditRequest] = []
    repeats: list[tuple[int, int]] = []
    for number, r in zip(numbers, requests, strict=True):
        seen = first.get((r.subject, r.prompt))
        if seen is None:
            first[(r.subject, r.prompt)] = (number, r)
            kept.append(r)
        elif seen[1].target_new == r.target_new:
            repeats.append((number, seen[0]))
        else:
            raise RequestError(source, number, "target_new",
                               f"{r.target_new!r} conflicts with record {seen[0]}, which edits the same subject "
                               f"and prompt to {seen[1].target_new!r}")
    if repeats:
        shown = ", ".join(f"record {a} = record {b}" for a, b in repeats[:3]) + (", ..." if len(repeats) > 3 else "")
        log.warning("%s: %d duplicate request(s) merged (same subject, prompt and target_new: %s)",
                    source, len(repeats), shown)
    return kept


def check_target_lengths(requests: list[EditRequest], tok: Any, bound: int, source: str) -> None:
    """A target_new longer than `bound` tokens is an error (it would make every optimisation step crawl)."""
    from .prompts import target_ids

    for i, r in enumerate(requests, start=1):
        n = len(target_ids(tok, r.target_new))
        if n > bound:
            raise RequestError(source, f"{i} (subject {r.subject!r})", "target_new",
                               f"{n} tokens, more than the bound of {bound} (--max-target-tokens)")


def save_requests(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as native JSONL, atomically."""
    from .fileio import atomic_write

    lines = [json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in requests]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
