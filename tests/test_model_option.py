"""`--model PATH`: a harness's workload on another model file (llamacpp: any GGUF), through the CLI
as a user meets it, with cdot (whose "model" is a file holding the vector length) standing in."""

import hashlib
import json
from pathlib import Path

from conftest import CDOT, lab_cli

NO_COMPILE = CDOT / "solutions" / "wrong" / "no-compile.patch"
SKIP_HALF = CDOT / "solutions" / "wrong" / "skip-half.patch"


def _model(folder: Path, text, name="short.txt") -> Path:
    path = folder / name
    path.write_text(f"{text}\n")
    return path


def _json(out, exit_code=0):
    assert out.returncode == exit_code, out.stderr
    return json.loads(out.stdout)


def _read(base: Path, path: str) -> dict:
    return json.loads((Path(path) if Path(path).is_absolute() else base / path).read_text())


def test_check_runs_the_chosen_model_and_records_it(cdot, cdot_repo, tmp_path):
    model = _model(tmp_path, 4096)
    chosen = _read(cdot_repo, _json(lab_cli("check", str(cdot.root), "--model", str(model), "--json",
                                            cwd=cdot_repo))["record"])
    assert chosen["work"]["elements"] == 4096  # the runner ran the chosen model
    assert chosen["fingerprint"]["model"] == {"name": "short.txt", "sha256": hashlib.sha256(b"4096\n").hexdigest(),
                                              "bytes": 5, "elements": 4096}
    own = _read(cdot_repo, _json(lab_cli("check", str(cdot.root), "--json", cwd=cdot_repo))["record"])
    assert own["work"]["elements"] == 1 << 18 and "model" not in own["fingerprint"]

    # a record of one model is never set beside a measurement of another
    record = tmp_path / "chosen.json"
    record.write_text(json.dumps(chosen))
    refused = lab_cli("bench", str(cdot.root), "--against-record", str(record), cwd=cdot_repo)
    assert refused.returncode == 2 and "model.sha256" in refused.stderr and "never compared" in refused.stderr


def test_a_bad_model_or_a_harness_without_one_is_one_clear_line(cdot, cdot_repo, tmp_path):
    out = lab_cli("check", str(cdot.root), "--model", str(_model(tmp_path, "lots")), cwd=cdot_repo)
    assert out.returncode == 2 and "is no cdot model" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = lab_cli("check", str(cdot.root), "--model", str(tmp_path / "absent.txt"), cwd=cdot_repo)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = lab_cli("check", "wavegru", "--model", str(_model(tmp_path, 4096)))
    assert out.returncode == 2 and "takes no --model" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_run_keeps_its_model_when_resumed(cdot, cdot_repo, tmp_path):
    model = _model(tmp_path, 4096)
    first = _json(lab_cli("try", str(cdot.root), str(NO_COMPILE), "--model", str(model), "--json", cwd=cdot_repo),
                  exit_code=1)  # measured (FAIL), not kept
    run = Path(first["run"]) if Path(first["run"]).is_absolute() else cdot_repo / first["run"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["workload_model"]["path"] == str(model) and meta["workload_model"]["elements"] == 4096

    # resumed without --model: the recorded file, checked by its sha256
    again = _json(lab_cli("try", str(cdot.root), str(SKIP_HALF), "--run", str(run), "--json", cwd=cdot_repo),
                  exit_code=1)
    assert again["event"]["verdict"]["status"] == "FAIL"
    assert _read(run, again["event"]["record"])["work"]["elements"] == 4096

    other = _model(tmp_path, 2048, name="other.txt")
    refused = lab_cli("try", str(cdot.root), str(SKIP_HALF), "--run", str(run), "--model", str(other), cwd=cdot_repo)
    assert refused.returncode == 2 and "cannot change its model" in refused.stderr
    model.write_text("8192\n")  # the same path, other bytes
    refused = lab_cli("try", str(cdot.root), str(SKIP_HALF), "--run", str(run), cwd=cdot_repo)
    assert refused.returncode == 2 and "cannot change its model" in refused.stderr
    model.unlink()
    refused = lab_cli("try", str(cdot.root), str(SKIP_HALF), "--run", str(run), cwd=cdot_repo)
    assert refused.returncode == 2 and "no longer there: give the same file with --model" in refused.stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "evaluated" for e in events) == 2  # the refused resumptions ran nothing
