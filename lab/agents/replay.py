"""Recorded patches as the proposal source: the loop without an LLM (`--agent replay:FILE`).

FILE is one of:
- a folder (e.g. a harness's `solutions/correct`): its *.patch files in sorted order;
- a JSON file holding a list of items, or a JSONL file with one item a line, each item
  {"patch": "<unified diff>", "hypothesis": "..."} or {"patch_file": "rel/path.patch", ...}
  (patch_file relative to the JSON file's folder; hypothesis optional);
- a single .patch / .diff file.

A patch's hypothesis, when not given, is its first line if that starts with '#', else its
`Subject:` line (as `git format-patch` writes it), else the file name. When the list is spent,
`propose` returns a failure "replay exhausted" and sets `exhausted`, so the loop stops. On a
resumed run the items already proposed (the same hypotheses, in order) are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError
from .base import Agent, AgentContext, Proposal
from .tools import hypothesis_line

_SUBJECT = re.compile(r"^Subject:\s*(?:\[[^\]]*\]\s*)?(.*)$")


@dataclass
class ReplayItem:
    patch: str
    hypothesis: str


def patch_hypothesis(text: str, fallback: str) -> str:
    """The hypothesis a patch file carries: a leading '#' line, else its Subject:, else `fallback`."""
    lines = text.splitlines()
    for line in lines:
        if line.strip():
            if line.lstrip().startswith("#"):
                return hypothesis_line(line.lstrip().lstrip("#")) or fallback
            break
    for line in lines:
        if line.startswith(("diff --git ", "--- ")):
            break
        m = _SUBJECT.match(line)
        if m and m.group(1).strip():
            return hypothesis_line(m.group(1))
    return fallback


def patch_item(path: Path, hypothesis: str | None = None) -> ReplayItem:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabError(f"cannot read the patch {path}: {exc.strerror}") from None
    if not text.strip():
        raise LabError(f"the patch {path} is empty")
    hyp = hypothesis_line(hypothesis or "") or patch_hypothesis(text, path.stem)
    return ReplayItem(text, hyp)


def load_replay(source: Path) -> list[ReplayItem]:
    """The items of a replay FILE (see the module's notes); LabError saying what is wrong."""
    source = Path(source)
    if source.is_dir():
        items = [patch_item(p) for p in sorted(source.glob("*.patch"))]
        if not items:
            raise LabError(f"{source} holds no *.patch file to replay")
        return items
    if not source.is_file():
        raise LabError(f"replay: {source} does not exist; give a folder of *.patch files, a JSON or "
                       "JSONL file of {\"patch\" or \"patch_file\", \"hypothesis\"} items, or a .patch file")
    if source.suffix in (".patch", ".diff"):
        return [patch_item(source)]
    text = source.read_text()
    try:
        if source.suffix == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except ValueError as exc:
        raise LabError(f"replay: {source} is not valid JSON{'L' if source.suffix == '.jsonl' else ''} ({exc})") from None
    if not isinstance(raw, list):
        raise LabError(f"replay: {source} must hold a list of items")
    items = []
    for n, entry in enumerate(raw, 1):
        where = f"{source} item {n}"
        if not isinstance(entry, dict) or not (entry.get("patch") or entry.get("patch_file")):
            raise LabError(f"replay: {where} needs \"patch\" (a unified diff) or \"patch_file\" (a path)")
        if entry.get("patch_file"):
            item = patch_item(source.parent / entry["patch_file"], entry.get("hypothesis"))
        else:
            patch = entry["patch"]
            hyp = hypothesis_line(entry.get("hypothesis") or "") or patch_hypothesis(patch, f"replay item {n}")
            item = ReplayItem(patch, hyp)
        items.append(item)
    if not items:
        raise LabError(f"replay: {source} holds no item")
    return items


class ReplayAgent(Agent):
    name = "replay"
    skip_tried = True  # on a resumed run, skip the leading items already proposed

    def __init__(self, items: list[ReplayItem]):
        self.items = list(items)
        self.index = 0
        self.exhausted = False
        self._started = False

    @classmethod
    def from_path(cls, source: str | Path) -> "ReplayAgent":
        return cls(load_replay(Path(source)))

    def propose(self, ctx: AgentContext) -> Proposal:
        if self.skip_tried and not self._started:  # a resumed run: skip what was already proposed
            tried = ctx.tried_hypotheses
            while (self.index < len(self.items) and self.index < len(tried)
                   and tried[self.index] == self.items[self.index].hypothesis):
                self.index += 1
        self._started = True
        if self.index >= len(self.items):
            self.exhausted = True
            return Proposal(failure="replay exhausted")
        item = self.items[self.index]
        self.index += 1
        return Proposal(patch=item.patch, hypothesis=item.hypothesis)
