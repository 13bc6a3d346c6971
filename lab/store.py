"""The run folder: the one place a run's state lives, and from which it can be resumed.

    runs/<harness>-<date>-<id>/
        run.json        what the run is (harness, base commit, branch, settings, schema version)
        events.jsonl    append-only; one JSON line per state change, fsynced before the lab acts
        results.tsv     rebuilt from events.jsonl (one row per evaluated experiment)
        log.md          rebuilt from events.jsonl (for a person, and an agent whose context reset)
        ledger/         every candidate's patch and hypothesis, kept or not
        worktree/       the run's git worktree (branch lab/<run-id>)

One process owns a run folder at a time: `hold()` takes an exclusive OS lock (flock) on `.owner`
for the life of the process (the kernel drops it when the process dies, however it dies), and a
second owner is refused with the first one's pid. Readers (log, status, export) need no lock.
Writers hold an exclusive lock on `.lock` while they append, so two lab processes never
interleave half lines. A kill -9 can at worst leave one unterminated last line, which was never
acted on (the lab acts only after the fsync returns); readers skip it and the next writer
truncates it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import sys
from pathlib import Path

from . import fmt
from .errors import RunFolderBusy, RunFolderError
from .locks import file_lock, held_elsewhere, try_lock
from .records import CRASH, FAIL, KEEP, SAME, SCHEMA_VERSION, Status, json_safe
from .scrub import scrub
from .stats import speedup, speedup_ci

RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
OWNER_FILE = ".owner"
# Run folders this process owns: resolved path -> the open file holding the flock (kept open, so
# the lock lasts as long as the process).
_HELD: dict[str, object] = {}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(harness: str) -> str:
    return f"{harness}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old or the new content, never a half. The text is
    scrubbed of secrets first (lab/scrub.py): every file of a run folder and every record the lab
    writes goes through here."""
    text = scrub(text)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.events_path = self.path / EVENTS_FILE
        self.ledger = self.path / "ledger"
        self.worktree = self.path / "worktree"

    # --- creation and opening --------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: Path, run_id: str, meta: dict) -> "RunFolder":
        folder = cls(Path(runs_dir) / run_id)
        if folder.path.exists():
            raise RunFolderError(f"run folder {folder.path} exists already; choose another id or --resume it")
        folder.ledger.mkdir(parents=True)
        data = {"schema_version": SCHEMA_VERSION, "id": run_id, "created": now_iso(), **meta}
        atomic_write(folder.path / RUN_FILE, json.dumps(data, indent=1) + "\n")
        folder.events_path.touch()
        folder.hold()
        return folder

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        folder = cls(Path(path))
        run_file = folder.path / RUN_FILE
        if not run_file.exists():
            raise RunFolderError(f"{folder.path} is not a run folder (no {RUN_FILE}); give a path under runs/")
        try:
            meta = json.loads(run_file.read_text())
        except ValueError as exc:
            raise RunFolderError(f"{run_file} is damaged ({exc}); the run cannot be opened") from None
        version = meta.get("schema_version", 0)
        if version > SCHEMA_VERSION:
            raise RunFolderError(
                f"{folder.path} was written by a newer lab (schema {version}, this lab reads up to "
                f"{SCHEMA_VERSION}); upgrade the lab (`pip install -e .` in a newer checkout)"
            )
        return folder

    def hold(self) -> None:
        """Own this run folder for the rest of the process's life, or raise RunFolderBusy naming
        the process that owns it. Idempotent within one process."""
        key = str(self.path.resolve())
        if key in _HELD:
            return
        f = try_lock(self.path / OWNER_FILE, "a+")
        if f is None:
            try:
                holder = (self.path / OWNER_FILE).read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise RunFolderBusy(
                f"{self.path} is in use by {holder}; one process owns a run folder at a time: wait for it "
                "to finish or stop it, then resume")
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(sys.argv[:4])[:200]}, since {now_iso()})\n")
        f.flush()
        _HELD[key] = f

    def owner(self) -> int | None:
        """The pid of the live process that owns this folder (`hold`), 0 when its pid is not yet
        written, None when no process owns it. A shared lock is tried and dropped at once: readers
        never wait, and a process taking ownership at that very instant is refused as busy."""
        if str(self.path.resolve()) in _HELD:
            return os.getpid()
        try:
            if not held_elsewhere(self.path / OWNER_FILE):
                return None
            words = (self.path / OWNER_FILE).read_text().split()
        except FileNotFoundError:
            return None  # never owned
        return int(words[1]) if len(words) > 1 and words[0] == "process" and words[1].isdigit() else 0

    @property
    def meta(self) -> dict:
        return json.loads((self.path / RUN_FILE).read_text())

    def update_meta(self, **changes) -> None:
        with self.locked():
            atomic_write(self.path / RUN_FILE, json.dumps({**self.meta, **changes}, indent=1) + "\n")

    # --- events ----------------------------------------------------------------------------
    def locked(self):
        """Held while a writer appends (no two lab processes interleave half lines)."""
        return file_lock(self.path / ".lock")

    def append(self, type_: str, **payload) -> dict:
        """Append one event durably; returns it with its sequence number and time."""
        with self.locked():
            seq = self._drop_torn_tail_and_count()
            event = {"seq": seq, "time": now_iso(), "type": type_, **payload}
            line = scrub(json.dumps(json_safe(event), separators=(",", ":"))) + "\n"
            with open(self.events_path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return json.loads(line)  # what was written: scrubbed

    def _drop_torn_tail_and_count(self) -> int:
        with open(self.events_path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                data = data[:keep]
        return data.count(b"\n")

    def events(self) -> list[dict]:
        out: list[dict] = []
        if not self.events_path.exists():
            return out
        with open(self.events_path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn by a crash mid-write: never acted upon
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise RunFolderError(
                        f"{self.events_path} has a damaged line {len(out) + 1}; the folder needs repair"
                    ) from None
        return out

    # --- the ledger ------------------------------------------------------------------------
    def write_ledger(self, number: int, patch: str, info: dict) -> str:
        """Keep a candidate's patch and hypothesis; returns the ledger entry's name."""
        name = f"{number:04d}"
        atomic_write(self.ledger / f"{name}.patch", patch)
        atomic_write(self.ledger / f"{name}.json", json.dumps(info, indent=1) + "\n")
        return name

    # --- views rebuilt from the events -----------------------------------------------------
    def render(self) -> None:
        """Rewrite results.tsv and log.md from the events; under the append lock, so that the
        slots' threads (and processes) render one at a time, each from every event before it."""
        with self.locked():
            events = self.events()
            meta = self.meta
            atomic_write(self.path / "results.tsv", results_tsv(events, meta))
            atomic_write(self.path / "log.md", log_md(events, meta))


# --- rendering ---------------------------------------------------------------------------------
RESULT_COLUMNS = (
    "commit", "metric", "unit_seconds", "correctness", "status", "description",
    "speedup", "speedup_ci_low", "speedup_ci_high", "verdict",
)


# How schema 1 spelled an `evaluated` event's status (the verdict beside it held the Status).
_OLD_STATUS = {"keep": KEEP, "discard": SAME, "fail": FAIL, "crash": CRASH}


def event_status(event: dict) -> Status | str:
    """The Status of an `evaluated` event: its verdict's, which schema 1 events hold too beside
    their keep/discard/fail/crash (read here, so resuming an older run folder works); "" when the
    event says none."""
    status = (event.get("verdict") or {}).get("status") or event.get("status") or ""
    try:
        return Status(_OLD_STATUS.get(status, status))
    except ValueError:
        return status


def experiments(events: list[dict]) -> list[dict]:
    """One row per finished evaluation, in order (`evaluated` events)."""
    return [e for e in events if e["type"] == "evaluated"]


def pace(events: list[dict]) -> dict:
    """Experiments finished per hour, from the first `proposed` to the last `evaluated` event.

    The window leaves out the run's start (noise floor, baseline) so that runs with one GPU and
    with several compare the loop itself; a resumed run's pause is inside the window.
    """
    done = experiments(events)
    first = next((e["time"] for e in events if e["type"] == "proposed"), None)
    if not done or first is None:
        return {"experiments": len(done), "seconds": None, "per_hour": None}
    seconds = (_parse_time(done[-1]["time"]) - _parse_time(first)).total_seconds()
    return {"experiments": len(done), "seconds": round(seconds, 1),
            "per_hour": round(len(done) * 3600 / seconds, 1) if seconds > 0 else None}


def active_seconds(events: list[dict]) -> float:
    """Wall time the run's processes have spent on it: from each `run_started` or `resumed` event
    to the last event before the next one (a process killed mid-way counts to its last event)."""
    total, start, last = 0.0, None, None
    for e in events:
        t = _parse_time(e["time"])
        if e["type"] in ("run_started", "resumed"):
            if start is not None:
                total += (last - start).total_seconds()
            start = t
        last = t
    if start is not None:
        total += (last - start).total_seconds()
    return total


def _parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _fmt(x, digits=4):
    """A number of results.tsv (data for a program, not prose): four significant digits."""
    return "" if x is None else f"{x:.{digits}g}"


def results_tsv(events: list[dict], meta: dict) -> str:
    lines = ["\t".join(RESULT_COLUMNS)]
    for e in experiments(events):
        v = e.get("verdict", {})
        low, high = speedup_ci(v.get("ci_low"), v.get("ci_high")) or (None, None)
        lines.append("\t".join([
            (e.get("commit") or "")[:7],
            _fmt(e.get("metric")),
            _fmt(e.get("unit_seconds")),
            "pass" if e.get("correct") else "fail",
            event_status(e),
            (e.get("description") or "").replace("\t", " ").replace("\n", " ")[:200],
            _fmt(speedup(v.get("median"))),
            _fmt(low),
            _fmt(high),
            v.get("status", ""),
        ]))
    return "\n".join(lines) + "\n"


def log_md(events: list[dict], meta: dict) -> str:
    out = [f"# Run {meta.get('id', '')}: {meta.get('harness', '')}", ""]
    out.append(f"- created {meta.get('created', '')}; base commit {meta.get('base_commit', '')[:12]}; "
               f"branch `{meta.get('branch', '')}`")
    if meta.get("settings"):
        out.append("- settings: " + ", ".join(f"{k}={v}" for k, v in sorted(meta["settings"].items())))
    out.append("")
    counts: dict[str, int] = {}
    for e in events:
        t = e["type"]
        stamp = e["time"][11:19]
        if t == "evaluated":
            v = e.get("verdict", {})
            counts[v.get("status", "?")] = counts.get(v.get("status", "?"), 0) + 1
            measured = fmt.speedup_and_ci(v)
            gain = f" speedup {measured}" if measured else ""
            out.append(f"- {stamp} #{e.get('number', '?')} **{v.get('status', '?')}**{gain}: "
                       f"{e.get('description', '')}" + (f" — {v['reason']}" if v.get("reason") else ""))
        elif t == "rejected":
            counts["REJECTED"] = counts.get("REJECTED", 0) + 1
            out.append(f"- {stamp} #{e.get('number', '?')} rejected: {e.get('reason', '')} — {e.get('description', '')}")
        elif t == "kept":
            out.append(f"  - kept as {e.get('commit', '')[:10]}: {fmt.speedup(e.get('speedup'))}, cumulative "
                       f"{fmt.speedup(e.get('cumulative_speedup'))} over the baseline")
        elif t in ("note", "research", "canary", "noise_floor", "baseline", "run_started", "run_stopped",
                   "resumed", "agent_failed", "plateau", "lost", "stale_keep", "workers"):
            text = e.get("text") or e.get("reason") or ""
            if t == "noise_floor":
                text = f"A/A noise floor {fmt.percent(e.get('noise_floor'))}, delta {fmt.percent(e.get('delta'))}"
            if t == "baseline":
                text = f"baseline {e.get('metric_name', '')} {fmt.number(e.get('metric'))}"
            out.append(f"- {stamp} {t}: {text}")
    out += ["", "## Totals", ""]
    out.append(", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "no experiments yet")
    rate = pace(events)
    if rate["per_hour"] is not None:
        out.append(f"\n{rate['experiments']} experiments in {rate['seconds']:.0f} s from the first proposal: "
                   f"{rate['per_hour']:.1f} per hour")
    kept = [e for e in events if e["type"] == "evaluated" and event_status(e) == KEEP]
    if kept:
        out.append(f"\nKept: {len(kept)}; best so far: {kept[-1].get('description', '')}")
    return "\n".join(out) + "\n"

