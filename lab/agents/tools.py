"""What every agent shares: the scratch copy of the editable files, the diff the lab takes from it,
the file viewer and editor the LLM agent drives, the brief of the run, and the transcript.

An agent never touches the incumbent tree. It gets a scratch copy laid out like the tree and
holding only the editable files; its proposal is `diff_trees(incumbent, scratch)`: a git-style
unified diff with a/ b/ prefixes, relative to the harness folder, that `git apply` takes.
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path, PurePosixPath

from ..harness import _walk, matches_any
from .base import AgentContext

MAX_VIEW_CHARS = 40_000  # one view of a file; longer files are cut, with a pointer to view_range
MAX_SOURCE_CHARS = 120_000  # the incumbent's editable files inlined in a brief
MAX_LOG_CHARS = 20_000  # the tail of log.md inlined in a brief
HYPOTHESIS_CHARS = 200
RUN_PREFIX = "@run/"  # paths of the run's own files in the viewer: @run/log.md, @run/results.tsv


class ToolError(Exception):
    """A tool call the lab refuses; its message goes back to the model as an error result."""


# --- the scratch tree and the diff ---------------------------------------------------------
def editable_files(tree: Path, globs) -> list[str]:
    """Relative paths of the files under `tree` that belong to the editable surface."""
    return [p for p in _walk(tree) if matches_any(p, globs)] if tree.is_dir() else []


def stage_scratch(ctx: AgentContext, name: str = "tree") -> Path:
    """A fresh copy of the incumbent's editable files under ctx.scratch/name, laid out like the tree."""
    dest = Path(ctx.scratch) / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in editable_files(Path(ctx.incumbent_tree), ctx.editable):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(ctx.incumbent_tree) / rel, dest / rel)
    return dest


def _lines(path: Path) -> list[str] | None:
    """The file's lines with their endings; None for a file that is not text."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _file_diff(rel: str, before: Path | None, after: Path | None) -> str:
    old = _lines(before) if before else []
    new = _lines(after) if after else []
    header = f"diff --git a/{rel} b/{rel}\n"
    if before is None:
        header += "new file mode 100644\n"
    elif after is None:
        header += "deleted file mode 100644\n"
    if old is None or new is None:
        return header + f"Binary files a/{rel} and b/{rel} differ\n"
    if old == new:
        return ""
    body = []
    for line in difflib.unified_diff(old, new, "/dev/null" if before is None else f"a/{rel}",
                                     "/dev/null" if after is None else f"b/{rel}", n=3):
        if line.startswith(("--- ", "+++ ")):
            body.append(line.rstrip("\n") + "\n")
        elif line.endswith("\n"):
            body.append(line)
        else:  # the last line of a file without a final newline
            body.append(line + "\n\\ No newline at end of file\n")
    return header + "".join(body)


def diff_trees(incumbent: Path, scratch: Path, globs, exclude: tuple[str, ...] = ()) -> str:
    """The unified diff from the incumbent's editable files to the scratch copy's ("" if none).

    Only paths of the editable surface count; `exclude` names paths the lab itself put in the
    scratch folder (HYPOTHESIS, program.md) that are not part of the proposal."""
    before = set(editable_files(Path(incumbent), globs))
    after = set(editable_files(Path(scratch), globs)) - (set(exclude) - before)
    parts = []
    for rel in sorted(before | after):
        parts.append(_file_diff(rel, Path(incumbent) / rel if rel in before else None,
                                Path(scratch) / rel if rel in after else None))
    return "".join(parts)


def changed_outside(scratch: Path, globs, exclude: tuple[str, ...] = ()) -> list[str]:
    """Files an external agent wrote in its scratch folder outside the editable surface."""
    return [p for p in _walk(Path(scratch)) if not matches_any(p, globs) and p not in exclude]


def hypothesis_line(text: str) -> str:
    """The first non-empty line of `text`, whitespace collapsed, at most 200 characters."""
    for line in (text or "").splitlines():
        line = " ".join(line.split())
        if line:
            return line[:HYPOTHESIS_CHARS]
    return ""


# --- the viewer and editor the LLM drives ----------------------------------------------------
class Workbench:
    """Read access to the harness (locked files from harness_root, editable files from the
    scratch copy, the run's log and results) and write access to the editable surface only."""

    def __init__(self, ctx: AgentContext, scratch_tree: Path):
        self.ctx = ctx
        self.tree = Path(scratch_tree)
        self.root = Path(ctx.harness_root).resolve()
        self.run_files = {"log.md": ctx.log_md, "results.tsv": ctx.results_tsv}

    # paths --------------------------------------------------------------------------------
    @staticmethod
    def _relative(path: str) -> str:
        raw = (path or "").strip().replace("\\", "/")
        pure = PurePosixPath(raw)
        if pure.is_absolute() or ".." in pure.parts:
            raise ToolError(f"'{path}': give a path relative to the harness folder, without '..'")
        rel = pure.as_posix()
        return "" if rel == "." else rel

    def is_editable(self, rel: str) -> bool:
        return bool(rel) and matches_any(rel, self.ctx.editable)

    def _locked(self, rel: str) -> Path:
        target = (self.root / rel).resolve()
        if target != self.root and self.root not in target.parents:
            raise ToolError(f"'{rel}' lies outside the harness folder")
        return target

    def _writable(self, path: str) -> Path:
        rel = self._relative(path)
        if not self.is_editable(rel):
            raise ToolError(
                f"'{rel or path}' is not part of the editable surface ({', '.join(self.ctx.editable)}); "
                "it is locked: you may view it but not change it")
        return self.tree / rel

    # commands -----------------------------------------------------------------------------
    def view(self, path: str, view_range=None) -> str:
        if (path or "").startswith(RUN_PREFIX):
            name = path[len(RUN_PREFIX):]
            if name not in self.run_files:
                raise ToolError(f"the run has {', '.join(RUN_PREFIX + n for n in self.run_files)}; not '{path}'")
            return _numbered(self.run_files[name], view_range, path)
        rel = self._relative(path)
        if self.is_editable(rel):
            target = self.tree / rel
            if not target.is_file():
                raise ToolError(f"'{rel}' does not exist yet (you may create it: it is editable)")
        else:
            target = self._locked(rel)
            if target.is_dir():
                return self._listing(rel)
            if not target.is_file():
                if rel == "program.md" and self.ctx.program_md:
                    return _numbered(self.ctx.program_md, view_range, rel)
                raise ToolError(f"'{rel}' does not exist; view '.' to list the harness's files")
        lines = _lines(target)
        if lines is None:
            return f"'{rel}' is a binary file of {target.stat().st_size} bytes"
        return _numbered("".join(lines), view_range, rel)

    def _listing(self, rel: str) -> str:
        prefix = f"{rel}/" if rel else ""
        locked = [p for p in _walk(self.root / rel) if not self.is_editable(prefix + p)]
        editable = [p[len(prefix):] for p in editable_files(self.tree, self.ctx.editable) if p.startswith(prefix)]
        rows = sorted([(p, "") for p in locked] + [(p, "  (editable)") for p in editable])
        head = f"files under '{rel or '.'}' (editable ones are your scratch copies):\n"
        text = head + "\n".join(f"{prefix}{p}{mark}" for p, mark in rows[:500])
        if len(rows) > 500:
            text += f"\n... and {len(rows) - 500} more"
        return text + f"\nthe run's own files: {RUN_PREFIX}log.md, {RUN_PREFIX}results.tsv"

    def str_replace(self, path: str, old_str: str, new_str: str) -> str:
        target = self._writable(path)
        if not target.is_file():
            raise ToolError(f"'{path}' does not exist; use create to write a new file")
        text = target.read_text()
        if not old_str:
            raise ToolError("old_str is empty; give the exact text to replace (it must occur once)")
        count = text.count(old_str)
        if count == 0:
            raise ToolError(f"old_str was not found in '{path}'; view the file and copy the exact text, "
                            "whitespace and indentation included")
        if count > 1:
            raise ToolError(f"old_str occurs {count} times in '{path}'; include more surrounding lines "
                            "so that it occurs exactly once")
        target.write_text(text.replace(old_str, new_str or "", 1))
        return f"edited '{path}'"

    def create(self, path: str, file_text: str) -> str:
        target = self._writable(path)
        existed = target.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file_text or "")
        return f"{'overwrote' if existed else 'created'} '{path}'"

    def insert(self, path: str, insert_line: int, insert_text: str) -> str:
        target = self._writable(path)
        if not target.is_file():
            raise ToolError(f"'{path}' does not exist; use create to write a new file")
        lines = target.read_text().splitlines(keepends=True)
        if not isinstance(insert_line, int) or not 0 <= insert_line <= len(lines):
            raise ToolError(f"insert_line must be between 0 and {len(lines)} (the text goes after that line)")
        if lines and not lines[-1].endswith("\n") and insert_line == len(lines):
            lines[-1] += "\n"
        new = insert_text if insert_text.endswith("\n") else insert_text + "\n"
        lines[insert_line:insert_line] = [new]
        target.write_text("".join(lines))
        return f"inserted {new.count(chr(10))} line(s) after line {insert_line} of '{path}'"

    def edit(self, args: dict) -> str:
        """The `editor` tool: view / str_replace / create / insert."""
        command = args.get("command")
        path = args.get("path", "")
        if command == "view":
            return self.view(path, args.get("view_range"))
        if command == "str_replace":
            return self.str_replace(path, args.get("old_str", ""), args.get("new_str", ""))
        if command == "create":
            if "file_text" not in args:
                raise ToolError("create needs file_text: the whole content of the file")
            return self.create(path, args["file_text"])
        if command == "insert":
            if "insert_line" not in args or "insert_text" not in args:
                raise ToolError("insert needs insert_line and insert_text")
            return self.insert(path, args["insert_line"], args["insert_text"])
        raise ToolError(f"unknown command '{command}': use view, str_replace, create or insert")


def _numbered(text: str, view_range, name: str) -> str:
    lines = text.splitlines()
    start, end = 1, len(lines)
    if view_range:
        try:
            start, end = int(view_range[0]), int(view_range[1])
        except (TypeError, ValueError, IndexError):
            raise ToolError("view_range is [first_line, last_line] (1-based; -1 for the end)") from None
        end = len(lines) if end == -1 else min(end, len(lines))
        if not 1 <= start <= max(end, 1):
            raise ToolError(f"view_range {view_range} is outside '{name}' ({len(lines)} lines)")
    out, size = [], 0
    for i in range(start, end + 1):
        row = f"{i:6}\t{lines[i - 1]}"
        size += len(row) + 1
        if size > MAX_VIEW_CHARS:
            out.append(f"... cut at line {i - 1} of {len(lines)}; view the rest with view_range [{i}, -1]")
            break
        out.append(row)
    return "\n".join(out) if out else f"'{name}' is empty"


# --- the brief of a run ----------------------------------------------------------------------
def _fence(text: str) -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}\n{text.rstrip()}\n{ticks}"


def incumbent_source(ctx: AgentContext) -> str:
    """The current best version of every editable file, inlined (up to MAX_SOURCE_CHARS)."""
    parts, size = [], 0
    for rel in editable_files(Path(ctx.incumbent_tree), ctx.editable):
        lines = _lines(Path(ctx.incumbent_tree) / rel)
        text = "".join(lines) if lines is not None else "(binary file)"
        if size + len(text) > MAX_SOURCE_CHARS:
            parts.append(f"### {rel}\n(too long to inline here: view it with the editor)")
            continue
        size += len(text)
        parts.append(f"### {rel}\n{_fence(text)}")
    return "\n\n".join(parts) or "(the incumbent holds no editable file yet)"


def run_brief(ctx: AgentContext, source: bool = True) -> str:
    """What an agent needs to know before it proposes: the surface, the current best source,
    the results so far, the recent failures, the hypotheses already tried and the log."""
    sections = [
        f"# Harness `{ctx.harness_name}`",
        "Editable files (globs relative to the harness folder): "
        + ", ".join(f"`{g}`" for g in ctx.editable) + ". Every other file is locked.",
    ]
    if source:
        sections.append("## Current best source (the incumbent)\n\n" + incumbent_source(ctx))
    sections.append("## Results so far (results.tsv)\n\n" + _fence(ctx.results_tsv or "(none yet)"))
    if ctx.recent_failures:
        sections.append("## Recent failures (fix the cause or avoid the idea)\n\n"
                        + "\n".join(f"- {f}" for f in ctx.recent_failures))
    if ctx.tried_hypotheses:
        tried = [h for h in ctx.tried_hypotheses if h][-40:]
        sections.append("## Hypotheses already tried (do not repeat one)\n\n" + "\n".join(f"- {h}" for h in tried))
    log = ctx.log_md or ""
    if len(log) > MAX_LOG_CHARS:
        log = "(earlier entries cut)\n" + log[-MAX_LOG_CHARS:]
    sections.append("## Experiment log (log.md)\n\n" + (log or "(empty)"))
    return "\n\n".join(sections)


# --- transcripts -----------------------------------------------------------------------------
def episode_path(run_dir: Path, kind: str, suffix: str = ".jsonl") -> Path:
    """run_dir/agent/<kind>-NNNN<suffix>, numbered after the ones already there (a resumed run
    never overwrites the transcript of an earlier episode)."""
    folder = Path(run_dir) / "agent"
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len(kind) + 1:len(kind) + 5]) for p in folder.glob(f"{kind}-[0-9][0-9][0-9][0-9]*")]
    return folder / f"{kind}-{max(taken, default=0) + 1:04d}{suffix}"


class Transcript:
    """JSON lines, one per message or event of an episode. `secret` (the API key) is replaced
    wherever it would appear, so no transcript can carry it."""

    def __init__(self, path: Path, secret: str = ""):
        self.path = Path(path)
        self.secret = secret
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, record: dict) -> None:
        line = json.dumps(record, default=str, ensure_ascii=False)
        if self.secret:
            line = line.replace(self.secret, "[redacted]")
        with open(self.path, "a") as f:
            f.write(line + "\n")
