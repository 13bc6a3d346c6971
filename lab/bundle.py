"""Export a result as a bundle; reproduce a bundle, bit for bit where it can be.

A bundle is one `.tar.gz` holding `bundle.json` and `base/` (the editable files the patch
applies to: the incumbent the experiment was measured against). `bundle.json` says everything
needed to judge a reproduction: the harness and its lock hashes, the base source commit, the
patch (relative to the harness's source tree), the environment by digest, the fingerprint, the
oracle's seeds and output hashes, the build artifact hashes, the raw samples and the verdicts,
and `digest`: the sha256 of all of that (its canonical JSON), so that a flipped bit anywhere
(the base files are covered by `base_source`) is refused before anything runs.

A bundle is hostile input. `reproduce` takes from it only `bundle.json` and regular files of the
harness's editable surface under `base/` (any other entry is refused by name, nothing is
extracted wholesale, no git configuration or attribute in it is ever read); it refuses a bundle
whose digest, harness (name, lock digest, every locked file), model, base files or patch do not
match, or whose recorded verdict does not follow from its own recorded samples. Then it applies
the patch with the lab's one patch routine, rebuilds, replays the oracle on the recorded seeds,
re-times the candidate against the bundle's base, and reports claim and re-measurement side by
side. `ok` means reproduced: correct, artifacts and outputs identical, and the speedup
consistent (the same verdict, the new CI overlapping the recorded one). The exit code of
`lab reproduce` says which part failed (EXIT_CODES).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from . import stats
from .envs import Env
from .errors import BundleError, LabError, PatchRejected
from .evaluate import run_evaluation
from .harness import Harness, sha256_text, stage_editable, tree_hash
from .records import KEEP, SCHEMA_VERSION, Evaluation, Pair
from .store import RunFolder, event_status
from .git import git
from .workspace import Workspace, apply_patch, guard_patch

BUNDLE_FILE = "bundle.json"
BASE = "base"
REQUIRED = ("schema_version", "harness", "harness_lock", "lock_files", "patch", "environment",
            "oracle_seeds", "output_hashes", "artifact_sha256", "verdict", "base_source", "digest")
MAX_BYTES = 256 << 20  # everything a bundle may unpack to; the editable surfaces are far smaller

# `lab reproduce` exits with the first of these that applies (docs/reproduce.md).
EXIT_CODES = {
    "reproduced": 0,   # correct, artifacts and outputs identical, speedup consistent
    "refused": 2,      # nothing ran: damaged or hostile bundle, other harness, model or environment
    "incorrect": 3,    # the oracle failed on the recorded seeds
    "outputs": 4,      # correct, but the outputs on the recorded seeds differ from the recorded hashes
    "artifact": 5,     # the build artifact (candidate or base) is not bit-identical
    "speedup": 6,      # the re-measured verdict differs, or its CI does not overlap the recorded CI
}


def content_digest(data: dict) -> str:
    """sha256 of a bundle.json's canonical JSON without its own `digest` field."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return sha256_text(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False))


# --- export ------------------------------------------------------------------------------------
def export(run_path: Path, harness: Harness, experiment: str | None = None, out: Path | None = None) -> Path:
    """Write the bundle of one experiment of a run (default: the last kept one)."""
    folder = RunFolder.open(run_path)
    meta, events = folder.meta, folder.events()
    event = _chosen_experiment(events, run_path, experiment)
    kept_commit = next((k["commit"] for k in events if k["type"] == "kept" and k["number"] == event["number"]),
                       event["commit"])
    record = Evaluation.from_dict(json.loads((folder.path / event["record"]).read_text()))
    if record.check is None or record.candidate_build is None:
        raise LabError(f"experiment #{event['number']} never passed the oracle: nothing to reproduce")
    workspace = Workspace.attach(harness, folder.worktree)
    # The base is the incumbent this experiment was timed against, so that the recorded verdict
    # and the re-measured one compare the same two sources.
    base = event.get("measured_against") or _incumbent_before(events, event["seq"], meta["base_commit"])
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / BASE
        files = _checkout_editable(workspace, base, base_tree)
        data = _bundle_data(harness, meta, events, event, record, base=base, commit=kept_commit,
                            patch=workspace.diff(base, kept_commit), base_source=tree_hash(base_tree, files))
        out = out or folder.path / "bundles" / f"{meta['id']}-{event['number']:04d}.tar.gz"
        _write_bundle(out, data, base_tree, files)
    return out


def _chosen_experiment(events: list[dict], run_path: Path, experiment: str | None) -> dict:
    """The `evaluated` event of `experiment` (a number or a commit prefix), else the last kept one."""
    evaluated = [e for e in events if e["type"] == "evaluated"]
    if experiment:
        chosen = [e for e in evaluated if e["commit"].startswith(experiment) or str(e["number"]) == experiment]
        if not chosen:
            raise LabError(f"{run_path} has no evaluated experiment {experiment}; see `lab log {run_path}`")
        return chosen[-1]
    kept = [e for e in evaluated if event_status(e) == KEEP]
    if not kept:
        raise LabError(f"{run_path} has no kept experiment to export; name one with --experiment")
    return kept[-1]


def _bundle_data(harness: Harness, meta: dict, events: list[dict], event: dict, record: Evaluation, *,
                 base: str, commit: str, patch: str, base_source: str) -> dict:
    """bundle.json: what was claimed (verdict, pairs, hashes) and what reproduces it, with its digest."""
    data = {
        "schema_version": SCHEMA_VERSION,
        "harness": harness.name,
        "harness_lock": meta.get("harness_lock") or harness.lock_digest(),
        "lock_files": harness.lock_hashes(),
        "base_commit": base,
        "run_base_commit": meta["base_commit"],
        "commit": commit,
        "experiment": event["number"],
        "hypothesis": event.get("description", ""),
        "patch": patch,
        "base_source": base_source,
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
    data["digest"] = content_digest(data)
    return data


def _write_bundle(out: Path, data: dict, base_tree: Path, files: list[str]) -> None:
    """The bundle file, whole or not at all: bundle.json and the base's editable files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp_out, "w:gz") as tar:
        _add_file(tar, BUNDLE_FILE, json.dumps(data, indent=1).encode())
        for rel in sorted(files):
            _add_file(tar, f"{BASE}/{rel}", (base_tree / rel).read_bytes())
    tmp_out.replace(out)


def _incumbent_before(events: list[dict], seq: int, run_base: str) -> str:
    """The incumbent when the event numbered `seq` was evaluated: the last kept commit before it."""
    kept = [e["commit"] for e in events if e["type"] == "kept" and e["seq"] < seq]
    return kept[-1] if kept else run_base


def _add_file(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(blob), 0o644, 0
    tar.addfile(info, io.BytesIO(blob))


def _checkout_editable(workspace: Workspace, commit: str, dest: Path) -> list[str]:
    """The editable files of the source tree at `commit`, written to `dest`; their paths."""
    rel = [workspace.prefix] if workspace.prefix else []
    listing = git(workspace.worktree, "ls-tree", "-r", "-z", commit, "--", *rel).split("\0")
    files = []
    for entry in filter(None, listing):
        mode_type_object, path = entry.split("\t", 1)
        mode, _, obj = mode_type_object.split()
        inner = path[len(workspace.prefix) + 1:] if workspace.prefix else path
        if not workspace.harness.is_editable(inner):
            continue
        if mode not in ("100644", "100755"):
            raise LabError(f"{inner} at {commit[:12]} is not a regular file (mode {mode}); it cannot be exported")
        target = dest / inner
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_blob(workspace.worktree, obj))
        files.append(inner)
    return files


def _blob(worktree: Path, obj: str) -> bytes:
    return git(worktree, "cat-file", "blob", obj, text=False)


# --- reproduce ---------------------------------------------------------------------------------
def _unreadable(path: Path, exc: BaseException) -> BundleError:
    return BundleError(f"{path} is not a readable bundle ({exc.__class__.__name__}: {exc}); "
                       "it may be truncated: export it again")


def peek(path: Path) -> dict:
    """bundle.json alone, without unpacking: to choose the harness and the environment."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.getmember(BUNDLE_FILE)
            if not member.isfile() or member.size > MAX_BYTES:
                raise BundleError(f"{path}: {BUNDLE_FILE} is not a regular file of a sane size; refusing it")
            data = json.load(tar.extractfile(member))
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is malformed: {BUNDLE_FILE} is not a JSON object")
    return data


def _editable_entry(name: str, harness: Harness) -> str | None:
    """The harness-relative path of a `base/...` entry that is an editable file; None otherwise."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or len(pure.parts) < 2 or pure.parts[0] != BASE:
        return None
    rel = PurePosixPath(*pure.parts[1:])
    if any(part in ("", ".", "..") or part.lower().startswith(".git") for part in rel.parts):
        return None
    return rel.as_posix() if harness.is_editable(rel.as_posix()) else None


def read_bundle(path: Path, dest: Path, harness: Harness) -> dict:
    """bundle.json and the base's editable files (into dest/base), or BundleError naming the first
    entry that is neither. Nothing is extracted wholesale; every write is a regular file we make."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            taken: dict[str, tarfile.TarInfo] = {}
            folders = set()
            for m in members:
                name = m.name[2:] if m.name.startswith("./") else m.name
                name = name.rstrip("/")
                if m.isdir() and (name == BASE or (name.startswith(BASE + "/") and ".." not in name.split("/"))):
                    folders.add(name)
                    continue
                key = BUNDLE_FILE if name == BUNDLE_FILE else _editable_entry(name, harness)
                if not m.isfile() or key is None:
                    raise BundleError(f"{path} holds '{m.name}', which is neither {BUNDLE_FILE} nor an editable "
                                      f"file of '{harness.name}' under {BASE}/; refusing the bundle")
                if key in taken:
                    raise BundleError(f"{path} holds '{m.name}' twice; refusing the bundle")
                taken[key] = m
            if sum(m.size for m in taken.values()) > MAX_BYTES:
                raise BundleError(f"{path} unpacks to more than {MAX_BYTES >> 20} MiB; refusing it")
            parents = {BASE} | {f"{BASE}/{p}" for k in taken if k != BUNDLE_FILE
                                for p in (str(q) for q in PurePosixPath(k).parents) if p != "."}
            stray = sorted(folders - parents)
            if stray:
                raise BundleError(f"{path} holds the folder '{stray[0]}', which holds no editable file; refusing the bundle")
            if BUNDLE_FILE not in taken:
                raise BundleError(f"{path} is malformed: it has no {BUNDLE_FILE}")
            base = dest / BASE
            base.mkdir(parents=True)
            for key, m in taken.items():
                blob = tar.extractfile(m).read()
                if key == BUNDLE_FILE:
                    data = json.loads(blob)
                    continue
                target = base / key
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is malformed: {BUNDLE_FILE} is not a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise BundleError(f"{path} is malformed: bundle.json lacks {', '.join(missing)}"
                          + (" (a bundle of an older lab, without a digest of its contents: export it again)"
                             if missing == ["digest"] else ""))
    if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
        raise BundleError(f"{path} was written by a newer lab (schema {data['schema_version']}); upgrade the lab")
    if content_digest(data) != data["digest"]:
        raise BundleError(f"{path} does not match its own digest: its bundle.json was changed or damaged "
                          "after export; refusing it (ask for the bundle again)")
    return data


def check_bundle(data: dict, harness: Harness) -> None:
    """Refuse before anything is applied: another harness, other locked files, a locked path."""
    if data["harness"] != harness.name:
        raise BundleError(f"the bundle is for harness '{data['harness']}', not '{harness.name}'")
    local = harness.lock_hashes()
    recorded_files = data["lock_files"] if isinstance(data["lock_files"], dict) else {}
    differ = sorted(p for p in set(local) | set(recorded_files) if local.get(p) != recorded_files.get(p))
    if differ:
        raise BundleError(
            f"the local harness '{harness.name}' differs from the bundle's in its locked files: "
            + ", ".join(differ[:6]) + ("..." if len(differ) > 6 else "")
            + "; check out the harness at the bundle's commit " + str(data.get("base_commit", ""))[:12])
    if data["harness_lock"] != harness.lock_digest():
        raise BundleError(f"the bundle's harness lock digest {str(data['harness_lock'])[:16]} is not the local "
                          f"harness's {harness.lock_digest()[:16]}; check out the harness at the bundle's commit")
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
    _check_claims(data)


def _check_claims(data: dict) -> None:
    """The recorded verdict must follow from the recorded samples (when no block was dropped)."""
    v = data["verdict"] if isinstance(data["verdict"], dict) else {}
    if v.get("median") is None or v.get("dropped_pairs"):
        return
    try:
        pairs = [Pair.from_dict(p) for p in data.get("pairs") or []]
        ratios = stats.log_ratios(pairs)
        median, lo, hi = stats.median_ci(ratios)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BundleError(f"the bundle's recorded samples cannot be read ({exc}); refusing it") from None
    if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in
               ((median, v["median"]), (lo, v.get("ci_low")), (hi, v.get("ci_high")))
               if isinstance(b, (int, float))) or len(pairs) != v.get("pairs", len(pairs)):
        raise BundleError("the bundle's recorded verdict does not follow from its own recorded samples "
                          f"(they give {stats.speedup(median):.4f}x, it claims {stats.speedup(v['median']):.4f}x); refusing it")


def reproduce(bundle: Path, harness: Harness, env: Env, work: Path) -> dict:
    """Rebuild, re-check on the recorded seeds, re-time against the base; claim and re-measurement
    side by side, `ok` only when reproduced, `exit_code` saying which part failed."""
    work.mkdir(parents=True, exist_ok=True)
    unpacked = Path(tempfile.mkdtemp(dir=work, prefix="bundle-"))
    data = read_bundle(bundle, unpacked, harness)
    check_bundle(data, harness)
    base_tree = unpacked / BASE
    candidate_tree = _candidate_tree(data, harness, base_tree, work / "candidate")
    env.preflight()  # pulls the image by digest when the engine lacks it
    recorded_v = data["verdict"]
    delta = min(max(float(recorded_v.get("delta") or stats.MIN_DELTA), stats.MIN_DELTA), 0.5)
    replay = run_evaluation(harness, candidate_tree, work / "replay", env=env, mode="check",
                            check_seeds=data["oracle_seeds"])
    timing = run_evaluation(harness, candidate_tree, work / "timing", env=env, mode="evaluate",
                            incumbent_tree=base_tree, delta=delta)
    report = {"bundle": str(bundle), "harness": harness.name, "experiment": data.get("experiment"),
              "hypothesis": data.get("hypothesis"), "environment_recorded": data["environment"],
              "environment_now": env.reference(), **_comparison(data, replay.evaluation, timing)}
    failed = [name for name, good in (("incorrect", report["correct"]), ("outputs", report["outputs_identical"]),
                                      ("artifact", report["artifact_identical"] and report["base_artifact_identical"]),
                                      ("speedup", report["speedup_consistent"])) if not good]
    report["failed"] = failed
    report["ok"] = not failed
    report["exit_code"] = EXIT_CODES[failed[0]] if failed else EXIT_CODES["reproduced"]
    return report


def _candidate_tree(data: dict, harness: Harness, base_tree: Path, dest: Path) -> Path:
    """The bundle's base with its patch applied, staged at `dest`; refused unless both sources are
    the ones the bundle recorded."""
    if tree_hash(base_tree, harness.editable_files(base_tree)) != data["base_source"]:
        raise BundleError("the bundle's base files do not match their recorded hash; it is damaged")
    stage_editable(harness, base_tree, dest)
    try:
        apply_patch(data["patch"], dest, harness)
    except PatchRejected as exc:
        raise BundleError(f"the bundle's patch does not apply to its own base: {exc}") from None
    recorded_fp = data.get("fingerprint") or {}
    candidate_source = tree_hash(dest, harness.editable_files(dest))
    for field, now in (("candidate_source", candidate_source), ("incumbent_source", data["base_source"])):
        if recorded_fp.get(field) not in (None, now):
            raise BundleError(f"the bundle's patched source does not match its recorded {field} "
                              f"({str(recorded_fp.get(field))[:16]} recorded, {now[:16]} now); refusing it")
    return dest


def _comparison(data: dict, ev: Evaluation, timing) -> dict:
    """The recorded claim beside the re-measurement: correctness, outputs, artifacts, verdict,
    speedup and fingerprint (`ev`: the check on the recorded seeds; `timing`: the re-timing)."""
    from .system.fingerprint import differences

    tv, now_v, recorded_v = timing.evaluation, timing.verdict, data["verdict"]
    builds = [b for b in (ev.candidate_build, tv.candidate_build) if b is not None]
    return {
        "correct": bool(ev.check and ev.check.passed),
        "check_lines": ev.check.lines if ev.check else [ev.reason],
        "artifact_identical": bool(builds) and all(b.artifact_sha256 == data["artifact_sha256"] for b in builds),
        "artifact_recorded": data["artifact_sha256"],
        "artifact_now": ev.candidate_build.artifact_sha256 if ev.candidate_build else "",
        "base_artifact_identical": (not data.get("incumbent_artifact_sha256")) or bool(
            tv.incumbent_build and tv.incumbent_build.artifact_sha256 == data["incumbent_artifact_sha256"]),
        "base_artifact_recorded": data.get("incumbent_artifact_sha256", ""),
        "base_artifact_now": tv.incumbent_build.artifact_sha256 if tv.incumbent_build else "",
        "outputs_identical": bool(ev.check and ev.check.output_hashes == data["output_hashes"]),
        "verdict_recorded": recorded_v.get("status"), "verdict_now": now_v.status,
        "speedup_recorded": _speed(recorded_v), "speedup_recorded_cumulative": data.get("cumulative_speedup"),
        "speedup_now": _speed(now_v.to_dict()),
        "speedup_consistent": speedup_consistent(recorded_v, now_v.to_dict()),
        "fingerprint_differences": differences(data.get("fingerprint") or {}, tv.fingerprint or {}),
    }


def speedup_consistent(recorded: dict, now: dict) -> bool:
    """The same verdict, and (where both have one) the new CI overlapping the recorded CI, each
    widened by the run's decision threshold delta. A CI holds the noise within one evaluation,
    not between two processes on two days: seen on a 2-core VM, the same 1.8x result measured
    1.81x (CI 1.79-1.83) and 1.86x (1.84-1.88) in two sessions. delta is the lab's own measured
    resolution between processes (from the A/A floor), so a gap within it is no contradiction."""
    if not recorded or not now or recorded.get("status") != now.get("status"):
        return False
    bounds = [recorded.get("ci_low"), recorded.get("ci_high"), now.get("ci_low"), now.get("ci_high")]
    if any(b is None for b in bounds):
        return recorded.get("median") is None and now.get("median") is None
    r_lo, r_hi, n_lo, n_hi = bounds
    slack = math.log1p(max(recorded.get("delta") or 0.0, now.get("delta") or 0.0))
    return n_lo <= r_hi + slack and r_lo <= n_hi + slack


def _speed(v: dict) -> dict:
    if not v or v.get("median") is None:
        return {"status": (v or {}).get("status")}
    ci = stats.speedup_ci(v.get("ci_low"), v.get("ci_high"))
    return {"status": v.get("status"), "speedup": stats.speedup(v["median"]), "ci": list(ci) if ci else None,
            "pairs": v.get("pairs")}
