"""solutions/expected.json, the one schema every harness's known-good and known-bad candidates
follow, read and validated in one place (tests/test_solutions.py checks every harness's file;
each harness's own tests take their cases from `expected`).

    {"<patch, relative to solutions/>": "<Status>" | {"status": "<Status>", "reason": "<text>"}}

The Status (lab.records.Status) is the verdict of the patch applied to the pristine harness and
evaluated against it: KEEP (faster, correct), SAME, WORSE, FAIL, CRASH, TIMEOUT, REJECTED (the
guard refuses it, nothing is built), or PASS (correct; judged by the oracle alone, its speed not
at stake). `reason`, where given, is text the verdict's reason must contain (e.g. "build limit").
Patches under solutions/measure/ are tools of the measurement scripts (scripts/aa_replay.py), not
candidates with a verdict: expected.json leaves them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lab.records import Status

FILE = "expected.json"


@dataclass(frozen=True)
class Expected:
    status: Status
    reason: str = ""


class SchemaError(ValueError):
    pass


def parse(data, patches: set[str] | None = None) -> dict[str, Expected]:
    """`data` (expected.json's content) checked against the schema; `patches`: the .patch files
    shipped, each of which it must name, and nothing else."""
    if not isinstance(data, dict) or not data:
        raise SchemaError(f"{FILE} must be a non-empty object of patch -> expected verdict")
    out = {}
    for patch, value in data.items():
        if not patch.endswith(".patch"):
            raise SchemaError(f"{patch}: a key names a .patch file under solutions/")
        if isinstance(value, dict):
            if set(value) - {"status", "reason"} or "status" not in value:
                raise SchemaError(f"{patch}: an object holds 'status' and optionally 'reason', not {sorted(value)}")
            status, reason = value["status"], value.get("reason", "")
            if not isinstance(reason, str) or not reason:
                raise SchemaError(f"{patch}: 'reason' is the text the verdict's reason must contain")
        else:
            status, reason = value, ""
        if status not in {s.value for s in Status}:
            raise SchemaError(f"{patch}: {status!r} is not a Status ({', '.join(s.value for s in Status)})")
        out[patch] = Expected(Status(status), reason)
    if patches is not None and set(out) != patches:
        raise SchemaError(f"{FILE} and the shipped patches differ: not listed {sorted(patches - set(out))}, "
                          f"listed but missing {sorted(set(out) - patches)}")
    return out


def shipped(harness_root: Path) -> set[str]:
    """The candidate patches under solutions/ (measure/ left out)."""
    folder = Path(harness_root) / "solutions"
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.patch")
            if p.relative_to(folder).parts[0] != "measure"}


def expected(harness_root: Path) -> dict[str, Expected]:
    """The harness's solutions/expected.json, validated (and complete: every shipped patch)."""
    path = Path(harness_root) / "solutions" / FILE
    return parse(json.loads(path.read_text()), shipped(harness_root))
