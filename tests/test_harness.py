import json

import pytest

from lab.errors import HarnessContractError, HarnessNotFound, LockedFileChanged, MissingExtra
from lab.extras import require
from lab.harness import load, matches_any, stage_editable, verify_lock, write_lock
from lab.records import Build, Check, CheckItem, Evaluation, Pair, Sample, Verdict


def test_globs_follow_gitignore_rules():
    assert matches_any("kernel.cu", ["kernel.cu"])
    assert not matches_any("sub/kernel.cu", ["kernel.cu"])
    assert matches_any("ggml/src/ggml-cpu/ops.cpp", ["ggml/src/ggml-cpu/**"])
    assert matches_any("ggml/src/ggml-cpu/arch/x86/q.c", ["ggml/src/ggml-cpu/**"])
    assert not matches_any("ggml/src/ggml.c", ["ggml/src/ggml-cpu/**"])
    assert matches_any("a/b/c.py", ["**/*.py"]) and matches_any("c.py", ["**/*.py"])
    assert not matches_any("work.cpp", ["*.c"])


def test_load_by_path_and_contract(cdot):
    assert cdot.name == "cdot"
    assert cdot.editable == ("work.c",)
    assert "work.c" not in cdot.locked_files()
    assert "harness.py" in cdot.locked_files()


def test_unknown_name_says_what_to_do():
    with pytest.raises(HarnessNotFound, match="LAB_HARNESS_PATH"):
        load("no-such-harness")


def test_folder_without_contract(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(HarnessContractError, match="no harness.py"):
        load(tmp_path / "x")
    (tmp_path / "x" / "harness.py").write_text("X = 1\n")
    with pytest.raises(HarnessContractError, match="exactly one subclass"):
        load(tmp_path / "x")


def test_locked_file_change_refused_naming_it(cdot):
    verify_lock(cdot)  # pristine
    (cdot.root / "program.md").write_text("tampered\n")
    with pytest.raises(LockedFileChanged, match="changed: program.md"):
        verify_lock(cdot)


def test_new_file_in_harness_refused(cdot):
    (cdot.root / "sneaky.py").write_text("print(1)\n")
    with pytest.raises(LockedFileChanged, match="not in the lock: sneaky.py"):
        verify_lock(cdot)


def test_editable_change_is_fine_and_relock(cdot):
    (cdot.root / "work.c").write_text("double work(const double*x,long n){return 0;}\n")
    verify_lock(cdot)
    (cdot.root / "program.md").write_text("mine\n")
    write_lock(cdot)
    verify_lock(cdot)
    assert "program.md" in json.loads((cdot.root / "lock.json").read_text())["files"]


def test_staging_copies_only_the_editable_surface(cdot, tmp_path):
    (cdot.root / "extra.h").write_text("#define EVIL 1\n")
    h1 = stage_editable(cdot, cdot.root, tmp_path / "stage")
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["work.c"]
    (cdot.root / "work.c").write_text("// changed\n")
    assert stage_editable(cdot, cdot.root, tmp_path / "stage") != h1


def test_missing_extra_names_it(monkeypatch):
    import lab.extras

    monkeypatch.setitem(lab.extras.EXTRA_OF, "lab_absent_pkg", "cluster")
    with pytest.raises(MissingExtra, match=r"the \[cluster\] extra"):
        require("lab_absent_pkg")


def test_records_round_trip_through_json():
    s = Sample(seconds=0.5, value=2.0, work={"steps": 4})
    ev = Evaluation(harness="h", candidate_build=Build(ok=True, source_hash="abc"),
                    check=Check(passed=False, items=[CheckItem("x", False, {"v": 1.0}, "bad")]),
                    pairs=[Pair(index=0, order="AB", incumbent=s, candidate=Sample(seconds=0.25, value=4.0))])
    back = Evaluation.from_dict(json.loads(ev.to_json()))
    assert back == ev
    assert isinstance(back.pairs[0].incumbent, Sample)
    assert back.check.failures() == ["x: bad"]
    assert back.pairs[0].log_ratio() == pytest.approx(-0.6931, abs=1e-4)
    assert Verdict(status="KEEP", median=-0.6931471805599453).speedup == pytest.approx(2.0)
    assert json.loads(Sample(seconds=float("nan"), value=1).to_json())["seconds"] is None
