"""The `pmet` command against bad and hostile input, as a user runs it (subprocesses on a tiny saved model).

Every refusal must be one stderr line starting with `error:`, exit code 2, no traceback, no new file anywhere
in the working folder, and a file the user already had in an output folder still there byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .test_cli import assert_one_line_error
from .tiny import SENTENCES, tiny_model, tiny_tokenizer

REQUEST = {"subject": "Danielle Darrieux", "prompt": "{} mother tongue is", "target_new": "English",
           "target_true": "French"}
NOTES = b"my own notes \x00\x01, not pmet's\n"


def pmet(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmet.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A workspace: a tiny Llama saved as a model folder, a config for it, a corpus, requests, a cache, and a
    patch made by `pmet edit` itself."""
    root = tmp_path_factory.mktemp("ws")
    tok = tiny_tokenizer()
    for name, seed in (("model", 0), ("other", 1)):
        m = tiny_model("llama", seed=seed)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "tiny.yaml").write_text("layers: [1, 2]\nv_num_grad_steps: 3\nmom2_n_tokens: 300\n")
    (root / "corpus.txt").write_text("\n".join(SENTENCES * 20))
    (root / "req.jsonl").write_text(json.dumps(REQUEST) + "\n")
    env = {**os.environ, "PMET_CACHE_DIR": str(root / "cache")}
    ws = {"root": root, "model": root / "model", "other": root / "other", "cfg": root / "tiny.yaml",
          "corpus": root / "corpus.txt", "req": root / "req.jsonl", "env": env}
    proc = pmet(*edit_args(ws), "--out", str(root / "patch"), "--save-model", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = pmet(*edit_args(ws), "--out", str(root / "patch-full"), "--full-patch", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    ws["patch"], ws["patch-full"] = root / "patch", root / "patch-full"
    return ws


def edit_args(ws: dict, requests: Path | None = None) -> list[str]:
    return ["edit", "--model", str(ws["model"]), "--config", str(ws["cfg"]), "--corpus", str(ws["corpus"]),
            "--requests", str(requests or ws["req"]), "--quiet"]


@pytest.fixture
def cwd(tmp_path) -> Path:
    """The user's working folder, holding one file of theirs in an output folder (`out/notes.txt`)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_bytes(NOTES)
    return tmp_path


def refused(ws: dict, cwd: Path, args: list[str], *needles: str) -> None:
    """Run `pmet args` in `cwd`: one-line error, exit 2, and nothing in `cwd` created, changed or deleted."""
    before = snapshot(cwd)
    proc = pmet(*args, cwd=cwd, env=ws["env"])
    assert_one_line_error(proc, *needles)
    assert snapshot(cwd) == before
    assert [name for name, data in before.items() if data == NOTES]  # the user's file was there, and still is


# -- outputs: data loss, half-written outputs, unwritable paths ------------------------------------------

def test_edit_refuses_a_folder_holding_the_users_files(ws, cwd):
    refused(ws, cwd, [*edit_args(ws), "--out", "out"], "--out out", "not empty", "notes.txt", "--force")
    refused(ws, cwd / "out", [*edit_args(ws), "--out", "."], "--out .", "not empty")


def test_apply_refuses_a_folder_holding_the_users_files(ws, cwd):
    refused(ws, cwd, ["apply", str(ws["patch"]), "--model", str(ws["model"]), "--out", "out"], "not empty")
    refused(ws, cwd / "out", ["apply", str(ws["patch"]), "--model", str(ws["model"]), "--out", "."], "not empty")


@pytest.mark.parametrize("command", ["edit", "apply"])
def test_unwritable_outputs_fail_before_any_work(ws, cwd, command):
    (cwd / "a_file").write_text("x")
    (cwd / "a_folder").mkdir()
    args = edit_args(ws) if command == "edit" else ["apply", str(ws["patch"]), "--model", str(ws["model"])]
    refused(ws, cwd, [*args, "--out", "a_file"], "--out a_file", "is a file")
    refused(ws, cwd, [*args, "--out", "/proc/pmet-read-only/out"], "cannot write")  # read-only even for root
    refused(ws, cwd, [*args, "--out", "a_file/sub"], "cannot write")
    if command == "edit":
        refused(ws, cwd, [*args, "--out", "new", "--report", "a_folder"], "--report a_folder", "is a folder")
        refused(ws, cwd, [*args, "--out", "new", "--report", "/proc/pmet-read-only/r.json"], "--report",
                "cannot write")
        refused(ws, cwd, [*args, "--out", "new", "--report", "a_file"], "--report a_file", "exists", "--force")


def test_trace_and_eval_refuse_a_folder_holding_the_users_files(ws, cwd):
    facts = cwd / "facts.json"
    facts.write_text(json.dumps([{"prompt": "x", "subject": "x", "attribute": "y"}]))
    refused(ws, cwd, ["trace", "--model", str(ws["model"]), "--facts", str(facts), "--out", "out"], "not empty")
    refused(ws, cwd, ["eval", "--model", str(ws["model"]), "--data", str(facts), "--out", "out"], "not empty")


def test_eval_refuses_a_curve_without_a_sequential_edit(ws, cwd):
    data = Path(__file__).parent / "fixtures" / "counterfact_rome.json"
    refused(ws, cwd, ["eval", "--model", str(ws["model"]), "--config", str(ws["cfg"]), "--data", str(data),
                      "--slice", "all", "--out", "new", "--curve-every", "1"], "--curve-every needs a sequential edit")


def test_force_replaces_only_what_pmet_wrote(ws, cwd):
    out = cwd / "out"
    proc = pmet(*edit_args(ws), "--out", str(out), "--force", "--save-model", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_bytes() == NOTES
    assert {p.name for p in out.iterdir()} == {"notes.txt", "patch.safetensors", "model", ".pmet-outputs.json"}
    # a second run without --save-model replaces pmet's own files (the stale model/ goes), keeps the notes
    proc = pmet(*edit_args(ws), "--out", str(out), "--force", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"notes.txt", "patch.safetensors", ".pmet-outputs.json"}
    assert json.loads((out / ".pmet-outputs.json").read_text())["entries"] == ["patch.safetensors"]
    # a file pmet would write but did not write is never replaced, even with --force
    (cwd / "mine").mkdir()
    (cwd / "mine" / "patch.safetensors").write_bytes(NOTES)
    refused(ws, cwd, [*edit_args(ws), "--out", "mine", "--force"], "would replace patch.safetensors")
    assert (cwd / "mine" / "patch.safetensors").read_bytes() == NOTES


def test_outputs_get_ordinary_permissions(ws, tmp_path):
    env = {**ws["env"]}
    cmd = f"umask 022 && exec {sys.executable} -m pmet.cli apply {ws['patch']} --model {ws['model']} --out applied"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "applied").iterdir()}
    assert (tmp_path / "applied").stat().st_mode & 0o777 == 0o755
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}
    saved = ws["patch"] / "model"  # edit --save-model, made by the fixture under the test runner's umask
    mask = os.umask(0)
    os.umask(mask)
    assert (saved / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert saved.stat().st_mode & 0o777 == 0o777 & ~mask


# -- one line instead of a traceback -----------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["edit", "--bogus"], ["No such option: --bogus"]),
    (["eval", "--data", "x.json", "--out", "new", "--edits", "abc"], ["'--edits'", "valid integer"]),
    (["eval", "--data", "x.json", "--out", "new", "--generation-batch-size", "0"],
     ["'--generation-batch-size'", "greater than or equal to 1"]),
])
def test_usage_errors_are_one_line(ws, cwd, args, needles):
    """Unknown options and values of the wrong type or range: one line and exit 2 like every other refusal."""
    refused(ws, cwd, args, *needles)


@pytest.mark.parametrize("case, needles", [
    ("gguf-random-bytes", ["bad.gguf", "not a readable GGUF"]),
    ("gguf-truncated", ["bad.gguf", "not a readable GGUF"]),
    ("pickle-weights", ["pickle", "unpickles nothing"]),
    ("yaml-not-utf8", ["conf.yaml", "not UTF-8"]),
    ("json-not-utf8", ["conf.json", "not UTF-8"]),
    ("yaml-python-tag", ["conf.yaml", "could not determine a constructor", "python/object/apply"]),
    ("unknown-config-field", ["conf.yaml", "speed"]),
    ("layers-abc", ["--layers 'abc'"]),
    ("device-banana", ["--device 'banana'"]),
    ("device-cuda-missing", ["--device 'cuda'", "no CUDA"]),
    ("malformed-json", ["reqs.jsonl", "record 2", "malformed JSON"]),
    ("missing-field", ["reqs.jsonl", "record 1", "target_new"]),
    ("empty-target", ["reqs.jsonl", "record 1", "target_new"]),
    ("conflicting-targets", ["reqs.jsonl", "record 3", "target_new", "conflicts with record 1"]),
    ("target-too-long", ["reqs.jsonl", "target_new", "more than the bound of 64"]),
])
def test_bad_edit_input_is_one_line(ws, cwd, case, needles):
    if case == "device-cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [*edit_args(ws), "--out", "new", "--report", "r.json"]
    inputs = cwd / "inputs"
    inputs.mkdir()
    reqs = inputs / "reqs.jsonl"
    reqs.write_text(json.dumps(REQUEST) + "\n")

    def use(option: str, value: str) -> None:
        args[args.index(option) + 1] = value

    if case.startswith("gguf"):
        data = os.urandom(4096) if case == "gguf-random-bytes" else b"GGUF\x03\x00\x00\x00garbage"
        (inputs / "bad.gguf").write_bytes(data)
        use("--model", str(inputs / "bad.gguf"))
    elif case == "pickle-weights":
        folder = inputs / "pickled"
        folder.mkdir()
        for f in ws["model"].iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        torch.save(load_file(str(ws["model"] / "model.safetensors")), folder / "pytorch_model.bin")
        use("--model", str(folder))
    elif case in ("yaml-not-utf8", "json-not-utf8", "yaml-python-tag", "unknown-config-field"):
        conf = inputs / ("conf.json" if case == "json-not-utf8" else "conf.yaml")
        conf.write_bytes({"yaml-not-utf8": b"\xff\xfelayers: [1]", "json-not-utf8": b"\xff\xfe{}",
                          "yaml-python-tag": b"layers: !!python/object/apply:os.system ['touch pwned']\n",
                          "unknown-config-field": b"layers: [1, 2]\nspeed: fast\n"}[case])
        use("--config", str(conf))
    elif case == "layers-abc":
        args += ["--layers", "abc"]
    elif case.startswith("device"):
        args += ["--device", "banana" if case == "device-banana" else "cuda"]
    else:
        lines = {"malformed-json": [REQUEST, "{not json"],
                 "missing-field": [{k: v for k, v in REQUEST.items() if k != "target_new"}],
                 "empty-target": [{**REQUEST, "target_new": "  "}],
                 "conflicting-targets": [REQUEST, {**REQUEST, "subject": "Paris"}, {**REQUEST, "target_new": "Dutch"}],
                 "target-too-long": [{**REQUEST, "target_new": "word " * 200}]}[case]
        reqs.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        use("--requests", str(reqs))
    refused(ws, cwd, args, *needles)
    assert not (cwd / "pwned").exists() and not (inputs / "pwned").exists()


def _altered_patch(ws: dict, folder: Path, case: str) -> Path:
    """The fixture's patch (compact, or full for the cases that alter stored Δs and originals) with one thing
    changed, as a user (or a damaged disk) might."""
    src = ws["patch-full" if case in ("delta-altered", "original-altered") else "patch"] / "patch.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    name = next(iter(json.loads(meta["weights"])))
    if case == "delta-altered":
        tensors[f"delta::{name}"][0, 0] += 1.0
    elif case == "original-altered":
        tensors[f"original::{name}"][0, 0] += 1.0
    elif case == "factor-altered":
        tensors[f"factor_q::{name}"][0, 0] += 1.0
    elif case == "metadata-not-json":
        meta["weights"] = "{not json"
    elif case == "missing-diagnostics":
        del meta["diagnostics"]
    elif case == "unknown-weight":
        weights = json.loads(meta["weights"])
        bogus = name.replace("layers.1.", "layers.99.")
        weights[bogus] = weights.pop(name)
        meta["weights"] = json.dumps(weights)
        del meta["patch_id"]  # else the altered record is refused as such before any model is seen
        for key in [k for k in tensors if k.endswith(f"::{name}")]:
            tensors[key.replace(name, bogus)] = tensors.pop(key)
    elif case == "foreign-safetensors":
        tensors, meta = {"x": torch.zeros(2)}, {"format": "pt"}
    out = folder / "patch.safetensors"
    folder.mkdir()
    save_file(tensors, str(out), metadata=meta)
    if case == "truncated":
        out.write_bytes(src.read_bytes()[:1000])
    return folder


@pytest.mark.parametrize("case, needles", [
    ("delta-altered", ["original + Δ does not give the recorded edited weight"]),
    ("original-altered", ["stored original does not match its recorded SHA-256"]),
    ("factor-altered", ["applying it gives other bits than the edit wrote"]),
    ("metadata-not-json", ["metadata field 'weights' is not valid JSON"]),
    ("missing-diagnostics", ["metadata field 'diagnostics' is missing"]),
    ("unknown-weight", ["no weight", "layers.99"]),
    ("truncated", ["not a readable safetensors file"]),
    ("foreign-safetensors", ["not a pmet patch"]),
])
def test_damaged_or_altered_patches_are_refused(ws, cwd, case, needles):
    patch = _altered_patch(ws, cwd / "bad-patch", case)
    refused(ws, cwd, ["apply", str(patch), "--model", str(ws["model"]), "--out", "applied"], *needles)


def test_wrong_base_model_says_what_it_found(ws, cwd):
    refused(ws, cwd, ["apply", str(ws["patch"]), "--model", str(ws["other"]), "--out", "applied"],
            "patch was made for base model", "differ from the originals it recorded")
    proc = pmet("apply", str(ws["patch"]), "--model", str(ws["other"]), "--out", "applied", cwd=cwd, env=ws["env"])
    assert "already edited" not in proc.stderr
    refused(ws, cwd, ["apply", str(ws["patch"]), "--model", str(ws["patch"] / "model"), "--out", "applied"],
            "already edited with this patch")


def test_stats_and_trace_bad_options(ws, cwd):
    refused(ws, cwd, ["stats", "--model", str(ws["model"]), "--layers", "1,x"], "--layers '1,x'")
    refused(ws, cwd, ["stats", "--model", str(ws["model"]), "--device", "banana", "--layers", "1"], "banana")
    refused(ws, cwd, ["trace", "--model", str(ws["model"]), "--facts", "missing.json", "--out", "t"],
            "missing.json")


def test_unexpected_failures_are_one_line_with_a_debug_hint(ws, cwd):
    """An exception no check foresaw (here: a model folder whose config.json is not JSON) is still one line."""
    broken = cwd / "broken"
    broken.mkdir()
    for f in ws["model"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{")
    proc = pmet(*edit_args(ws), "--model", str(broken), cwd=cwd, env=ws["env"])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr


# -- requests ------------------------------------------------------------------------------------------------

def test_duplicate_requests_are_merged_with_a_warning(ws, cwd):
    reqs = cwd / "dup.jsonl"
    reqs.write_text("".join(json.dumps(r) + "\n" for r in [REQUEST, {**REQUEST, "subject": "Paris"}, REQUEST]))
    proc = pmet(*edit_args(ws, reqs), "--report", "r.json", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    assert "1 duplicate request(s) merged" in proc.stderr and "record 3 = record 1" in proc.stderr
    assert len(json.loads((cwd / "r.json").read_text())["requests"]) == 2


# -- interrupts ----------------------------------------------------------------------------------------------

def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)


def _default_sigint() -> None:
    """Ctrl-C's default disposition in the child: a test run from a background job inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler, so the run would not see the interrupt it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".stage-" in p.name]


def test_ctrl_c_during_edit_leaves_nothing_half_written_and_a_rerun_resumes(ws, tmp_path):
    cfg = tmp_path / "slow.yaml"  # three one-request batches that never stop early (stop_loss 0)
    cfg.write_text("layers: [1, 2]\nv_num_grad_steps: 400\nmom2_n_tokens: 300\nv_batch_size: 1\n"
                   "stop_rule: loss\nstop_loss: 0.0\n")
    reqs = tmp_path / "three.jsonl"
    reqs.write_text("".join(json.dumps({**REQUEST, "subject": s}) + "\n" for s in ("Paris", "Kenya", "Toko")))
    env = {**ws["env"], "PMET_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "pmet.cli", *edit_args(ws, reqs), "--config", str(cfg), "--out", "out",
            "--report", "r.json"]
    targets = tmp_path / "cache" / "targets"
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    _interrupt_when(proc, lambda: targets.is_dir() and len(list(targets.rglob("*.safetensors"))) >= 1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: no output written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
    assert _no_temp_files(tmp_path)
    done = len(list(targets.rglob("*.safetensors")))
    assert 1 <= done < 3
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {done} of 3 target vectors from the cache" in rerun.stderr
    assert (tmp_path / "out" / "patch.safetensors").is_file() and (tmp_path / "r.json").is_file()


def test_ctrl_c_during_stats_leaves_no_cache_entry(ws, tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(SENTENCES * 4000))
    env = {**ws["env"], "PMET_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "pmet.cli", "stats", "--model", str(ws["model"]), "--layers", "1,2", "--corpus",
            str(corpus), "--tokens", "400000", "--device", "cpu"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err_file:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True,
                                preexec_fn=_default_sigint)
        # interrupt once the pass over the corpus is under way (its progress bar has shown a count)
        _interrupt_when(proc, lambda: "C0 keys" in log.read_text() and "tok/s" in log.read_text())
        proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    stats = tmp_path / "cache" / "stats"
    assert not stats.exists() or not list(stats.rglob("*.safetensors"))
    assert _no_temp_files(tmp_path)
    log.unlink()
    rerun = subprocess.run([*args[:-4], "--tokens", "2000", "--device", "cpu"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "2000 tokens" in " ".join(rerun.stdout.split())


def test_patch_chain_from_the_command_line(ws, cwd):
    """`pmet edit --patch-on` makes a second patch on top of the first; apply takes the chain in order, refuses it
    out of order, and revert undoes the last one from the base model plus --keep."""
    second = cwd / "second.jsonl"
    second.write_text(json.dumps({"subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "violin"}) + "\n")
    proc = pmet(*edit_args(ws, second), "--patch-on", str(ws["patch"]), "--out", "p2", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    shown = pmet("show", "p2", cwd=cwd, env=ws["env"])
    assert shown.returncode == 0, shown.stderr
    with safe_open(str(ws["patch"] / "patch.safetensors"), framework="pt") as f:
        first_id = f.metadata()["patch_id"]
    assert f"made on: {first_id[:12]}" in shown.stdout
    refused(ws, cwd, ["apply", "p2", str(ws["patch"]), "--model", str(ws["model"]), "--out", "x"],
            "not on top of", "apply a chain in the order it was made")
    refused(ws, cwd, ["apply", "p2", "--model", str(ws["model"]), "--out", "x"], "apply it first")
    proc = pmet("apply", str(ws["patch"]), "p2", "--model", str(ws["model"]), "--out", "both", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    card = (cwd / "both" / "README.md").read_text()
    assert "Danielle Darrieux" in card and "Toko Yasuda" in card
    refused(ws, cwd, ["revert", "p2", "--model", "both", "--out", "r"], "pass the patches that stay applied")
    proc = pmet("revert", "p2", "--keep", str(ws["patch"]), "--model", "both", "--out", "r", cwd=cwd, env=ws["env"])
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(cwd / "r" / "model.safetensors"))
    want = load_file(str(ws["patch"] / "model" / "model.safetensors"))  # the model the first edit saved
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
