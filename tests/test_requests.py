"""Tests of pmet.requests: every supported file format on small in-tree fixtures (tests/fixtures/), a few
whole-file checks on the real benchmark files when they are present, and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pmet.errors import ConfigError, RequestError
from pmet.requests import EditRequest, load_requests, make_request, parse_record, save_requests

# Hand-made records with the keys, nesting and types of the real files, invented content.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROME_FX = FIXTURES / "counterfact_rome.json"  # CounterFact as released with ROME/MEMIT
EASYEDIT_FX = FIXTURES / "counterfact_easyedit.json"  # EasyEdit's CounterFact split (case ids 30, 41 shared)
ZSRE_MEND_FX = FIXTURES / "zsre_mend.json"  # zsRE, MEND/ROME format with EasyEdit's portability field
KNOWEDIT_FX = FIXTURES / "zsre_knowedit.json"  # KnowEdit's zsRE
MIXED_JSONL_FX = FIXTURES / "requests_mixed.jsonl"  # one record per format, line 2 blank
CSV_FX = FIXTURES / "requests.csv"  # UTF-8 with a byte order mark, padded header, extra column, blank row

# The real benchmark files (under the data_dir fixture), for the whole-file checks only.
ROME = "counterfact_rome_subsets/multi_counterfact-50.json"
ROME_SUBSET = "counterfact_rome_subsets/counterfact_rome_format_subset.json"
EASYEDIT = ("counterfact-train.json", "counterfact-edit.json", "counterfact-val.json")
ZSRE_MEND = "zsre/zsre_mend_eval_portability_gpt4.json"
KNOWEDIT = "zsre/ZsRE-test-all.json"


def _fixture(path: Path) -> list[dict]:
    """A fresh copy of a fixture's raw records (tests may modify it)."""
    return json.loads(path.read_text(encoding="utf-8"))


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
# one test per format, on the fixtures


def test_counterfact_rome_format() -> None:
    requests = load_requests(ROME_FX)
    assert len(requests) == 3
    assert requests[0] == EditRequest(
        subject="Marisol Quenteiro",
        prompt="The mother tongue of {} is",
        target_new="Dutch",
        target_true="Portuguese",
        paraphrase_prompts=(
            "The ferry left at dawn. Marisol Quenteiro, a native",
            "Rain fell all week in the valley. Marisol Quenteiro spoke the language",
        ),
        neighborhood_prompts=(
            "The mother tongue of Teodoro Alvim is",
            "Inês Carvalhedo is a native speaker of",
            "The native language of Rui Pestanha is",
        ),
        # kept as in the file, repeat included; attribute_prompts are not part of a request
        generation_prompts=(
            "Marisol Quenteiro's mother tongue is",
            "Marisol Quenteiro was born in",
            "Marisol Quenteiro's mother tongue is",
        ),
        case_id=7,
        neighborhood_target=None,
    )
    assert [r.case_id for r in requests] == [7, 30, 41]
    assert [r.prompt for r in requests] == ["The mother tongue of {} is", "{}, which is located in", "{} plays the"]
    assert [r.text for r in requests] == [
        "The mother tongue of Marisol Quenteiro is",
        "Vellmore Abbey, which is located in",
        "Keiko Amarisu plays the",
    ]
    assert [(r.target_new, r.target_true) for r in requests] == [
        ("Dutch", "Portuguese"),
        ("Norway", "Scotland"),
        ("violin", "trumpet"),
    ]
    assert requests[2].neighborhood_prompts == (
        "Dizzy Hallorann plays the",
        "Marco Trevisanti performs on the",
        "Lou Kessendorf plays the",
    )


def test_easyedit_counterfact() -> None:
    requests = load_requests(EASYEDIT_FX)
    assert requests[0] == EditRequest(
        subject="Harnfield Motor Works",
        prompt="The headquarters of {} is in",  # the file has the subject written in: located and replaced
        target_new="Lisbon",
        target_true="Coventry",
        paraphrase_prompts=("A storm closed the pass. Harnfield Motor Works's headquarters are in",),
        neighborhood_prompts=("The headquarters of Brackley Looms is in",),
        case_id=12,
        neighborhood_target="Coventry",
    )
    assert requests[0].text == "The headquarters of Harnfield Motor Works is in"
    assert [r.case_id for r in requests] == [12, 30, 41]
    assert [r.prompt for r in requests] == ["The headquarters of {} is in", "{}, which is located in", "{} plays the"]
    assert [(r.target_new, r.target_true, r.neighborhood_target) for r in requests] == [
        ("Lisbon", "Coventry", "Coventry"),
        ("Norway", "Scotland", "Scotland"),
        ("violin", "trumpet", "trumpet"),
    ]
    assert requests[2].paraphrase_prompts == ("Keiko Amarisu is incredible at",)
    assert requests[2].neighborhood_prompts == ("Dizzy Hallorann plays the",)


def test_counterfact_rome_and_easyedit_fixtures_agree() -> None:
    """The two CounterFact formats give the same edit for a shared case id (what the real files show below)."""
    rome = {r.case_id: r for r in load_requests(ROME_FX)}
    easy = {r.case_id: r for r in load_requests(EASYEDIT_FX)}
    assert sorted(rome.keys() & easy.keys()) == [30, 41]
    for case_id in (30, 41):
        r, e = rome[case_id], easy[case_id]
        assert (e.prompt, e.subject, e.target_new, e.target_true) == (r.prompt, r.subject, r.target_new, r.target_true)
        assert e.neighborhood_prompts[0] in r.neighborhood_prompts
        assert e.neighborhood_target == r.target_true
    assert rome[30].text == easy[30].text == "Vellmore Abbey, which is located in"


def test_zsre_mend_format() -> None:
    requests = load_requests(ZSRE_MEND_FX)
    assert len(requests) == 3
    # pmet edit follows EasyEdit: the new target is `alt`, the true one answers[0]; pred, cond and portability
    # are not read; the unrelated question is `loc` as it stands (pmet eval adds MEMIT's "?", see test_eval_data)
    assert requests[0] == EditRequest(
        subject="Pelloria Cup",
        prompt="When was the inception of {}?",
        target_new="2004",
        target_true="1987",
        paraphrase_prompts=("When was the Pelloria Cup first held?",),
        neighborhood_prompts=("nq question: who painted the ceiling of the old harbour library",),
        case_id=None,
        neighborhood_target="Marta Evenholt",
    )
    # alt is stored as " Sardinian Sea": stripped; of several answers the first is the true target
    assert (requests[1].target_new, requests[1].target_true) == ("Sardinian Sea", "Tyrrhenian Basin")
    assert requests[1].prompt == "Which body of water is {} next to?"
    assert requests[1].text == "Which body of water is Capo Veltrano next to?"
    assert requests[1].neighborhood_target == "1968"
    assert (requests[2].subject, requests[2].prompt) == ("Quillmoth", "Which family does {} belong to?")
    assert (requests[2].target_new, requests[2].target_true) == ("Pieridae", "Erebidae")


def test_knowedit_zsre_format() -> None:
    requests = load_requests(KNOWEDIT_FX)
    assert len(requests) == 3
    assert requests[0] == EditRequest(
        subject="Brennoceras",
        prompt="Which family does {} belong to?",
        target_new="Tortricidae",
        target_true="Perisphinctidae",
        paraphrase_prompts=("What family are Brennoceras?",),
        neighborhood_prompts=("The taxon rank of Brennoceras is", "Brennoceras taxon rank"),
        case_id=None,
        neighborhood_target="genus",
    )
    # subject stored as "Harrowgate Vale " and target as " Saint Odran": stripped, and the subject still located
    r = requests[1]
    assert r.subject == "Harrowgate Vale"
    assert r.prompt == "What is {} named after?" and r.text == "What is Harrowgate Vale named after?"
    assert (r.target_new, r.target_true) == ("Saint Odran", "River Harrow")  # first of two ground truths
    assert r.neighborhood_prompts == ("The country of Harrowgate Vale is", "Harrowgate Vale country")
    assert r.neighborhood_target == "England"
    assert requests[2].prompt == "Who is {}'s father?"
    assert (requests[2].target_new, requests[2].target_true) == ("Petr Maran", "Karel Maran")
    assert requests[2].neighborhood_target == "glassblower"


def test_jsonl_mixes_formats_line_by_line(tmp_path: Path) -> None:
    native, rome, zsre, easy, knowedit = load_requests(MIXED_JSONL_FX)
    assert native == EditRequest(
        subject="Orla Brinsley",
        prompt="{} works as a",  # written as "Orla Brinsley works as a"
        target_new="lighthouse keeper",
        target_true="cartographer",
        paraphrase_prompts=("Orla Brinsley's job is",),
        neighborhood_prompts=("Tamsin Hollow works as a",),
        case_id="n1",
        neighborhood_target="cartographer",
    )
    assert rome == EditRequest(
        subject="Evert Solheim",
        prompt="{} was born in",
        target_new="Tallinn",
        target_true="Bergen",
        paraphrase_prompts=("Evert Solheim's birthplace is",),
        neighborhood_prompts=("Halvard Rue was born in",),
        generation_prompts=("Evert Solheim grew up in",),
        case_id=88,
    )
    assert zsre == EditRequest(
        subject="Marrow Fen",
        prompt="In which county is {}?",
        target_new="Suffolk",
        target_true="Lincolnshire",
        paraphrase_prompts=("Marrow Fen lies in which county?",),
        neighborhood_prompts=("nq question: who built the first tide mill on the estuary",),
        neighborhood_target="Edwin Pask",
    )
    assert easy == EditRequest(
        subject="Tobiah Lenk",
        prompt="{} is a citizen of",
        target_new="Chile",
        target_true="Austria",
        paraphrase_prompts=("Tobiah Lenk holds citizenship of",),
        neighborhood_prompts=("Wendelin Sauer is a citizen of",),
        case_id=301,
        neighborhood_target="Austria",
    )
    assert knowedit == EditRequest(
        subject="Corvenna",
        prompt="Which family does {} belong to?",
        target_new="Lycaenidae",
        target_true="Sphingidae",
        paraphrase_prompts=("What family are Corvenna?",),
        neighborhood_prompts=("The taxon rank of Corvenna is",),
        neighborhood_target="genus",
    )
    # a limit counts records, not lines (line 2 is blank)
    assert load_requests(MIXED_JSONL_FX, limit=2) == [native, rome]
    # errors name the line: the fifth record is on line 6
    lines = MIXED_JSONL_FX.read_text(encoding="utf-8").split("\n")
    bad = json.loads(lines[5])
    bad["locality"]["Relation_Specificity"][0]["prompt"] = " "
    lines[5] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(RequestError) as info:
        load_requests(path)
    assert (info.value.record, info.value.field) == (6, "locality.Relation_Specificity[0].prompt")
    assert info.value.problem == "must not be empty"


def test_csv_fixture(tmp_path: Path) -> None:
    a, b = load_requests(CSV_FX)
    assert a == EditRequest(
        subject="Orla Brinsley",
        prompt="{} works as a",
        target_new="lighthouse keeper",
        target_true="cartographer",
        paraphrase_prompts=("Orla Brinsley's job is", "Orla Brinsley, by trade, is a"),
        neighborhood_prompts=("Tamsin Hollow works as a",),
        case_id=3,  # the byte order mark before the header's first name is not part of it
        neighborhood_target="cartographer",
    )
    assert b == EditRequest(
        subject="Dane Ferrow, Jr.",
        prompt="The birthplace of {} is",
        target_new="Halvergate",
        target_true=None,  # empty cell
        paraphrase_prompts=("Dane Ferrow, Jr. was born in",),
        neighborhood_prompts=(),
        case_id="b-7",
    )
    assert load_requests(CSV_FX, limit=1) == [a]
    crlf = tmp_path / "crlf.csv"  # as a spreadsheet on Windows writes it
    crlf.write_bytes(CSV_FX.read_bytes().replace(b"\n", b"\r\n"))
    assert load_requests(crlf) == [a, b]


def test_limit(tmp_path: Path) -> None:
    assert [r.case_id for r in load_requests(ROME_FX, limit=2)] == [7, 30]
    assert load_requests(ROME_FX, limit=2) == load_requests(ROME_FX)[:2]
    assert [r.case_id for r in load_requests(ROME_FX, limit=10)] == [7, 30, 41]
    # records past the limit are not read at all
    raw = _fixture(ROME_FX)
    raw[2]["requested_rewrite"]["prompt"] = "Somebody plays the"
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert [r.case_id for r in load_requests(path, limit=2)] == [7, 30]
    with pytest.raises(RequestError) as info:
        load_requests(path)
    assert (info.value.record, info.value.field) == (3, "requested_rewrite.prompt")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            load_requests(ROME_FX, limit=bad)


def test_many_records_load_fast(tmp_path: Path) -> None:
    import time

    records = [dict(NATIVE, case_id=i, subject=f"Person {i}") for i in range(20_000)]
    path = _write_jsonl(tmp_path / "big.jsonl", records)
    start = time.perf_counter()
    requests = load_requests(path)
    assert len(requests) == 20_000 and requests[-1].subject == "Person 19999"
    assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------------------
# the real benchmark files (skipped without them): properties of whole files


@pytest.mark.parametrize(
    ("name", "count"),
    [
        (ROME, 43),
        (ROME_SUBSET, 1000),
        *zip((f"counterfact_easyedit/{n}" for n in EASYEDIT), (9993, 9836, 1917), strict=True),
        (ZSRE_MEND, 1037),
        (KNOWEDIT, 1301),
    ],
)
def test_real_file_loads_every_record(data_dir: Path, name: str, count: int) -> None:
    """Every record of each real file (as SOURCES.md counts them) is read, with the subject filled in exactly as
    the file has it."""
    raw = _raw(data_dir, name)
    requests = load_requests(data_dir / name)
    assert len(requests) == len(raw) == count
    for req, rec in zip(requests, raw, strict=True):
        assert req.prompt.count("{}") == 1
        if "requested_rewrite" in rec:
            rr = rec["requested_rewrite"]
            assert req.case_id == rec["case_id"] and req.prompt == rr["prompt"]
            assert (req.target_new, req.target_true) == (rr["target_new"]["str"], rr["target_true"]["str"])
            assert req.neighborhood_prompts == tuple(rec["neighborhood_prompts"])
        elif "src" in rec:
            assert req.text == rec["src"]
            assert (req.target_new, req.target_true) == (rec["alt"].strip(), rec["answers"][0])
            assert (req.neighborhood_prompts, req.neighborhood_target) == ((rec["loc"],), rec["loc_ans"])
        else:
            assert req.text == rec["prompt"] and req.subject == rec["subject"].strip()
            assert req.target_new == rec["target_new"].strip()
            truth = rec["ground_truth"]
            assert req.target_true == (truth[0] if isinstance(truth, list) else truth)
            if "locality_prompt" in rec:  # EasyEdit CounterFact
                assert req.neighborhood_prompts == (rec["locality_prompt"],)
                assert req.neighborhood_target == rec["locality_ground_truth"]
            else:  # KnowEdit: every locality prompt of the real file has the same answer
                items = rec["locality"]["Relation_Specificity"]
                assert req.neighborhood_prompts == tuple(x["prompt"] for x in items)
                assert req.neighborhood_target == items[0]["ground_truth"][0]


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


def test_round_trip_native() -> None:
    requests = [r for path in (ROME_FX, EASYEDIT_FX, ZSRE_MEND_FX, KNOWEDIT_FX, MIXED_JSONL_FX, CSV_FX)
                for r in load_requests(path)]
    requests.append(make_request(**NATIVE, case_id="abc", neighborhood_target="French"))
    assert len(requests) == 20
    for r in requests:
        d = r.to_dict()
        assert isinstance(d["paraphrase_prompts"], list)
        again = parse_record(json.loads(json.dumps(d)), source="s", record=1)
        assert again == r


def test_save_and_load(tmp_path: Path) -> None:
    requests = load_requests(ROME_FX) + load_requests(MIXED_JSONL_FX)
    path = tmp_path / "sub" / "out.jsonl"
    save_requests(requests, path)
    assert load_requests(path) == requests
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temporary file left behind
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    assert json.loads(lines[0]) == {
        "case_id": 7,
        "subject": "Marisol Quenteiro",
        "prompt": "The mother tongue of {} is",
        "target_new": "Dutch",
        "target_true": "Portuguese",
        "paraphrase_prompts": [
            "The ferry left at dawn. Marisol Quenteiro, a native",
            "Rain fell all week in the valley. Marisol Quenteiro spoke the language",
        ],
        "neighborhood_prompts": [
            "The mother tongue of Teodoro Alvim is",
            "Inês Carvalhedo is a native speaker of",
            "The native language of Rui Pestanha is",
        ],
        "generation_prompts": [
            "Marisol Quenteiro's mother tongue is",
            "Marisol Quenteiro was born in",
            "Marisol Quenteiro's mother tongue is",
        ],
        "neighborhood_target": None,
    }
    assert "Inês" in lines[0]  # written as UTF-8, not \\u escapes


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


def test_counterfact_error_names_nested_field() -> None:
    rec = _fixture(ROME_FX)[0]
    rec["requested_rewrite"]["target_new"] = {"id": "Q7411"}
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=1)
    assert info.value.field == "requested_rewrite.target_new.str"
    assert info.value.problem == "required field is missing"
    rec["requested_rewrite"]["target_new"] = {"str": "  ", "id": "Q7411"}
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=1)
    assert str(info.value) == "cf.json: record 1: field 'requested_rewrite.target_new.str': must not be empty"
    rec["requested_rewrite"]["target_new"] = {"str": "Dutch"}
    rec["requested_rewrite"]["prompt"] = "The mother tongue of somebody is"
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=1)
    assert info.value.field == "requested_rewrite.prompt"
    assert info.value.problem == "subject 'Marisol Quenteiro' not found in prompt"
    rec = _fixture(ROME_FX)[1]
    rec["requested_rewrite"] = "Vellmore Abbey is in Scotland"
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=2)
    assert (info.value.field, info.value.problem) == ("requested_rewrite", "must be an object, got str")
    rec = _fixture(ROME_FX)[2]
    rec["neighborhood_prompts"][1] = 5
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="cf.json", record=3)
    assert (info.value.field, info.value.problem) == ("neighborhood_prompts[1]", "must be a string, got int")


def test_zsre_error_names_file_fields() -> None:
    rec = _fixture(ZSRE_MEND_FX)[0]
    bad = dict(rec, alt="")
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "alt"
    bad = dict(rec, src="When was it founded?")
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "src" and info.value.problem == "subject 'Pelloria Cup' not found in prompt"
    bad = dict(rec, answers=[7])
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "answers[0]"
    bad = dict(rec, answers={"a": "1987"})
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert (info.value.field, info.value.problem) == ("answers", "must be a list, got an object")
    bad = dict(rec, loc_ans=" ")
    with pytest.raises(RequestError) as info:
        parse_record(bad, source="z.json", record=1)
    assert info.value.field == "loc_ans"
    no_answers = parse_record(dict(rec, answers=[]), source="z.json", record=1)
    assert no_answers.target_true is None and no_answers.target_new == "2004"


def test_easyedit_error_names_file_fields() -> None:
    rec = _fixture(EASYEDIT_FX)[0]
    with pytest.raises(RequestError) as info:
        parse_record(dict(rec, rephrase_prompt=""), source="e.json", record=4)
    assert (info.value.record, info.value.field) == (4, "rephrase_prompt")
    with pytest.raises(RequestError) as info:
        parse_record(dict(rec, locality_prompt=["ok", ""]), source="e.json", record=4)
    assert info.value.field == "locality_prompt[1]"
    rec = _fixture(KNOWEDIT_FX)[0]
    rec["locality"]["Relation_Specificity"][1]["prompt"] = ""
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="k.json", record=1)
    assert info.value.field == "locality.Relation_Specificity[1].prompt"
    rec = _fixture(KNOWEDIT_FX)[0]
    rec["locality"]["Relation_Specificity"][0] = {"ground_truth": ["genus"]}
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="k.json", record=1)
    assert info.value.field == "locality.Relation_Specificity[0]"
    assert info.value.problem == "must be an object with a 'prompt' field"
    rec = _fixture(KNOWEDIT_FX)[0]
    rec["ground_truth"] = [["Perisphinctidae"]]  # nested lists of answers: the first string
    assert parse_record(rec, source="k.json", record=1).target_true == "Perisphinctidae"
    rec["ground_truth"] = [3]
    with pytest.raises(RequestError) as info:
        parse_record(rec, source="k.json", record=1)
    assert info.value.field == "ground_truth[0]"


def test_easyedit_locality_keeps_only_prompts_with_the_first_answer() -> None:
    rec = _fixture(KNOWEDIT_FX)[0]
    rec["locality"]["Relation_Specificity"].append({"prompt": "Brennoceras is a", "ground_truth": ["fossil"]})
    rec["locality"]["Other_Group"] = [{"prompt": "Brennoceras, rank", "ground_truth": ["genus"]}]
    r = parse_record(rec, source="k.json", record=1)
    assert r.neighborhood_target == "genus"
    assert r.neighborhood_prompts == ("The taxon rank of Brennoceras is", "Brennoceras taxon rank", "Brennoceras, rank")


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



def test_placeholder_is_the_subject_in_every_prompt_of_the_request(tmp_path: Path) -> None:
    """'{}' in paraphrase and generation prompts is the subject, as in `prompt`; in neighbourhood prompts (other
    subjects) it is an error naming the record and the field; no literal '{}' reaches a stored request."""
    line = {"subject": "Eiffel Tower", "prompt": "The {} is in", "target_new": "Rome",
            "paraphrase_prompts": ["Where is the {}? It is in the city of", "The Eiffel Tower stands in"],
            "generation_prompts": "{} is a landmark", "neighborhood_prompts": ["The Louvre is in"]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    [r] = load_requests(path)
    assert r.paraphrase_prompts == ("Where is the Eiffel Tower? It is in the city of", "The Eiffel Tower stands in")
    assert r.generation_prompts == ("Eiffel Tower is a landmark",)
    assert r.text == "The Eiffel Tower is in"
    with pytest.raises(RequestError) as info:
        parse_record({**line, "neighborhood_prompts": ["The Louvre is in", "{} is near"]}, source="f", record=3)
    assert (info.value.record, info.value.field) == (3, "neighborhood_prompts[1]")
    assert "another subject" in info.value.problem
    with pytest.raises(RequestError) as info:
        parse_record({**line, "paraphrase_prompts": "{} and {} are in"}, source="f", record=1)
    assert info.value.field == "paraphrase_prompts" and "at most one" in info.value.problem
    braces = parse_record({**line, "subject": "A{}B", "prompt": "{} is in",
                           "paraphrase_prompts": ["A{}B stands in", "{} stands in"]}, source="f", record=1)
    assert braces.paraphrase_prompts == ("A{}B stands in", "A{}B stands in")  # the subject's own braces are text
