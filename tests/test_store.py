import json
import multiprocessing

import pytest

from lab.errors import RunFolderError
from lab.records import SCHEMA_VERSION
from lab.store import RunFolder


def _make(tmp_path):
    return RunFolder.create(tmp_path / "runs", "h-1", {"harness": "h", "base_commit": "0" * 40})


def _append_many(path, tag, n):
    folder = RunFolder.open(path)
    for i in range(n):
        folder.append("note", text=f"{tag}-{i}")


def test_two_processes_append_without_loss(tmp_path):
    folder = _make(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(folder.path, tag, 150)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = folder.events()
    assert len(events) == 300
    assert [e["seq"] for e in events] == list(range(300))  # no sequence number taken twice
    texts = {e["text"] for e in events}
    assert {f"a-{i}" for i in range(150)} <= texts and {f"b-{i}" for i in range(150)} <= texts


def test_torn_last_line_is_ignored_then_truncated(tmp_path):
    folder = _make(tmp_path)
    folder.append("note", text="one")
    with open(folder.events_path, "a") as f:
        f.write('{"seq": 1, "type": "note", "te')  # a kill -9 mid-write
    assert [e["text"] for e in folder.events()] == ["one"]
    folder.append("note", text="two")
    assert [e["text"] for e in folder.events()] == ["one", "two"]
    assert folder.events()[-1]["seq"] == 1
    for line in folder.events_path.read_text().splitlines():
        json.loads(line)


def test_newer_schema_refused(tmp_path):
    folder = _make(tmp_path)
    meta = json.loads((folder.path / "run.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (folder.path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunFolderError, match="newer lab"):
        RunFolder.open(folder.path)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        RunFolder.open(tmp_path)


def test_views_rebuilt_from_events(tmp_path):
    folder = _make(tmp_path)
    # spelled as schema 1 wrote it (status "keep"): rendered in the one vocabulary (Status)
    folder.append("evaluated", number=1, commit="abcdef123456", status="keep", correct=True,
                  description="unroll by 2", metric=120.0, unit_seconds=0.5,
                  verdict={"status": "KEEP", "median": -0.1, "ci_low": -0.12, "ci_high": -0.08, "pairs": 20,
                           "delta": 0.005})
    folder.append("kept", number=1, commit="abcdef123456", speedup=1.10517, cumulative_speedup=1.10517)
    folder.append("baseline", metric=4423.158, metric_name="throughput")
    folder.append("noise_floor", noise_floor=0.00234, delta=0.005, pairs=40)
    folder.append("rejected", number=2, reason="outside the editable surface", description="edit timer")
    folder.render()
    rows = (folder.path / "results.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:6] == ["commit", "metric", "unit_seconds", "correctness", "status", "description"]
    cells = rows[1].split("\t")
    assert cells[0] == "abcdef1" and cells[3] == "pass" and cells[4] == "KEEP" and cells[9] == "KEEP"
    assert float(cells[6]) == pytest.approx(1.105, abs=1e-3)
    log = (folder.path / "log.md").read_text()
    assert "KEEP" in log and "rejected: outside the editable surface" in log
    # numbers as lab/fmt.py rounds them: to what the measurement resolves, not four decimals
    assert "**KEEP** speedup 1.11x (99% CI 1.083-1.13x, 20 pairs, delta 0.50%): unroll by 2" in log
    assert "kept as abcdef1234: 1.11x, cumulative 1.11x over the baseline" in log
    assert "A/A noise floor 0.23%, delta 0.50%" in log
    assert "baseline throughput 4,423\n" in log


def test_pace_counts_experiments_per_hour_from_the_first_proposal():
    from lab.store import log_md, pace

    def ev(t, clock, **kw):
        return {"type": t, "time": f"2026-11-22T10:{clock}+00:00", **kw}

    events = [ev("baseline", "00:00"), ev("proposed", "01:00", number=1), ev("evaluated", "01:30", number=1),
              ev("proposed", "01:30", number=2), ev("evaluated", "02:00", number=2),
              ev("lost", "02:10", text="0003: the worker died (killed); re-running it")]
    assert pace(events) == {"experiments": 2, "seconds": 60.0, "per_hour": 120.0}
    assert pace(events[:2])["per_hour"] is None
    log = log_md(events, {})
    assert "120.0 per hour" in log and "the worker died" in log


@pytest.mark.parametrize("old, verdict, status", [
    ("keep", "KEEP", "KEEP"), ("discard", "SAME", "SAME"), ("discard", "WORSE", "WORSE"),
    ("fail", "FAIL", "FAIL"), ("crash", "CRASH", "CRASH"), ("crash", "TIMEOUT", "TIMEOUT"),
    ("discard", None, "SAME"), ("KEEP", "KEEP", "KEEP"),
])
def test_event_status_reads_the_old_spellings(old, verdict, status):
    """Schema 1 wrote keep/discard/fail/crash beside the verdict; a resumed old run reads as Status."""
    from lab.records import Status
    from lab.store import event_status

    event = {"type": "evaluated", "status": old, "verdict": {"status": verdict} if verdict else {}}
    assert event_status(event) == status and isinstance(event_status(event), Status)
