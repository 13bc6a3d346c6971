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

from ..harness import matches_any, tree_files
from ..records import KEEP
from .base import AgentContext

MAX_VIEW_CHARS = 40_000  # one view of a file; longer files are cut, with a pointer to view_range
MAX_SOURCE_CHARS = 120_000  # the incumbent's editable files inlined in a brief
MAX_LOG_CHARS = 8_000  # the tail of log.md inlined in a brief (the run memory holds the rest)
HYPOTHESIS_CHARS = 200
RUN_PREFIX = "@run/"  # paths of the run's own files in the viewer: @run/log.md, @run/results.tsv


class ToolError(Exception):
    """A tool call the lab refuses; its message goes back to the model as an error result."""


# --- the scratch tree and the diff ---------------------------------------------------------
def editable_files(tree: Path, globs) -> list[str]:
    """Relative paths of the files under `tree` that belong to the editable surface."""
    return [p for p in tree_files(tree) if matches_any(p, globs)] if tree.is_dir() else []


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
    return [p for p in tree_files(Path(scratch)) if not matches_any(p, globs) and p not in exclude]


def hypothesis_line(text: str) -> str:
    """The first non-empty line of `text`, whitespace collapsed, at most 200 characters."""
    for line in (text or "").splitlines():
        line = " ".join(line.split())
        if line:
            return line[:HYPOTHESIS_CHARS]
    return ""


# --- the viewer and editor the LLM drives ----------------------------------------------------
MAX_PATH_CHARS = 1024  # a longer path is no path of a harness
MAX_EDIT_BYTES = 4 << 20  # an editable file larger than this is not rewritten in memory
MAX_LINE_CHARS = 4000  # one line of a view; longer lines are cut (minified or binary-like text)
READ_CHUNK = 1 << 16
# What the agent's tools never show, whatever a harness declares: known answers (solutions/), the
# measured evidence and the records of runs (these would be hints, not information), git's data.
# A harness adds its own with `private = ("references/answers/**", ...)` (globs, as `editable`).
DEFAULT_PRIVATE = ("solutions", "**/solutions", "evidence", "**/evidence", "runs", "**/runs",
                   ".git", "**/.git", "records", "**/records")


def _arg(args: dict, name: str, kind, required: bool = False, default=None):
    """One argument of a tool call, of the type the schema names; ToolError otherwise."""
    if name not in args or args[name] is None:
        if required:
            raise ToolError(f"'{name}' is required")
        return default
    value = args[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ToolError(f"'{name}' must be an integer, not {type(value).__name__}")
    if kind is not int and not isinstance(value, kind):
        raise ToolError(f"'{name}' must be a {kind.__name__}, not {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolError(f"'{name}' is not valid UTF-8 text") from None
    return value


def checked_path(value) -> str:
    """`value` if it can name a file of a harness: a string, not huge, no NUL or control
    characters, valid UTF-8. Everything else is a ToolError, never an exception of the OS."""
    if not isinstance(value, str):
        raise ToolError(f"path must be a string, not {type(value).__name__}")
    if len(value) > MAX_PATH_CHARS:
        raise ToolError(f"path is {len(value)} characters long; paths of this harness are short")
    if any(ord(c) < 32 for c in value):
        raise ToolError("path holds a NUL or another control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolError("path is not valid UTF-8") from None
    return value


def is_private(rel: str, globs) -> bool:
    """True when `rel` or a folder above it matches one of `globs`."""
    parts = PurePosixPath(rel).parts
    return any(matches_any("/".join(parts[:i]), globs) for i in range(1, len(parts) + 1))


def read_numbered(path: Path, view_range, name: str) -> str:
    """Numbered lines of a file, read in chunks: at most MAX_VIEW_CHARS are kept in memory
    however large the file is (the rest is only counted)."""
    start, end = _range(view_range)
    out, size, total, cut_at = [], 0, 0, None
    with open(path, "rb") as f:
        head = f.read(8192)
        if b"\0" in head:
            return f"'{name}' is a binary file of {path.stat().st_size} bytes"
        f.seek(0)
        for number, line in enumerate(_bounded_lines(f), start=1):
            total = number
            if number < start or (end != -1 and number > end) or cut_at is not None:
                continue
            row = f"{number:6}\t{line}"
            size += len(row) + 1
            if size > MAX_VIEW_CHARS:
                cut_at = number
                continue
            out.append(row)
    if view_range and not 1 <= start <= max(total if end == -1 else min(end, total), 1):
        raise ToolError(f"view_range {view_range} is outside '{name}' ({total} lines)")
    if cut_at is not None:
        out.append(f"... cut at line {cut_at - 1} of {total}; view the rest with view_range [{cut_at}, -1]")
    return "\n".join(out) if out else f"'{name}' is empty"


def _bounded_lines(f):
    """The lines of a binary file object as text, each cut at MAX_LINE_CHARS, read in chunks."""
    pending, dropped = b"", False
    while True:
        chunk = f.read(READ_CHUNK)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield _line_text(line, dropped)
            dropped = False
        if len(pending) > MAX_LINE_CHARS * 4:  # a very long line: keep its head only
            pending, dropped = pending[:MAX_LINE_CHARS * 4], True
    if pending:
        yield _line_text(pending, dropped)


def _line_text(raw: bytes, dropped: bool) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    if dropped or len(text) > MAX_LINE_CHARS:
        text = text[:MAX_LINE_CHARS] + " ... (line cut)"
    return text


def _range(view_range) -> tuple[int, int]:
    if not view_range:
        return 1, -1
    if not isinstance(view_range, (list, tuple)) or len(view_range) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in view_range):
        raise ToolError("view_range is [first_line, last_line] (1-based integers; -1 for the end)")
    start, end = view_range
    if start < 1 or (end != -1 and end < start):
        raise ToolError(f"view_range {list(view_range)} is not [first_line, last_line] with 1 <= first <= last (or -1)")
    return start, end


class Workbench:
    """Read access to the harness (locked files from harness_root, editable files from the
    scratch copy, the run's log and results) and write access to the editable surface only.

    Readable is structural, not a blacklist of names the agent might guess: a path is resolved
    (symlinks followed) and must stay inside harness_root, and neither the path asked for nor
    the file it resolves to may lie under a private glob (DEFAULT_PRIVATE and the harness's own)."""

    def __init__(self, ctx: AgentContext, scratch_tree: Path):
        self.ctx = ctx
        self.tree = Path(scratch_tree)
        self.root = Path(ctx.harness_root).resolve()
        self.private = tuple(DEFAULT_PRIVATE) + tuple(getattr(ctx, "private", ()) or ())
        self.run_files = {"log.md": ctx.log_md, "results.tsv": ctx.results_tsv}

    # paths --------------------------------------------------------------------------------
    @staticmethod
    def _relative(path) -> str:
        raw = checked_path(path).strip().replace("\\", "/")
        pure = PurePosixPath(raw)
        if pure.is_absolute() or ".." in pure.parts:
            raise ToolError(f"'{path}': give a path relative to the harness folder, without '..'")
        rel = pure.as_posix()
        return "" if rel == "." else rel

    def is_editable(self, rel: str) -> bool:
        return bool(rel) and matches_any(rel, self.ctx.editable) and not is_private(rel, self.private)

    def _locked(self, rel: str) -> Path:
        if rel and is_private(rel, self.private):
            raise ToolError(f"'{rel}' is private to the lab (known answers, evidence, records): "
                            "the agent's tools do not open it")
        target = (self.root / rel).resolve()
        if target != self.root and self.root not in target.parents:
            raise ToolError(f"'{rel}' lies outside the harness folder")
        inner = target.relative_to(self.root).as_posix() if target != self.root else ""
        if inner and is_private(inner, self.private):
            raise ToolError(f"'{rel}' leads to a file private to the lab: the agent's tools do not open it")
        return target

    def _writable(self, path) -> Path:
        rel = self._relative(path)
        if not self.is_editable(rel):
            raise ToolError(
                f"'{rel or path}' is not part of the editable surface ({', '.join(self.ctx.editable)}); "
                "it is locked: you may view it but not change it")
        return self.tree / rel

    def _editable_text(self, target: Path, path: str) -> str:
        if not target.is_file():
            raise ToolError(f"'{path}' does not exist; use create to write a new file")
        if target.stat().st_size > MAX_EDIT_BYTES:
            raise ToolError(f"'{path}' is larger than {MAX_EDIT_BYTES} bytes: the editor does not rewrite it")
        lines = _lines(target)
        if lines is None:
            raise ToolError(f"'{path}' is not a text file")
        return "".join(lines)

    # commands -----------------------------------------------------------------------------
    def view(self, path, view_range=None) -> str:
        path = checked_path(path)
        if path.startswith(RUN_PREFIX):
            name = path[len(RUN_PREFIX):]
            if name not in self.run_files:
                raise ToolError(f"the run has {', '.join(RUN_PREFIX + n for n in self.run_files)}; not '{path}'")
            _range(view_range)
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
        return read_numbered(target, view_range, rel)

    def _listing(self, rel: str) -> str:
        prefix = f"{rel}/" if rel else ""
        locked = []
        for p in tree_files(self.root / rel):
            full = prefix + p
            if self.is_editable(full) or is_private(full, self.private):
                continue
            try:
                self._locked(full)
            except ToolError:  # a symlink out of the folder or into a private one
                continue
            locked.append(p)
        editable = [p[len(prefix):] for p in editable_files(self.tree, self.ctx.editable) if p.startswith(prefix)]
        rows = sorted([(p, "") for p in locked] + [(p, "  (editable)") for p in editable])
        head = f"files under '{rel or '.'}' (editable ones are your scratch copies):\n"
        text = head + "\n".join(f"{prefix}{p}{mark}" for p, mark in rows[:500])
        if len(rows) > 500:
            text += f"\n... and {len(rows) - 500} more"
        return text + f"\nthe run's own files: {RUN_PREFIX}log.md, {RUN_PREFIX}results.tsv"

    def str_replace(self, path, old_str, new_str) -> str:
        target = self._writable(path)
        text = self._editable_text(target, path)
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

    def create(self, path, file_text) -> str:
        target = self._writable(path)
        existed = target.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file_text or "")
        return f"{'overwrote' if existed else 'created'} '{path}'"

    def insert(self, path, insert_line, insert_text) -> str:
        target = self._writable(path)
        lines = self._editable_text(target, path).splitlines(keepends=True)
        if not 0 <= insert_line <= len(lines):
            raise ToolError(f"insert_line must be between 0 and {len(lines)} (the text goes after that line)")
        if lines and not lines[-1].endswith("\n") and insert_line == len(lines):
            lines[-1] += "\n"
        new = insert_text if insert_text.endswith("\n") else insert_text + "\n"
        lines[insert_line:insert_line] = [new]
        target.write_text("".join(lines))
        return f"inserted {new.count(chr(10))} line(s) after line {insert_line} of '{path}'"

    def edit(self, args) -> str:
        """The `editor` tool: view / str_replace / create / insert. Total: any input gives a
        result or a ToolError."""
        if not isinstance(args, dict):
            raise ToolError("the editor takes an object of arguments")
        command = _arg(args, "command", str, required=True)
        path = checked_path(_arg(args, "path", str, required=True))
        if command == "view":
            return self.view(path, _arg(args, "view_range", list))
        if command == "str_replace":
            return self.str_replace(path, _arg(args, "old_str", str, required=True),
                                    _arg(args, "new_str", str, default=""))
        if command == "create":
            if "file_text" not in args:
                raise ToolError("create needs file_text: the whole content of the file")
            return self.create(path, _arg(args, "file_text", str, required=True))
        if command == "insert":
            if "insert_line" not in args or "insert_text" not in args:
                raise ToolError("insert needs insert_line and insert_text")
            return self.insert(path, _arg(args, "insert_line", int, required=True),
                               _arg(args, "insert_text", str, required=True))
        raise ToolError(f"unknown command '{command}': use view, str_replace, create or insert")


def _numbered(text: str, view_range, name: str) -> str:
    lines = text.splitlines()
    start, end = _range(view_range)
    end = len(lines) if end == -1 else min(end, len(lines))
    if view_range and not 1 <= start <= max(end, 1):
        raise ToolError(f"view_range {view_range} is outside '{name}' ({len(lines)} lines)")
    out, size = [], 0
    for i in range(start, end + 1):
        row = f"{i:6}\t{lines[i - 1][:MAX_LINE_CHARS]}"
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
        path = Path(ctx.incumbent_tree) / rel
        if path.stat().st_size > MAX_SOURCE_CHARS * 4:  # never read a huge file whole
            parts.append(f"### {rel}\n(too long to inline here: view it with the editor)")
            continue
        lines = _lines(path)
        text = "".join(lines) if lines is not None else "(binary file)"
        if size + len(text) > MAX_SOURCE_CHARS:
            parts.append(f"### {rel}\n(too long to inline here: view it with the editor)")
            continue
        size += len(text)
        parts.append(f"### {rel}\n{_fence(text)}")
    return "\n\n".join(parts) or "(the incumbent holds no editable file yet)"


MAX_RESULT_ROWS = 40  # the latest rows of results.tsv in a brief (keeps always; the memory has all)


def _results_view(tsv: str) -> str:
    """results.tsv for a brief: the header, every keep, and the latest MAX_RESULT_ROWS rows."""
    lines = (tsv or "").splitlines()
    if len(lines) <= MAX_RESULT_ROWS + 1:
        return tsv
    head, rows = lines[0], lines[1:]
    latest = set(range(len(rows) - MAX_RESULT_ROWS, len(rows)))
    shown = [r for i, r in enumerate(rows) if i in latest or f"\t{KEEP}\t" in r]
    return "\n".join([head, f"({len(rows) - len(shown)} earlier rows not shown: the run memory has every experiment)",
                      *shown])


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def run_brief(ctx: AgentContext, source: bool = True) -> str:
    """What an agent needs to know before it proposes: the time and money left, the surface, the
    current best source, the results so far, the run memory (every experiment with its outcome),
    the recent failures with their oracle lines, a change of direction if the lab asks one, and
    the tail of the log."""
    left = []
    if ctx.seconds_left is not None:
        left.append(f"{_hours(max(ctx.seconds_left, 0))} of the time budget left")
    if ctx.usd_left is not None:
        left.append(f"${max(ctx.usd_left, 0):.2f} of the spend limit left (${ctx.spent_usd:.2f} spent)")
    elif ctx.spent_usd:
        left.append(f"${ctx.spent_usd:.2f} spent (no spend limit)")
    sections = [
        f"# Harness `{ctx.harness_name}`",
        "Editable files (globs relative to the harness folder): "
        + ", ".join(f"`{g}`" for g in ctx.editable) + ". Every other file is locked.",
    ]
    if left:
        sections.append("Run: " + "; ".join(left) + ".")
    if ctx.direction:
        sections.append("## The lab asks for a change of approach\n\n" + ctx.direction)
    if source:
        sections.append("## Current best source (the incumbent)\n\n" + incumbent_source(ctx))
    sections.append("## Results so far (results.tsv)\n\n" + _fence(_results_view(ctx.results_tsv) or "(none yet)"))
    if ctx.memory:
        sections.append(ctx.memory)
    elif ctx.tried_hypotheses:
        tried = [h for h in ctx.tried_hypotheses if h][-40:]
        sections.append("## Hypotheses already tried (do not repeat one)\n\n" + "\n".join(f"- {h}" for h in tried))
    if ctx.recent_failures:
        sections.append("## Recent failures with the oracle's lines (fix the cause or avoid the idea)\n\n"
                        + "\n".join(f"- {f}" for f in ctx.recent_failures))
    log = ctx.log_md or ""
    if len(log) > MAX_LOG_CHARS:
        log = "(earlier entries cut: the run memory above holds every experiment)\n" + log[-MAX_LOG_CHARS:]
    sections.append("## Experiment log (log.md, latest entries)\n\n" + (log or "(empty)"))
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
