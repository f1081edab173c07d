"""Tests of pmet.evaluation.data (the benchmark records of `pmet eval`): every format on the in-tree fixtures,
the dev/test slices, the errors, and a whole-file check on the real benchmark files when they are present."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pmet.errors import RequestError
from pmet.evaluation.data import in_dev_slice, load_eval_records
from pmet.requests import EditRequest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROME_FX = FIXTURES / "counterfact_rome.json"  # case ids 7, 30, 41
EASYEDIT_FX = FIXTURES / "counterfact_easyedit.json"  # case ids 12, 30, 41
ZSRE_MEND_FX = FIXTURES / "zsre_mend.json"  # no case ids: the index 0, 1, 2 stands in
KNOWEDIT_FX = FIXTURES / "zsre_knowedit.json"  # no case ids either

ZSRE_MEND = "zsre/zsre_mend_eval_portability_gpt4.json"


def _fixture(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, records: object, name: str = "d.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _ids(path: Path, dataset: str, **kwargs) -> list[int | str]:
    return [r.case_id for r in load_eval_records(path, dataset, **kwargs)]


def test_dev_slice_rule_on_the_fixture_ids() -> None:
    """The module docstring's rule, blake2b(str(case_id)) mod 20 == 0, by hand: of the fixtures' ids (and zsRE
    indices) only 30 and 2 are dev."""
    for case_id in (0, 1, 2, 7, 12, 30, 41):
        digest = hashlib.blake2b(str(case_id).encode(), digest_size=8).digest()
        assert in_dev_slice(case_id) == (int.from_bytes(digest, "big") % 20 == 0) == (case_id in (2, 30))


def test_counterfact_rome_records() -> None:
    recs = load_eval_records(ROME_FX, "counterfact", slice_="all")
    assert [(r.case_id, r.dataset, r.data_format, r.relation_id, r.target_new_id) for r in recs] == [
        (7, "counterfact", "rome", "P103", "Q7411"),
        (30, "counterfact", "rome", "P17", "Q20"),
        (41, "counterfact", "rome", "P1303", "Q8355"),
    ]
    r = recs[0].request
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        7,
        "Marisol Quenteiro",
        "The mother tongue of {} is",
        "Dutch",
        "Portuguese",
    )
    assert r.neighborhood_prompts == (
        "The mother tongue of Teodoro Alvim is",
        "Inês Carvalhedo is a native speaker of",
        "The native language of Rui Pestanha is",
    )
    assert len(r.paraphrase_prompts) == 2 and len(r.generation_prompts) == 3
    assert recs[0].locality_answers == ()  # CounterFact's neighbourhood is scored against the true target
    assert _ids(ROME_FX, "counterfact", slice_="dev") == [30]
    assert _ids(ROME_FX, "counterfact") == [7, 41]  # the default slice is test
    assert _ids(ROME_FX, "counterfact", slice_="test", n=1) == [7]
    assert _ids(ROME_FX, "counterfact", slice_="all", n=2) == [7, 30]


def test_counterfact_easyedit_records() -> None:
    recs = load_eval_records(EASYEDIT_FX, "counterfact", slice_="all")
    assert [(r.case_id, r.data_format, r.relation_id, r.target_new_id) for r in recs] == [
        (12, "easyedit", None, None),
        (30, "easyedit", None, None),
        (41, "easyedit", None, None),
    ]
    assert recs[0].request == EditRequest(
        subject="Harnfield Motor Works",
        prompt="The headquarters of {} is in",
        target_new="Lisbon",
        target_true="Coventry",
        paraphrase_prompts=("A storm closed the pass. Harnfield Motor Works's headquarters are in",),
        neighborhood_prompts=("The headquarters of Brackley Looms is in",),
        case_id=12,
        neighborhood_target="Coventry",
    )
    assert recs[0].locality_answers == ()
    # the slice follows the global case id, so both CounterFact files put case 30 in dev
    assert _ids(EASYEDIT_FX, "counterfact", slice_="dev") == [30]
    assert _ids(EASYEDIT_FX, "counterfact", slice_="test") == [12, 41]


def test_zsre_mend_record_follows_memit() -> None:
    """ROME/MEMIT dsets/zsre.py: new target answers[0], unrelated question loc + "?" answered by loc_ans; with
    zsre_target="alt" the new target is alt, as EasyEdit has it."""
    recs = load_eval_records(ZSRE_MEND_FX, "zsre", slice_="all")
    assert [(r.case_id, r.dataset, r.data_format) for r in recs] == [(0, "zsre", "mend"), (1, "zsre", "mend"),
                                                                       (2, "zsre", "mend")]
    assert recs[0].request == EditRequest(
        subject="Pelloria Cup",
        prompt="When was the inception of {}?",
        target_new="1987",
        target_true=None,
        paraphrase_prompts=("When was the Pelloria Cup first held?",),
        neighborhood_prompts=("nq question: who painted the ceiling of the old harbour library?",),
        case_id=0,
        neighborhood_target="Marta Evenholt",
    )
    assert [r.locality_answers for r in recs] == [("Marta Evenholt",), ("1968",), ("forty-two",)]
    assert [r.request.target_new for r in recs] == ["1987", "Tyrrhenian Basin", "Erebidae"]
    assert recs[1].request.text == "Which body of water is Capo Veltrano next to?"
    alt = load_eval_records(ZSRE_MEND_FX, "zsre", slice_="all", zsre_target="alt")
    assert [r.request.target_new for r in alt] == ["2004", "Sardinian Sea", "Pieridae"]  # " Sardinian Sea" stripped
    assert alt[0].request.neighborhood_prompts == recs[0].request.neighborhood_prompts
    # no ids in the file: the slice rule reads the index
    assert _ids(ZSRE_MEND_FX, "zsre", slice_="dev") == [2]
    assert _ids(ZSRE_MEND_FX, "zsre") == [0, 1]


def test_knowedit_zsre_records() -> None:
    recs = load_eval_records(KNOWEDIT_FX, "zsre", slice_="all")
    assert [(r.case_id, r.data_format, r.relation_id) for r in recs] == [(0, "knowedit", None), (1, "knowedit", None),
                                                                         (2, "knowedit", None)]
    r = recs[0].request
    assert (r.prompt, r.target_new, r.target_true) == ("Which family does {} belong to?", "Tortricidae",
                                                       "Perisphinctidae")
    assert r.neighborhood_prompts == ("The taxon rank of Brennoceras is", "Brennoceras taxon rank")
    assert recs[0].locality_answers == ("genus", "genus")  # one answer per unrelated prompt
    # "Harrowgate Vale " / " Saint Odran" in the file
    assert (recs[1].request.subject, recs[1].request.target_new) == ("Harrowgate Vale", "Saint Odran")
    assert recs[1].request.text == "What is Harrowgate Vale named after?"
    assert recs[2].locality_answers == ("glassblower", "glassblower")
    assert _ids(KNOWEDIT_FX, "zsre", slice_="dev") == [2]
    assert _ids(KNOWEDIT_FX, "zsre", slice_="test", n=1) == [0]


@pytest.mark.parametrize(
    ("path", "dataset", "problem"),
    [
        (ROME_FX, "zsre", "not a zsre record"),
        (EASYEDIT_FX, "zsre", "not a zsre record"),
        (ZSRE_MEND_FX, "counterfact", "not a counterfact record"),
        (KNOWEDIT_FX, "counterfact", "not a counterfact record"),
    ],
)
def test_wrong_dataset_for_the_file(path: Path, dataset: str, problem: str) -> None:
    with pytest.raises(RequestError) as info:
        load_eval_records(path, dataset, slice_="all")
    assert (info.value.source, info.value.record, info.value.field) == (str(path), 1, None)
    assert info.value.problem.startswith(f"{problem} (unrecognised keys [")


def test_eval_record_errors(tmp_path: Path) -> None:
    # record numbers are 1-based positions in the JSON list, as pmet edit names them
    cf = _fixture(EASYEDIT_FX)
    del cf[1]["ground_truth"]
    with pytest.raises(RequestError) as info:
        load_eval_records(_write(tmp_path, cf), "counterfact", slice_="all")
    assert (info.value.record, info.value.field) == (2, "target_true")
    assert info.value.problem == "CounterFact evaluation needs the true target"

    ke = _fixture(KNOWEDIT_FX)
    for item in ke[2]["locality"]["Relation_Specificity"]:
        del item["ground_truth"]
    with pytest.raises(RequestError) as info:
        load_eval_records(_write(tmp_path, ke), "zsre", slice_="all")
    assert (info.value.record, info.value.field) == (3, "locality")

    mend = _fixture(ZSRE_MEND_FX)
    for change, kwargs, field in [
        ({"answers": []}, {}, "answers"),
        ({"answers": "1987"}, {}, "answers"),  # a string, not a list: not its first character
        ({"answers": ["  "]}, {}, "answers[0]"),
        ({"rephrase": None}, {}, "rephrase"),
        ({"loc": 3}, {}, "loc"),
        ({"loc_ans": ""}, {}, "loc_ans"),
        ({"alt": " "}, {"zsre_target": "alt"}, "alt"),
        ({"src": "When was it first held?"}, {}, "subject"),
    ]:
        records = [mend[0], dict(mend[1], **change)]
        with pytest.raises(RequestError) as info:
            load_eval_records(_write(tmp_path, records), "zsre", slice_="all", **kwargs)
        assert (info.value.record, info.value.field) == (2, field), change  # 1-based, as pmet edit counts

    with pytest.raises(RequestError, match="record 2: record must be an object"):
        load_eval_records(_write(tmp_path, [mend[0], "Pelloria Cup"]), "zsre", slice_="all")


def test_eval_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="unknown dataset 'wiki' \\(choose from counterfact, zsre\\)"):
        load_eval_records(ROME_FX, "wiki")
    with pytest.raises(RequestError, match="unknown slice 'train' \\(choose from dev, test, all\\)"):
        load_eval_records(ROME_FX, "counterfact", slice_="train")
    with pytest.raises(RequestError, match="file not found"):
        load_eval_records(tmp_path / "nope.json", "counterfact")
    with pytest.raises(RequestError, match="expected a JSON list of records"):
        load_eval_records(_write(tmp_path, _fixture(ROME_FX)[0]), "counterfact")
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_eval_records(bad, "counterfact")
    # cases 7 and 41 only: nothing in the dev slice
    no_dev = _write(tmp_path, [r for r in _fixture(ROME_FX) if r["case_id"] != 30])
    with pytest.raises(RequestError, match="no records in slice 'dev'") as info:
        load_eval_records(no_dev, "counterfact", slice_="dev")
    assert info.value.record is None
    assert _ids(no_dev, "counterfact") == [7, 41]


# ----------------------------------------------------------------------------------------------------
# the real benchmark files (skipped without them)


def test_real_zsre_mend_file_follows_memit(data_dir: Path) -> None:
    """Every record of the real zsRE MEND file loads, each one as ROME/MEMIT's dsets/zsre.py builds it."""
    raw = json.loads((data_dir / ZSRE_MEND).read_text(encoding="utf-8"))
    recs = load_eval_records(data_dir / ZSRE_MEND, "zsre", slice_="all")
    alt = load_eval_records(data_dir / ZSRE_MEND, "zsre", slice_="all", zsre_target="alt")
    assert len(recs) == len(alt) == len(raw) == 1037
    for rec, a, obj in zip(recs, alt, raw, strict=True):
        assert rec.request.target_new == obj["answers"][0] and a.request.target_new == obj["alt"].strip()
        assert rec.request.text == obj["src"]
        assert rec.request.neighborhood_prompts == (obj["loc"] + "?",) and rec.locality_answers == (obj["loc_ans"],)
    dev = load_eval_records(data_dir / ZSRE_MEND, "zsre", slice_="dev")
    test = load_eval_records(data_dir / ZSRE_MEND, "zsre", slice_="test")
    assert len(dev) + len(test) == 1037 and {r.case_id for r in dev}.isdisjoint(r.case_id for r in test)


def test_portability_questions(tmp_path: Path) -> None:
    """EasyEdit's one-hop `portability` field, in both of its shapes, becomes (question, answer) pairs; a record
    without it has none; a malformed one is a one-line error naming the field."""
    mend = load_eval_records(ZSRE_MEND_FX, "zsre", slice_="all")
    assert mend[0].portability == (("Which sport is played at the Pelloria Cup, first held in 2004?", "Rowing"),)
    ke = load_eval_records(KNOWEDIT_FX, "zsre", slice_="all")
    assert ke[1].portability == (("What is the Vale of Harrowgate named after?", "Saint Odran"),)
    assert load_eval_records(ROME_FX, "counterfact", slice_="all")[0].portability == ()
    cf = _fixture(ROME_FX)
    cf[0]["portability"] = {"Recalled Relation": "(x, y, z)", "New Question": " Where is it? ",
                            "New Answer": ["Rowing", "rowing"]}
    cf[1]["portability"] = {"Reasoning": [{"prompt": "Q1?", "ground_truth": [["A1"]]}, {"prompt": "Q2?",
                                                                                      "ground_truth": "A2"}]}
    got = load_eval_records(_write(tmp_path, cf), "counterfact", slice_="all")
    assert got[0].portability == (("Where is it?", "Rowing"),)
    assert got[1].portability == (("Q1?", "A1"), ("Q2?", "A2"))
    cf[2]["portability"] = {"New Question": "Where?", "New Answer": ""}
    with pytest.raises(RequestError) as info:
        load_eval_records(_write(tmp_path, cf), "counterfact", slice_="all")
    assert (info.value.record, info.value.field) == (3, "portability")


def test_asking_for_no_records_is_refused_not_read_as_all() -> None:
    assert len(_ids(ROME_FX, "counterfact", n=1, slice_="all")) == 1
    for n in (0, -3):
        with pytest.raises(RequestError, match="give at least 1"):
            load_eval_records(ROME_FX, "counterfact", n=n, slice_="all")
