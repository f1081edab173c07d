"""Tests of pmet.requests: every supported file format on real records, and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pmet.errors import ConfigError, RequestError
from pmet.requests import EditRequest, load_requests, make_request, parse_record, save_requests

ROME = "counterfact_rome_subsets/multi_counterfact-50.json"
ROME_SUBSET = "counterfact_rome_subsets/counterfact_rome_format_subset.json"
EASYEDIT = ("counterfact-train.json", "counterfact-edit.json", "counterfact-val.json")
ZSRE_MEND = "zsre/zsre_mend_eval_portability_gpt4.json"
KNOWEDIT = "zsre/ZsRE-test-all.json"


def _raw(data_dir: Path, name: str) -> list[dict]:
    return json.loads((data_dir / name).read_text(encoding="utf-8"))


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


NATIVE = {
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of {} is",
    "target_new": "English",
    "target_true": "French",
    "paraphrase_prompts": ["Danielle Darrieux, a native"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
}


# ----------------------------------------------------------------------------------------------------
# real data, one test per format


def test_counterfact_rome_format(data_dir: Path) -> None:
    raw = _raw(data_dir, ROME)
    requests = load_requests(data_dir / ROME)
    assert len(requests) == len(raw) == 43
    r = requests[0]
    assert r == EditRequest(
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=tuple(raw[0]["paraphrase_prompts"]),
        neighborhood_prompts=tuple(raw[0]["neighborhood_prompts"]),
        generation_prompts=tuple(raw[0]["generation_prompts"]),
        case_id=0,
        neighborhood_target=None,
    )
    assert r.text == "The mother tongue of Danielle Darrieux is"
    for req, rec in zip(requests, raw, strict=True):
        assert req.case_id == rec["case_id"]
        assert req.prompt == rec["requested_rewrite"]["prompt"]
        assert req.target_new == rec["requested_rewrite"]["target_new"]["str"]
        assert len(req.neighborhood_prompts) == 10 and len(req.paraphrase_prompts) == 2


def test_counterfact_text_matches_easyedit_prompt(data_dir: Path) -> None:
    """The ROME-format template filled with the subject is EasyEdit's prompt, for every shared case_id."""
    easy = {}
    for name in EASYEDIT:
        easy.update({r.case_id: r for r in load_requests(data_dir / "counterfact_easyedit" / name)})
    rome = load_requests(data_dir / ROME) + load_requests(data_dir / ROME_SUBSET)
    shared = [r for r in rome if r.case_id in easy]
    assert len(shared) > 1000
    for r in shared:
        e = easy[r.case_id]
        assert r.text == _raw_prompt(data_dir, r.case_id) == e.text
        assert (e.prompt, e.subject, e.target_new, e.target_true) == (
            r.prompt,
            r.subject,
            r.target_new,
            r.target_true,
        )
        assert e.neighborhood_prompts[0] in r.neighborhood_prompts
        assert e.neighborhood_target == r.target_true


_EASY_PROMPTS: dict[int, str] = {}


def _raw_prompt(data_dir: Path, case_id: int) -> str:
    """EasyEdit's own (subject filled in) prompt, straight from the files."""
    if not _EASY_PROMPTS:
        for name in EASYEDIT:
            for rec in _raw(data_dir, f"counterfact_easyedit/{name}"):
                _EASY_PROMPTS[rec["case_id"]] = rec["prompt"]
    return _EASY_PROMPTS[case_id]


def test_easyedit_counterfact(data_dir: Path) -> None:
    raw = _raw(data_dir, "counterfact_easyedit/counterfact-train.json")
    requests = load_requests(data_dir / "counterfact_easyedit/counterfact-train.json")
    assert len(requests) == len(raw)
    r, rec = requests[0], raw[0]
    assert r.case_id == 2 and r.subject == "Toko Yasuda"
    assert r.prompt == "{}, the" and r.text == rec["prompt"]
    assert (r.target_new, r.target_true) == ("piano", "guitar")
    assert r.paraphrase_prompts == (rec["rephrase_prompt"],)
    assert r.neighborhood_prompts == (rec["locality_prompt"],)
    assert r.neighborhood_target == rec["locality_ground_truth"]
    assert all(req.prompt.count("{}") == 1 for req in requests)


def test_zsre_mend_format(data_dir: Path) -> None:
    raw = _raw(data_dir, ZSRE_MEND)
    requests = load_requests(data_dir / ZSRE_MEND)
    assert len(requests) == len(raw) == 1037
    r, rec = requests[0], raw[0]
    assert r.subject == "IAAF Combined Events Challenge"
    assert r.prompt == "When was the inception of {}?"
    assert r.text == rec["src"]
    assert (r.target_new, r.target_true) == ("2006", "1998")
    assert r.paraphrase_prompts == (rec["rephrase"],)
    assert r.neighborhood_prompts == ("nq question: what is the name of the last episode of spongebob",)
    assert r.neighborhood_target == "The String"
    # targets that the file stores with a leading space come out stripped
    padded = [i for i, rec in enumerate(raw) if rec["alt"] != rec["alt"].strip()]
    assert padded
    for i in padded:
        assert requests[i].target_new == raw[i]["alt"].strip()
    for req, rec in zip(requests, raw, strict=True):
        assert req.text == rec["src"] and req.target_true == rec["answers"][0]


def test_knowedit_zsre_format(data_dir: Path) -> None:
    raw = _raw(data_dir, KNOWEDIT)
    requests = load_requests(data_dir / KNOWEDIT)
    assert len(requests) == len(raw) == 1301
    r = requests[0]
    assert r.subject == "Epaspidoceras"
    assert r.prompt == "Which family does {} belong to?"
    assert (r.target_new, r.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert r.paraphrase_prompts == ("What family are Epaspidoceras?",)
    assert r.neighborhood_prompts == ("The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank")
    assert r.neighborhood_target == "genus"
    # some subjects are stored with a trailing space: stripped, and still located in the prompt
    i = next(i for i, rec in enumerate(raw) if rec["subject"] != rec["subject"].strip())
    assert requests[i].subject == raw[i]["subject"].strip()
    assert requests[i].text == raw[i]["prompt"]


def test_limit(data_dir: Path) -> None:
    assert len(load_requests(data_dir / ROME, limit=5)) == 5
    assert load_requests(data_dir / ROME, limit=5) == load_requests(data_dir / ROME)[:5]
    with pytest.raises(ConfigError):
        load_requests(data_dir / ROME, limit=0)


def test_many_records_load_fast(tmp_path: Path) -> None:
    import time

    records = [dict(NATIVE, case_id=i, subject=f"Person {i}") for i in range(20_000)]
    path = _write_jsonl(tmp_path / "big.jsonl", records)
    start = time.perf_counter()
    requests = load_requests(path)
    assert len(requests) == 20_000 and requests[-1].subject == "Person 19999"
    assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------------------
# make_request normalisation


def test_make_request_locates_subject_and_strips() -> None:
    r = make_request(
        "Paris", "Paris is the capital of", " France ", " Germany", paraphrase_prompts="Paris, capital of"
    )
    assert r.prompt == "{} is the capital of"
    assert (r.target_new, r.target_true) == ("France", "Germany")
    assert r.paraphrase_prompts == ("Paris, capital of",)
    assert r.text == "Paris is the capital of"


def test_make_request_first_occurrence_only() -> None:
    r = make_request("Bo", "Bo and Bo play", "golf")
    assert r.prompt == "{} and Bo play"


def test_text_with_braces_in_subject() -> None:
    r = make_request("{weird} name {}", "The language of {} is", "French")
    assert r.text == "The language of {weird} name {} is"
    written_in = make_request("{weird} name {}", "The language of {weird} name {} is", "French")
    assert written_in.prompt == "The language of {} is"
    other_braces = make_request("Ann", "In the {x} set, {} speaks", "Dutch")
    assert other_braces.text == "In the {x} set, Ann speaks"


@pytest.mark.parametrize(
    ("kwargs", "field", "problem"),
    [
        ({"subject": "  "}, "subject", "must not be empty"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"target_new": " "}, "target_new", "must not be empty"),
        ({"target_new": None}, "target_new", "required field is missing"),
        ({"target_new": 3}, "target_new", "must be a string"),
        ({"prompt": "{} and {} are"}, "prompt", "exactly one '{}'"),
        ({"prompt": "The capital of France is"}, "prompt", "subject 'Paris' not found in prompt"),
        ({"paraphrase_prompts": ["ok", ""]}, "paraphrase_prompts[1]", "must not be empty"),
        ({"neighborhood_prompts": ["ok", 5]}, "neighborhood_prompts[1]", "must be a string"),
        ({"neighborhood_prompts": 5}, "neighborhood_prompts", "must be a list of strings"),
        ({"case_id": 1.5}, "case_id", "must be an integer or a string"),
    ],
)
def test_make_request_errors(kwargs: dict, field: str, problem: str) -> None:
    args = {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "France"} | kwargs
    with pytest.raises(RequestError) as info:
        make_request(**args, source="x.jsonl", record=7)
    err = info.value
    assert (err.source, err.record, err.field) == ("x.jsonl", 7, field)
    assert problem in err.problem
    assert str(err).startswith(f"x.jsonl: record 7: field '{field}': ")


# ----------------------------------------------------------------------------------------------------
# parse_record: detection and errors named as in the file


def test_round_trip_native(data_dir: Path) -> None:
    requests = load_requests(data_dir / ROME, limit=3) + load_requests(data_dir / KNOWEDIT, limit=3)
    requests.append(make_request(**NATIVE, case_id="abc", neighborhood_target="French"))
    for r in requests:
        d = r.to_dict()
        assert isinstance(d["paraphrase_prompts"], list)
        again = parse_record(json.loads(json.dumps(d)), source="s", record=1)
        assert again == r


def test_save_and_load(tmp_path: Path, data_dir: Path) -> None:
    requests = load_requests(data_dir / ROME)
    path = tmp_path / "sub" / "out.jsonl"
    save_requests(requests, path)
    assert load_requests(path) == requests
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temporary file left behind
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(requests)


def test_save_keeps_unicode_line_separators(tmp_path: Path) -> None:
    r = make_request("A\u2028B", "{} plays", "chess")
    path = tmp_path / "u.jsonl"
    save_requests([r, r], path)
    assert load_requests(path) == [r, r]


def test_unrecognised_record() -> None:
    with pytest.raises(RequestError) as info:
        parse_record({"question": "x", "answer": "y"}, source="f.json", record=3)
    assert info.value.record == 3 and info.value.field is None
    assert "unrecognised record" in str(info.value)
    with pytest.raises(RequestError, match="expected a JSON object"):
        parse_record(["a"], source="f.json", record=1)


def test_native_missing_field() -> None:
    rec = {k: v for k, v in NATIVE.items() if k != "target_new"}
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="f.jsonl", record=2)
    assert info.value.field == "target_new" and "missing" in info.value.problem


def test_counterfact_error_names_nested_field(data_dir: Path) -> None:
    rec = _raw(data_dir, ROME)[0]
    rec["requested_rewrite"]["target_new"] = {"id": "Q1860"}
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=1)
    assert info.value.field == "requested_rewrite.target_new.str"
    rec["requested_rewrite"]["target_new"] = {"str": "  ", "id": "Q1860"}
    with pytest.raises(RequestError, match="requested_rewrite.target_new.str"):
        parse_record(rec, source="cf.json", record=1)
    rec["requested_rewrite"]["target_new"] = {"str": "English"}
    rec["requested_rewrite"]["prompt"] = "The mother tongue of somebody is"
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=1)
    assert info.value.field == "requested_rewrite.prompt"
    assert info.value.problem == "subject 'Danielle Darrieux' not found in prompt"


def test_zsre_error_names_file_fields(data_dir: Path) -> None:
    rec = _raw(data_dir, ZSRE_MEND)[0]
    bad = dict(rec, alt="")
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "alt"
    bad = dict(rec, src="When was it founded?")
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "src" and "not found in prompt" in info.value.problem
    bad = dict(rec, answers=[7])
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "answers[0]"
    no_answers = parse_record(dict(rec, answers=[]), source="z.json", record=1)
    assert no_answers.target_true is None


def test_easyedit_error_names_file_fields(data_dir: Path) -> None:
    rec = _raw(data_dir, "counterfact_easyedit/counterfact-val.json")[0]
    with pytest.raises(RequestError) as info:
        parse_record(dict(rec, rephrase_prompt=""), source="e.json", record=4)
    assert info.value.field == "rephrase_prompt"
    rec = _raw(data_dir, KNOWEDIT)[0]
    rec["locality"]["Relation_Specificity"][1]["prompt"] = ""
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="k.json", record=1)
    assert info.value.field == "locality.Relation_Specificity[1].prompt"


def test_easyedit_locality_keeps_only_prompts_with_the_first_answer(data_dir: Path) -> None:
    rec = _raw(data_dir, KNOWEDIT)[0]
    rec["locality"]["Relation_Specificity"].append(
        {"prompt": "Epaspidoceras is a", "ground_truth": ["fossil"]}
    )
    r = parse_record(rec, source="k.json", record=1)
    assert r.neighborhood_target == "genus"
    assert "Epaspidoceras is a" not in r.neighborhood_prompts and len(r.neighborhood_prompts) == 2


# ----------------------------------------------------------------------------------------------------
# files


def test_malformed_jsonl_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(NATIVE) + "\n\n" + '{"subject": "x",\n' + json.dumps(NATIVE) + "\n")
    with pytest.raises(RequestError) as info:
        load_requests(path)
    err = info.value
    assert (err.source, err.record, err.field) == (str(path), 3, None)
    assert err.problem.startswith("malformed JSON: ")
    assert str(err).startswith(f"{path}: record 3: malformed JSON")


def test_jsonl_record_numbers_are_line_numbers(tmp_path: Path) -> None:
    bad = dict(NATIVE, target_new="")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(NATIVE) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RequestError) as info:
        load_requests(path)
    assert info.value.record == 3 and info.value.field == "target_new"


def test_json_single_object_and_positions(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(NATIVE))
    assert load_requests(one) == [make_request(**NATIVE)]
    many = tmp_path / "many.json"
    many.write_text(json.dumps([NATIVE, NATIVE, dict(NATIVE, prompt="{} {}")]))
    with pytest.raises(RequestError) as info:
        load_requests(many)
    assert info.value.record == 3 and info.value.field == "prompt"
    broken = tmp_path / "broken.json"
    broken.write_text("[{]")
    with pytest.raises(RequestError, match="malformed JSON") as info:
        load_requests(broken)
    assert info.value.record is None


@pytest.mark.parametrize("name", ["r.txt", "r.yaml", "r"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(json.dumps(NATIVE))
    with pytest.raises(RequestError, match="unknown file type") as info:
        load_requests(path)
    assert info.value.record is None


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="file not found") as info:
        load_requests(tmp_path / "nope.jsonl")
    assert info.value.record is None
    for name, text in [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e2.json", ""), ("e.csv", "subject,prompt\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(RequestError, match="no records") as info:
            load_requests(tmp_path / name)
        assert info.value.record is None


def test_csv_lists_pipe_and_json(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(
        "case_id,subject,prompt,target_new,target_true,paraphrase_prompts,neighborhood_prompts\n"
        '7,Paris,{} is the capital of,France,,"Paris, capital of | Paris|Lyon is in",'
        '"[""Berlin is the capital of""]"\n'
        'x1,Rome,Rome is the capital of, Italy,Spain,"[""a | b""]",\n',
        encoding="utf-8",
    )
    a, b = load_requests(path)
    assert a == EditRequest(
        subject="Paris",
        prompt="{} is the capital of",
        target_new="France",
        target_true=None,
        paraphrase_prompts=("Paris, capital of", "Paris|Lyon is in"),
        neighborhood_prompts=("Berlin is the capital of",),
        case_id=7,
    )
    assert b.case_id == "x1" and b.prompt == "{} is the capital of" and b.target_new == "Italy"
    assert b.paraphrase_prompts == ("a | b",) and b.neighborhood_prompts == ()


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("subject,prompt,target_new\nParis,{} is in,France\nRome,Milan is in,Italy\n")
    with pytest.raises(RequestError) as info:
        load_requests(path)
    assert (info.value.record, info.value.field) == (2, "prompt")
    path.write_text("subject,prompt\nParis,{} is in\n")
    with pytest.raises(RequestError, match="no such column") as info:
        load_requests(path)
    assert (info.value.record, info.value.field) == (1, "target_new")


def test_save_is_atomic_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    save_requests([make_request(**NATIVE)], path)
    before = path.read_text()

    class Boom(EditRequest):
        def to_dict(self) -> dict:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_requests([make_request(**NATIVE), Boom("a", "{}", "b")], path)
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_example_counterfacts_file() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "counterfacts.jsonl"
    requests = load_requests(path)
    assert len(requests) == 10
    assert len({r.case_id for r in requests}) == 10
    for r in requests:
        assert r.target_true and r.target_true != r.target_new
        assert len(r.paraphrase_prompts) == 2 and all(r.subject in p for p in r.paraphrase_prompts)
        assert 2 <= len(r.neighborhood_prompts) <= 3
        assert not any(r.subject in p for p in r.neighborhood_prompts)
