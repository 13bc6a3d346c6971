"""Bundles are hostile input (issue 17.3, 17.4, 16.5): only bundle.json and the harness's editable
files are taken; no git configuration of the bundle is honoured; every recorded hash is compared;
a flipped bit is refused by the bundle's own digest before anything runs; `ok` means reproduced,
and the exit code says which part failed. One kept cdot result is exported once per session
(conftest.kept_cdot)."""

import io
import json
import tarfile

import pytest

from lab.bundle import EXIT_CODES, content_digest, reproduce, speedup_consistent
from lab.envs import get
from lab.errors import BundleError
from lab.harness import load
from lab.loop import Lab, Settings

from conftest import git, lab_cli
from test_workspace_apply import BINARY, MODE_CHANGE, SUBMODULE, SYMLINK_AS_WORK


@pytest.fixture(scope="module")
def kept(kept_cdot):
    """(repo, harness, run folder, bundle) of one KEEP of cdot (the session's, conftest)."""
    return kept_cdot


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _pack(out, files, extra=()):
    """A bundle of `files` (name -> bytes) plus raw TarInfo entries `extra` ((info, bytes or None))."""
    with tarfile.open(out, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info, blob in extra:
            tar.addfile(info, io.BytesIO(blob) if blob is not None else None)
    return out


def _edited(path, out, change, redigest=True):
    files = _members(path)
    data = json.loads(files["bundle.json"])
    change(data)
    if redigest:
        data["digest"] = content_digest(data)
    files["bundle.json"] = json.dumps(data).encode()
    return _pack(out, files)


def _refused(bundle, harness, work, match):
    with pytest.raises(BundleError, match=match):
        reproduce(bundle, harness, get("native"), work)
    assert not (work / "replay").exists() and not (work / "timing").exists(), "something ran"


def test_git_config_filter_and_attributes_in_a_bundle_are_refused_and_never_run(kept, tmp_path):
    _, harness, _, path = kept
    marker = tmp_path / "MARKER"
    evil = f'[filter "evil"]\n\tclean = touch {marker}; cat\n\tsmudge = touch {marker}; cat\n'.encode()
    files = _members(path)
    for extra in ({"base/.git/config": evil, "base/.git/HEAD": b"ref: refs/heads/main\n"},
                  {"base/.gitattributes": b"* filter=evil\n"}):
        bad = _pack(tmp_path / "evil.tar.gz", {**files, **extra})
        _refused(bad, harness, tmp_path / "r", r"holds 'base/\.git")
    assert not marker.exists()


def test_anything_but_bundle_json_and_editable_files_is_refused_by_name(kept, tmp_path):
    _, harness, _, path = kept
    files = _members(path)
    bad = _pack(tmp_path / "a.tar.gz", {**files, "base/harness.py": b"print('x')\n"})
    _refused(bad, harness, tmp_path / "r", "holds 'base/harness.py'")
    bad = _pack(tmp_path / "b.tar.gz", {**files, "run.sh": b"echo\n"})
    _refused(bad, harness, tmp_path / "r", "holds 'run.sh'")
    link = tarfile.TarInfo("base/work.c")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = _pack(tmp_path / "c.tar.gz", {"bundle.json": files["bundle.json"]}, [(link, None)])
    _refused(bad, harness, tmp_path / "r", "holds 'base/work.c'")


def test_a_flipped_bit_in_a_recorded_sample_is_refused_before_anything_runs(kept, tmp_path):
    _, harness, _, path = kept

    def flip(data):
        s = data["pairs"][3]["candidate"]
        s["seconds"] = float.fromhex(s["seconds"].hex()[:-1] + ("1" if s["seconds"].hex()[-1] == "0" else "0"))
    bad = _edited(path, tmp_path / "flip.tar.gz", flip, redigest=False)
    _refused(bad, harness, tmp_path / "r", "does not match its own digest")


def test_every_recorded_hash_is_compared(kept, tmp_path):
    _, harness, _, path = kept
    cases = [
        (lambda d: d.update(harness_lock="0" * 64), "harness lock digest"),
        (lambda d: d.update(base_source="0" * 64), "base files do not match"),
        (lambda d: d["fingerprint"].update(candidate_source="0" * 64), "recorded candidate_source"),
        (lambda d: d["verdict"].update(median=d["verdict"]["median"] * 3), "does not follow from its own recorded samples"),
        (lambda d: d.update(patch=MODE_CHANGE), "mode change"),
        (lambda d: d.update(patch=SYMLINK_AS_WORK), "symlink"),
        (lambda d: d.update(patch=SUBMODULE), "submodule"),
        (lambda d: d.update(patch=BINARY), "binary patch"),
    ]
    for i, (change, match) in enumerate(cases):
        _refused(_edited(path, tmp_path / f"e{i}.tar.gz", change), harness, tmp_path / f"r{i}", match)


def test_a_bundle_with_edited_claims_is_not_reproduced(kept, tmp_path):
    """The samples and the verdict rewritten to claim 10x (the real gain is about 1.9x), the digest
    recomputed: every hash holds, so it runs, and the re-measurement says the speedup was not
    reproduced (exit 6)."""
    repo, harness, _, path = kept

    def ten_x(data):
        for p in data["pairs"]:
            p["candidate"]["seconds"] = p["incumbent"]["seconds"] / 10
            p["candidate"]["value"] = p["incumbent"]["value"] * 10
        from lab import stats
        from lab.records import Pair

        median, lo, hi = stats.median_ci(stats.log_ratios([Pair.from_dict(p) for p in data["pairs"]]))
        data["verdict"].update(median=median, ci_low=lo, ci_high=hi)
    bad = _edited(path, tmp_path / "10x.tar.gz", ten_x)
    out = lab_cli("reproduce", str(bad), "--harness", str(harness.root), "--json", "--runs", str(tmp_path / "runs"),
                  cwd=repo, env={"LAB_CACHE": str(tmp_path / "cache")})
    assert out.returncode == EXIT_CODES["speedup"], out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["failed"] == ["speedup"] and not report["ok"]
    assert report["artifact_identical"] and report["outputs_identical"] and report["correct"]
    assert report["speedup_recorded"]["speedup"] == pytest.approx(10.0)
    assert report["speedup_now"]["speedup"] < 5


def test_an_evidence_only_commit_leaves_the_bundle_reproducible_and_the_run_resumable(kept, tmp_path):
    repo, harness, run, path = kept
    evidence = repo / "docs" / "evidence" / "cdot" / "BENCH.md"
    evidence.parent.mkdir(parents=True)
    evidence.write_text("a new measurement, device and date\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "evidence only")
    colleague = load(repo / "harnesses" / "cdot")
    report = reproduce(path, colleague, get("native"), tmp_path / "r")
    assert report["ok"] and report["exit_code"] == 0, \
        f"failed {report['failed']}: claimed {report['speedup_recorded']}, re-measured {report['speedup_now']}"
    assert report["speedup_consistent"] and report["base_artifact_identical"]
    Lab.resume(run, colleague, get("native"), Settings(canary_every=0))


def test_speedup_consistency_rule():
    keep = {"status": "KEEP", "median": -0.7, "ci_low": -0.75, "ci_high": -0.65}
    assert speedup_consistent(keep, {**keep, "ci_low": -0.66, "ci_high": -0.6})
    assert not speedup_consistent(keep, {**keep, "ci_low": -0.6, "ci_high": -0.5})
    assert not speedup_consistent(keep, {**keep, "status": "SAME"})
    # Within the run's delta of each other: consistent; beyond it: not.
    near = {**keep, "delta": 0.02}
    assert speedup_consistent(near, {**near, "ci_low": -0.64, "ci_high": -0.55})
    assert not speedup_consistent(near, {**near, "ci_low": -0.6, "ci_high": -0.5})
