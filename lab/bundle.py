"""Export a result as a bundle; reproduce a bundle, bit for bit where it can be.

A bundle is one `.tar.gz` holding `bundle.json` and `base/` (the editable files the patch
applies to). `bundle.json` says everything needed to judge a reproduction: the harness and
its lock hashes, the base source commit, the patch (relative to the harness's source tree), the
environment by digest, the fingerprint, the oracle's seeds and output hashes, the build
artifact hashes, the raw samples and the verdicts.

`reproduce` refuses a bundle that is truncated or malformed, whose harness differs from the
local one, whose patch touches a locked file, or whose environment cannot be had; then it
rebuilds, replays the oracle on the recorded seeds, times against the baseline measured anew,
and reports side by side.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .envs import Env
from .errors import BundleError, LabError, PatchRejected
from .evaluate import run_evaluation
from .harness import Harness, tree_hash
from .records import SCHEMA_VERSION, Evaluation
from .store import RunFolder
from .workspace import Workspace, git, guard_patch

BUNDLE_FILE = "bundle.json"
REQUIRED = ("schema_version", "harness", "harness_lock", "lock_files", "patch", "environment",
            "oracle_seeds", "output_hashes", "artifact_sha256", "verdict", "base_source")


# --- export ------------------------------------------------------------------------------------
def export(run_path: Path, harness: Harness, experiment: str | None = None, out: Path | None = None) -> Path:
    """Write the bundle of one experiment of a run (default: the last kept one)."""
    folder = RunFolder.open(run_path)
    meta, events = folder.meta, folder.events()
    evaluated = [e for e in events if e["type"] == "evaluated"]
    if experiment:
        chosen = [e for e in evaluated if e["commit"].startswith(experiment)
                  or str(e["number"]) == experiment]
        if not chosen:
            raise LabError(f"{run_path} has no evaluated experiment {experiment}; see `lab log {run_path}`")
        event = chosen[-1]
    else:
        kept = [e for e in evaluated if e["status"] == "keep"]
        if not kept:
            raise LabError(f"{run_path} has no kept experiment to export; name one with --experiment")
        event = kept[-1]
    kept_commit = next((k["commit"] for k in events if k["type"] == "kept" and k["number"] == event["number"]),
                       event["commit"])
    record = Evaluation.from_dict(json.loads((folder.path / event["record"]).read_text()))
    if record.check is None or record.candidate_build is None:
        raise LabError(f"experiment #{event['number']} never passed the oracle: nothing to reproduce")
    workspace = Workspace.attach(harness, folder.worktree)
    base = meta["base_commit"]
    patch = workspace.diff(base, kept_commit)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        _checkout_editable(workspace, base, base_tree)
        data = {
            "schema_version": SCHEMA_VERSION,
            "harness": harness.name,
            "harness_lock": meta.get("harness_lock") or harness.lock_digest(),
            "lock_files": harness.lock_hashes(),
            "base_commit": base,
            "commit": kept_commit,
            "experiment": event["number"],
            "hypothesis": event.get("description", ""),
            "patch": patch,
            "base_source": tree_hash(base_tree, harness.editable_files(base_tree)),
            "environment": meta.get("environment", "native"),
            "fingerprint": record.fingerprint,
            "oracle_seeds": record.seeds[:-1],
            "output_hashes": record.check.output_hashes,
            "check_lines": record.check.lines,
            "artifact_sha256": record.candidate_build.artifact_sha256,
            "incumbent_artifact_sha256": record.incumbent_build.artifact_sha256 if record.incumbent_build else "",
            "verdict": event["verdict"],
            "confirmation": event.get("confirmation"),
            "cumulative_speedup": next((k.get("cumulative_speedup") for k in events
                                        if k["type"] == "kept" and k["number"] == event["number"]), None),
            "pairs": [p.to_dict() for p in record.pairs],
        }
        out = out or folder.path / "bundles" / f"{meta['id']}-{event['number']:04d}.tar.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp_out, "w:gz") as tar:
            blob = json.dumps(data, indent=1).encode()
            info = tarfile.TarInfo(BUNDLE_FILE)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            tar.add(base_tree, arcname="base")
        tmp_out.replace(out)
    return out


def _checkout_editable(workspace: Workspace, commit: str, dest: Path) -> None:
    """The editable files of the source tree at `commit`, written to `dest`."""
    rel = [workspace.prefix] if workspace.prefix else []
    listing = git(workspace.worktree, "ls-tree", "-r", "--name-only", commit, "--", *rel).splitlines()
    for path in listing:
        inner = path[len(workspace.prefix) + 1:] if workspace.prefix else path
        if workspace.harness.is_editable(inner):
            target = dest / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=workspace.worktree,
                                  capture_output=True, check=True).stdout
            target.write_bytes(blob)


# --- reproduce ---------------------------------------------------------------------------------
def _unreadable(path: Path, exc: BaseException) -> BundleError:
    return BundleError(f"{path} is not a readable bundle ({exc.__class__.__name__}: {exc}); "
                       "it may be truncated: export it again")


def peek(path: Path) -> dict:
    """bundle.json alone, without unpacking: to choose the harness and the environment."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return json.load(tar.extractfile(BUNDLE_FILE))
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise _unreadable(path, exc) from None


def read_bundle(path: Path, dest: Path) -> dict:
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts or not (
                        member.isfile() or member.isdir()):
                    raise BundleError(f"{path} holds an unsafe entry '{member.name}'; refusing it")
            tar.extractall(dest)
        data = json.loads((dest / BUNDLE_FILE).read_text())
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise BundleError(f"{path} is malformed: bundle.json lacks {', '.join(missing)}")
    if data["schema_version"] > SCHEMA_VERSION:
        raise BundleError(f"{path} was written by a newer lab (schema {data['schema_version']}); upgrade the lab")
    return data


def check_bundle(data: dict, harness: Harness) -> None:
    """Refuse before anything is applied: another harness, other locked files, a locked path."""
    if data["harness"] != harness.name:
        raise BundleError(f"the bundle is for harness '{data['harness']}', not '{harness.name}'")
    local = harness.lock_hashes()
    differ = sorted(p for p in set(local) | set(data["lock_files"]) if local.get(p) != data["lock_files"].get(p))
    if differ:
        raise BundleError(
            f"the local harness '{harness.name}' differs from the bundle's in its locked files: "
            + ", ".join(differ[:6]) + ("..." if len(differ) > 6 else "")
            + "; check out the harness at the bundle's commit " + data.get("base_commit", "")[:12])
    recorded = (data.get("fingerprint") or {}).get("model")
    now = harness.model_identity()
    if (recorded or {}).get("sha256") != (now or {}).get("sha256"):
        raise BundleError(f"the bundle was measured on the model {recorded['name']} (sha256 {recorded['sha256']}): "
                          "give that file with --model PATH" if recorded else
                          "the bundle was measured on the harness's own model: leave --model out")
    try:
        guard_patch(data["patch"], harness)
    except PatchRejected as exc:
        raise BundleError(f"the bundle's patch is refused: {exc}") from None


def reproduce(bundle: Path, harness: Harness, env: Env, work: Path) -> dict:
    """Rebuild, re-check on the recorded seeds, re-time against the baseline; a side-by-side."""
    work.mkdir(parents=True, exist_ok=True)
    unpacked = Path(tempfile.mkdtemp(dir=work, prefix="bundle-"))
    data = read_bundle(bundle, unpacked)
    check_bundle(data, harness)
    base_tree = unpacked / "base"
    if tree_hash(base_tree, harness.editable_files(base_tree)) != data["base_source"]:
        raise BundleError("the bundle's base files do not match their recorded hash; it is damaged")
    candidate_tree = work / "candidate"
    if candidate_tree.exists():
        shutil.rmtree(candidate_tree)
    shutil.copytree(base_tree, candidate_tree)
    applied = subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], cwd=candidate_tree,
                             input=data["patch"], text=True, capture_output=True)
    if data["patch"].strip() and applied.returncode != 0:
        raise BundleError(f"the bundle's patch does not apply to its own base: {applied.stderr.strip()}")
    env.preflight()  # pulls the image by digest when the engine lacks it

    replay = run_evaluation(harness, candidate_tree, work / "replay", env=env, mode="check",
                            check_seeds=data["oracle_seeds"])
    timing = run_evaluation(harness, candidate_tree, work / "timing", env=env, mode="evaluate",
                            incumbent_tree=base_tree)
    ev = replay.evaluation
    recorded_v = data["verdict"]
    now_v = timing.verdict
    from .system.fingerprint import differences

    report = {
        "bundle": str(bundle), "harness": harness.name, "experiment": data.get("experiment"),
        "hypothesis": data.get("hypothesis"), "environment_recorded": data["environment"],
        "environment_now": env.reference(),
        "correct": bool(ev.check and ev.check.passed),
        "check_lines": ev.check.lines if ev.check else [ev.reason],
        "artifact_identical": bool(ev.candidate_build and ev.candidate_build.artifact_sha256 == data["artifact_sha256"]),
        "artifact_recorded": data["artifact_sha256"],
        "artifact_now": ev.candidate_build.artifact_sha256 if ev.candidate_build else "",
        "outputs_identical": bool(ev.check and ev.check.output_hashes == data["output_hashes"]),
        "speedup_recorded": _speed(recorded_v), "speedup_recorded_cumulative": data.get("cumulative_speedup"),
        "speedup_now": _speed(now_v.to_dict()), "verdict_now": now_v.status,
        "fingerprint_differences": differences(data.get("fingerprint") or {}, timing.evaluation.fingerprint or {}),
    }
    report["ok"] = report["correct"] and report["artifact_identical"] and report["outputs_identical"]
    return report


def _speed(v: dict) -> dict:
    if not v or v.get("median") is None:
        return {"status": (v or {}).get("status")}
    return {"status": v.get("status"), "speedup": math.exp(-v["median"]),
            "ci": [math.exp(-v["ci_high"]), math.exp(-v["ci_low"])] if v.get("ci_low") is not None else None,
            "pairs": v.get("pairs")}
