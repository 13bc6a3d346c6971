"""The run memory: what an 8-hour run has learned, rebuilt from its events (the ledger's index)
every time an agent is asked for a proposal, so that it survives context resets and resumes.

Three parts, every experiment with its outcome: the kept changes (the incumbent's lineage), the
dead ends (failed, slower, not faster, rejected) with the oracle's or the build's first words,
and the ideas (the `next_idea` of each submit and the latest research list) not yet tried. It is
bounded (MEMORY_CHARS): when a long run outgrows it, the oldest dead ends are shortened, then
counted, never the keeps. `past_candidate` opens one experiment in full (patch, build report,
check lines) for the agent's `history` tool.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..records import KEEP
from ..stats import speedup
from ..store import event_status

MEMORY_CHARS = 30_000
IDEAS = 15  # the latest next_idea lines shown
RESEARCH_CHARS = 6_000  # of the latest research list
PART_CHARS = 15_000  # of one part of a past candidate
RECORD_BYTES = 8 << 20  # a record larger than this is not parsed for the history tool


def _speed(verdict: dict) -> str:
    gain = speedup(verdict.get("median"))
    return "" if gain is None else f" {gain:.4f}x"


def _why(event: dict) -> str:
    """The first words of why an evaluation failed: the oracle's, the build's or the runner's."""
    verdict = event.get("verdict") or {}
    text = verdict.get("reason") or event.get("reason") or ""
    return " ".join(str(text).split())[:160]


def outcomes(events: list[dict]) -> list[dict]:
    """One row per proposal that reached the lab: number, hypothesis, outcome, learned, next idea."""
    rows: dict[int, dict] = {}
    for e in events:
        t, n = e["type"], e.get("number")
        if t == "proposed":
            rows[n] = {"number": n, "hypothesis": e.get("hypothesis", ""), "learned": e.get("learned", ""),
                       "next_idea": e.get("next_idea", ""), "outcome": "in flight", "kept": False, "dead": False}
        elif t == "evaluated" and n in rows:
            v = e.get("verdict") or {}
            status = v.get("status", "?")
            rows[n]["outcome"] = f"{status}{_speed(v)}" + (f" ({_why(e)})" if status != "KEEP" and _why(e) else "")
            rows[n]["kept"] = event_status(e) == KEEP
            rows[n]["dead"] = not rows[n]["kept"]
        elif t == "rejected" and n in rows:
            rows[n]["outcome"] = f"rejected: {e.get('reason', '')} {str(e.get('detail', ''))[:100]}".strip()
            rows[n]["dead"] = True
    return [rows[k] for k in sorted(rows)]


def _line(row: dict, short: bool = False) -> str:
    hyp = " ".join(row["hypothesis"].split())[:100 if short else 200]
    text = f"- #{row['number']} {row['outcome'] if not short else row['outcome'][:60]}: {hyp}"
    if row["learned"] and not short:
        text += f" — learned: {' '.join(row['learned'].split())[:240]}"
    return text


def run_memory(events: list[dict], max_chars: int = MEMORY_CHARS) -> str:
    rows = outcomes(events)
    if not rows and not any(e["type"] == "research" for e in events):
        return ""
    kept = [_line(r) for r in rows if r["kept"]]
    dead_rows = [r for r in rows if r["dead"]]
    tried = {" ".join(r["hypothesis"].lower().split()) for r in rows}
    ideas = [f"- (after #{r['number']}) {' '.join(r['next_idea'].split())[:240]}" for r in rows
             if r["next_idea"] and " ".join(r["next_idea"].lower().split()) not in tried][-IDEAS:]
    research = [e for e in events if e["type"] == "research"]
    head = ["## Run memory (rebuilt from the ledger: every experiment with its outcome)", "",
            "### Kept (the incumbent's lineage, oldest first)", *(kept or ["- none yet"]), ""]
    tail = ["", "### Ideas not yet tried (your own next_idea notes)", *(ideas or ["- none recorded"])]
    if research:
        text = (research[-1].get("text") or "").strip()
        if len(text) > RESEARCH_CHARS:
            text = text[:RESEARCH_CHARS] + "\n... (cut)"
        tail += ["", f"### Research list ({'latest of ' + str(len(research)) if len(research) > 1 else 'before the first experiment'})",
                 "", text]
    budget = max_chars - sum(len(x) + 1 for x in head + tail) - 200
    dead = [_line(r) for r in dead_rows]
    if sum(len(x) + 1 for x in dead) > budget:  # shorten the oldest first, then count them
        for i in range(len(dead)):
            dead[i] = _line(dead_rows[i], short=True)
            if sum(len(x) + 1 for x in dead) <= budget:
                break
        dropped = 0
        while dead and sum(len(x) + 1 for x in dead) > budget:
            dead.pop(0)
            dropped += 1
        if dropped:
            dead.insert(0, f"- ... {dropped} earlier dead ends not shown (open any with the history tool)")
    body = ["### Dead ends (tried, not kept: do not repeat them; their outcome says why)", *(dead or ["- none yet"])]
    return "\n".join(head + body + tail)


def past_candidate(run_dir: Path, events: list[dict], number: int, part: str = "all") -> str:
    """One past experiment in full: its hypothesis and outcome, patch, build report, check lines."""
    run_dir = Path(run_dir)
    proposed = next((e for e in events if e["type"] == "proposed" and e.get("number") == number), None)
    if proposed is None:
        known = [e["number"] for e in events if e["type"] == "proposed"]
        return (f"there is no experiment #{number}" + (f" (experiments run from #{min(known)} to #{max(known)})"
                                                       if known else " (none has run yet)"))
    evaluated = next((e for e in events if e["type"] == "evaluated" and e.get("number") == number), None)
    row = next(r for r in outcomes(events) if r["number"] == number)
    out = [f"# experiment #{number}: {proposed.get('hypothesis', '')}", f"outcome: {row['outcome']}"]
    if row["learned"]:
        out.append(f"learned: {row['learned']}")
    if part in ("patch", "all"):
        patch = _bounded_text(run_dir / "ledger" / f"{proposed.get('ledger', f'{number:04d}')}.patch")
        out += ["", "## patch", patch or "(no patch in the ledger)"]
    if part in ("build", "all"):
        report = ""
        if evaluated and evaluated.get("record"):
            build = _record(run_dir / evaluated["record"]).get("candidate_build") or {}
            report = (build.get("error") or build.get("report") or "").strip()
            if evaluated.get("build_info"):
                report += "\n" + json.dumps(evaluated["build_info"], sort_keys=True)
        out += ["", "## build report", report[:PART_CHARS] or "(no build report: not built, or a silent build)"]
    if part in ("check", "all"):
        lines = (evaluated or {}).get("check_lines") or []
        text = "\n".join(lines)[:PART_CHARS]
        out += ["", "## check lines", text or f"(no check lines: {_why(evaluated) if evaluated else 'not evaluated'})"]
    return "\n".join(out)


def _bounded_text(path: Path, limit: int = PART_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n... (cut)" if len(data) > limit else "")


def _record(path: Path) -> dict:
    try:
        if path.stat().st_size > RECORD_BYTES:
            return {}
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
