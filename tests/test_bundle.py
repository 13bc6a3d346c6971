"""Export a kept result and reproduce it: natively, and inside the published image pulled back by
digest (a real engine and registry); every refusal before anything is applied."""

import json
import tarfile

import pytest

from lab.bundle import content_digest, export, reproduce
from lab.envs import get
from lab.errors import BundleError
from lab.harness import load
from lab.loop import Lab, Settings
from lab.agents import Proposal
from lab.workspace import git

from conftest import CDOT, lab_cli, locked_copy

# Two accumulator chains: ~1.9x on the CPUs tried, and stable from one session to the next. (The
# volatile-accumulator pair gave 10x to 20x from one session to the next on a shared 2-core VM:
# too load-sensitive for a test whose pass needs the re-measured CI to overlap the recorded one.)
TWO = (CDOT / "solutions" / "correct" / "two-accumulators.patch").read_text()


def _kept_run(harness, repo, env):
    """A run whose one experiment (the two-chain patch, ~1.9x) was kept and confirmed. A fixture,
    not an assertion: on a loaded 2-core machine a confirming run was seen to come back short
    (once in CI while other jobs ran beside it), so a second run is allowed before giving up."""
    for attempt in range(2):
        lab = Lab.start(harness, repo / "runs", env, Settings(delta=0.02, canary_every=0))
        lab.measure_noise()
        event = lab.experiment(Proposal(patch=TWO, hypothesis="two chains"))
        if event["verdict"]["status"] == "KEEP":
            return lab
    assert event["verdict"]["status"] == "KEEP", event["verdict"]
    return lab


@pytest.fixture
def bundle(kept_cdot, cdot):
    """The session's kept cdot bundle, and a fresh locked cdot of the same files (the colleague's
    harness, which a test may change)."""
    return kept_cdot[3], cdot


def test_native_bundle_reproduces_bit_for_bit(bundle, tmp_path):
    path, harness = bundle
    data = json.load(tarfile.open(path).extractfile("bundle.json"))
    assert data["patch"].startswith("diff --git a/work.c b/work.c")
    assert data["oracle_seeds"] and data["output_hashes"] and data["pairs"]
    report = reproduce(path, harness, get("native"), tmp_path / "repro")
    assert report["ok"], {k: report[k] for k in ("failed", "speedup_recorded", "speedup_now", "verdict_recorded",
                                                 "artifact_identical", "outputs_identical", "correct")}
    assert report["artifact_identical"] and report["outputs_identical"] and report["correct"]
    assert report["verdict_now"] == "KEEP" and report["speedup_now"]["speedup"] > 1.3


def test_truncated_bundle_refused(bundle, tmp_path):
    path, harness = bundle
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated"):
        reproduce(cut, harness, get("native"), tmp_path / "r")
    assert not (tmp_path / "r" / "candidate").exists()


def _rewrite(path, tmp_path, change, redigest=True):
    """The bundle with bundle.json changed; its digest recomputed unless redigest is False (an
    attacker can recompute it: the digest catches damage, re-measurement catches lies)."""
    src = tmp_path / "unpacked"
    with tarfile.open(path) as tar:
        tar.extractall(src)
    data = json.loads((src / "bundle.json").read_text())
    change(data)
    if redigest:
        data["digest"] = content_digest(data)
    (src / "bundle.json").write_text(json.dumps(data))
    out = tmp_path / "changed.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src / "bundle.json", arcname="bundle.json")
        tar.add(src / "base", arcname="base")
    return out


def test_patch_touching_a_locked_file_refused(bundle, tmp_path):
    path, harness = bundle
    bad = _rewrite(path, tmp_path, lambda d: d.update(
        patch="--- a/harness.py\n+++ b/harness.py\n@@ -1 +1 @@\n-x\n+y\n"))
    with pytest.raises(BundleError, match="outside the editable surface"):
        reproduce(bad, harness, get("native"), tmp_path / "r")
    assert not (tmp_path / "r" / "candidate").exists()


def test_malformed_bundle_refused(bundle, tmp_path):
    path, harness = bundle
    bad = _rewrite(path, tmp_path, lambda d: d.pop("oracle_seeds"))
    with pytest.raises(BundleError, match="lacks oracle_seeds"):
        reproduce(bad, harness, get("native"), tmp_path / "r")


def test_different_local_harness_refused(bundle, tmp_path):
    path, harness = bundle
    (harness.root / "program.md").write_text("changed locally\n")
    with pytest.raises(BundleError, match="differs from the bundle's in its locked files: program.md"):
        reproduce(path, harness, get("native"), tmp_path / "r")


@pytest.mark.docker
@pytest.mark.slow
def test_reproduce_inside_the_pulled_image(published, docker_client, tmp_path):
    """A kept result made inside the published CPU image, exported, the image deleted locally,
    then `lab reproduce` pulls it back by digest and rebuilds bit for bit."""
    from lab.envs.docker import DockerEnv
    from lab.harness import load

    _, record, _ = published
    repo = tmp_path / "project"
    harness = load(locked_copy(repo / "cdot"))
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    git(repo, "-c", "user.email=t@e", "-c", "user.name=t", "add", "-A")
    git(repo, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "base")
    git(repo, "config", "user.email", "t@e")
    git(repo, "config", "user.name", "t")
    lab = _kept_run(harness, repo, DockerEnv(harness, image=record["image"]))
    assert "@sha256:" in lab.folder.meta["environment"]
    path = export(lab.folder.path, harness)

    docker_client.images.remove(record["image"], force=True)
    out = lab_cli("reproduce", str(path), "--harness", str(harness.root), "--json", "--runs", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["environment_now"] == record["image"]
    assert report["artifact_identical"] and report["outputs_identical"], report


def test_a_bundle_measured_on_a_chosen_model_reproduces_only_on_that_model(cdot, cdot_repo, tmp_path):
    model = tmp_path / "half.txt"
    model.write_text(f"{1 << 17}\n")
    cdot.use_model(model)
    path = export(_kept_run(cdot, cdot_repo, get("native")).folder.path, cdot)
    assert json.load(tarfile.open(path).extractfile("bundle.json"))["fingerprint"]["model"]["elements"] == 1 << 17

    colleague = load(cdot.root)  # a fresh harness: its own model until --model names one
    with pytest.raises(BundleError, match="measured on the model half.txt .* give that file with --model"):
        reproduce(path, colleague, get("native"), tmp_path / "r1")
    other = tmp_path / "other.txt"
    other.write_text(f"{1 << 16}\n")
    colleague.use_model(other)
    with pytest.raises(BundleError, match="give that file with --model"):
        reproduce(path, colleague, get("native"), tmp_path / "r2")
    colleague.use_model(model)
    report = reproduce(path, colleague, get("native"), tmp_path / "r3")
    # What the model decides: the same build, the same outputs, the same verdict. Whether the
    # re-timed CI meets the recorded one is test_native_bundle_reproduces_bit_for_bit's claim; here,
    # minutes apart beside the other xdist worker's load, 1.72x (CI 1.69-1.75) met a recorded 1.80x
    # (1.78-1.82) on 2026-12-03 and failed a test that is about the model.
    assert report["correct"] and report["outputs_identical"] and report["artifact_identical"], report["failed"]
    assert report["verdict_now"] == report["verdict_recorded"] == "KEEP", report["failed"]


def test_a_bundle_on_the_harness_model_refuses_another(bundle, tmp_path):
    path, harness = bundle
    model = tmp_path / "half.txt"
    model.write_text(f"{1 << 17}\n")
    harness.use_model(model)
    with pytest.raises(BundleError, match="harness's own model: leave --model out"):
        reproduce(path, harness, get("native"), tmp_path / "r")
