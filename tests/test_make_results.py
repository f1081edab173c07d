"""benchmarks/make_results.py --paired on hand-written run folders: per-record differences, and one line with exit
code 2 (no traceback) for a malformed line of records.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_results.py"


def _run_folder(root: Path, name: str, lines: list[str]) -> Path:
    run = root / name
    run.mkdir()
    (run / "records.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def _record(case: int, efficacy: list[float]) -> str:
    return json.dumps({"case_id": case, "edited": {"metrics": {"efficacy": efficacy}}})


def _paired(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--paired", str(a), str(b)], capture_output=True, text=True)


def test_paired_differs_on_shared_records_only(tmp_path: Path) -> None:
    a = _run_folder(tmp_path, "a", [_record(1, [1.0]), _record(2, [0.0, 1.0])])
    b = _run_folder(tmp_path, "b", [_record(1, [0.0]), _record(3, [1.0])])
    out = _paired(a, b)
    assert out.returncode == 0, out.stderr
    assert "on the 1 records both edited" in out.stdout
    assert "| -100.0 ± 0.0 |" in out.stdout


@pytest.mark.parametrize(("bad", "why"), [
    ('{"case_id": 2, "edi', "Unterminated string"),
    ('{"case_id": 2, "edited": {}}', "no field 'metrics'"),
    (_record(2, []), "case 2 has no values for 'efficacy'"),
])
def test_malformed_record_line_is_one_line_exit_2(tmp_path: Path, bad: str, why: str) -> None:
    a = _run_folder(tmp_path, "a", [_record(1, [1.0])])
    b = _run_folder(tmp_path, "b", [_record(1, [0.0]), bad])
    out = _paired(a, b)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"{b / 'records.jsonl'} line 2: " in out.stderr and why in out.stderr


@pytest.mark.parametrize("per_record", [{"x": {"efficacy": 1.0}}, {"1": 0.5}, [1, 2]])
def test_malformed_digest_is_one_line_exit_2(tmp_path: Path, per_record: object) -> None:
    a = _run_folder(tmp_path, "a", [_record(1, [1.0])])
    digest = tmp_path / "b.json"
    digest.write_text(json.dumps({"summary": {}, "per_record": per_record}))
    out = _paired(a, digest)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"{digest}: per_record is not case id -> metrics" in out.stderr
