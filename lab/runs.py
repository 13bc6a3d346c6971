"""Runs by name: the one way a command finds a run folder, tells its state, and cleans it up.

A run is named by its folder's path or by its name under the runs folder (`--runs`, default
`runs/`), or by the start of a name when only one run has it. Its state comes from two places:
the owner lock (lab/store.py: a live process holds it; its pid is in `.owner`) and the events
(a process that ended on its own appended `run_stopped`):

    running   a live process owns the folder
    stopped   its last process ended and said so (budget, Ctrl-C, no more proposals, a try done)
    died      its last process ended without a word (kill -9, a crash, a reboot): resumable
    cleaned   `lab clean` removed its worktree and branch; its folder (events, ledger, log) stays

`lab try` goes on with one standing run per harness (`standing_try_run`, `try_lab`) rather than
a new folder, branch and worktree each time; `lab clean` removes finished runs' worktrees and
branches; `lab run --resume` goes on with a run's recorded settings (`resumed_settings`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError, RunFolderBusy, RunFolderError
from .store import RUN_FILE, RunFolder, active_seconds, now_iso

DEFAULT_RUNS = Path("runs")
RUNNING, STOPPED, DIED, CLEANED = "running", "stopped", "died", "cleaned"


def run_folders(runs_dir: Path) -> list[Path]:
    """Every run folder directly under `runs_dir`, by name (for one harness: oldest first)."""
    runs_dir = Path(runs_dir)
    return sorted(p.parent for p in runs_dir.glob(f"*/{RUN_FILE}")) if runs_dir.is_dir() else []


def resolve(ref: str | Path, runs_dir: Path = DEFAULT_RUNS) -> Path:
    """The run folder `ref` names: a folder's path, a name under `runs_dir`, or the start of
    exactly one name there. RunFolderError, saying what to give, otherwise."""
    path, runs_dir = Path(ref), Path(runs_dir)
    for candidate in (path, runs_dir / str(ref)):
        if (candidate / RUN_FILE).is_file():
            return candidate
    if path.is_dir():
        return path  # not a run folder: RunFolder.open says so
    matches = [p for p in run_folders(runs_dir) if p.name.startswith(str(ref))]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RunFolderError(f"'{ref}' is the start of {len(matches)} runs under {runs_dir} "
                             f"({', '.join(p.name for p in matches[:4])}{', ...' if len(matches) > 4 else ''}): "
                             "give more of the name")
    raise RunFolderError(f"no run named '{ref}' under {runs_dir}/ (`lab status` lists them; a run made with "
                         "--runs DIR is found with the same --runs DIR), nor a run folder at that path")


def open_run(ref: str | Path, runs_dir: Path = DEFAULT_RUNS, worktree: bool = False) -> RunFolder:
    """The run `ref` names, opened. `worktree`: the caller needs the run's git worktree (resume,
    export), which `lab clean` removes: a cleaned run is refused, saying so."""
    folder = RunFolder.open(resolve(ref, runs_dir))
    cleaned = folder.meta.get("cleaned")
    if worktree and cleaned:
        raise RunFolderError(f"{folder.path} was cleaned ({cleaned['time']}: `lab clean` removed its worktree"
                             f"{' and branch' if cleaned.get('branch') else ''}); its log and ledger remain "
                             "(`lab log`): start a new run")
    return folder


# --- state ----------------------------------------------------------------------------------
@dataclass
class RunStatus:
    state: str  # RUNNING, STOPPED, DIED or CLEANED
    pid: int | None = None  # the owner's, while running (0: not yet written)

    def __str__(self) -> str:
        return f"{self.state} {self.pid}" if self.state == RUNNING and self.pid else self.state


def status_of(folder: RunFolder, events: list[dict] | None = None) -> RunStatus:
    pid = folder.owner()
    if pid is not None:
        return RunStatus(RUNNING, pid)
    if folder.meta.get("cleaned"):
        return RunStatus(CLEANED)
    events = folder.events() if events is None else events
    starts = [i for i, e in enumerate(events) if e["type"] in ("run_started", "resumed")]
    session = events[starts[-1]:] if starts else events
    return RunStatus(STOPPED if any(e["type"] == "run_stopped" for e in session) else DIED)


# --- lab try's standing run -----------------------------------------------------------------
def standing_try_run(harness, env, runs_dir: Path) -> Path | None:
    """The latest run of kind 'try' that a new `lab try` of `harness` goes on with: the same
    harness folder, locked files, environment and model, started from the editable source the
    repository's HEAD holds now, neither cleaned nor owned by a live process. None: start one."""
    from .workspace import source_repo

    repo, prefix = source_repo(harness)
    model = (harness.model_identity() or {}).get("sha256")
    for path in reversed(run_folders(runs_dir)):
        folder = RunFolder.open(path)
        meta = folder.meta
        if (meta.get("kind") != "try" or meta.get("harness_root") != str(harness.root)
                or meta.get("harness_lock") != harness.lock_digest() or meta.get("environment") != env.reference()
                or (meta.get("workload_model") or {}).get("sha256") != model or meta.get("cleaned")):
            continue
        if _source_changed(repo, meta["base_commit"], prefix) or folder.owner() is not None:
            continue
        return path
    return None


def try_lab(harness, env, runs_dir: Path, folder: RunFolder | None = None, new_run: bool = False,
            confirm: bool = True, display=None, patch: str | None = None):
    """The Lab (lab/loop.py) a `lab try` goes on in, and whether it is the harness's standing try
    run: the run `folder` (the caller holds it), else the standing one unless `new_run`, each
    resumed with its recorded settings; else a new run of kind 'try' in `env`. `confirm`: a
    KEEP gets its confirming run.

    `patch`, where a new run would be made: checked first against the harness's source as it is
    in the checkout, so a patch that cannot apply raises PatchRejected before any run folder,
    branch or worktree exists. (The new run's tree is the committed one; a patch the check lets
    through is checked again there, and a refusal there is recorded as that run's experiment.)"""
    from dataclasses import replace

    from .loop import Lab, Settings
    from .workspace import check_patch

    standing = None if folder or new_run else standing_try_run(harness, env, runs_dir)
    path = folder.path if folder else standing
    if path:
        recorded = Settings(**RunFolder.open(path).meta.get("settings", {}))
        return Lab.resume(path, harness, env, replace(recorded, confirm=confirm), display=display), bool(standing)
    if patch is not None:
        check_patch(patch, harness.source_tree(), harness)
    settings = Settings(confirm=confirm, env=env.name, agent="manual")
    return Lab.start(harness, runs_dir, env, settings, display=display, kind="try"), False


def _source_changed(repo: Path, base: str, prefix: str) -> bool:
    """Whether the harness's tree at HEAD differs from `base` (or `base` is gone)."""
    from . import git

    return git.run(repo, "diff", "--quiet", base, "HEAD", "--", prefix or ".").returncode != 0


# --- lab clean ------------------------------------------------------------------------------
def clean(runs_dir: Path, *, folders: bool = False, kept: bool = False, dry_run: bool = False) -> list[tuple[str, str]]:
    """Remove the worktrees and branches of runs no process owns; (run name, what was done) for
    each run. A running run is never touched; a run whose branch holds kept results is left
    alone unless `kept`; `folders` removes the run folders too. `dry_run`: say, do nothing."""
    done = []
    for path in run_folders(runs_dir):
        folder = RunFolder.open(path)
        status = status_of(folder)
        if status.state == RUNNING:
            done.append((path.name, f"left alone: running (pid {status.pid})"))
            continue
        events = folder.events()
        n_kept = sum(1 for e in events if e["type"] == "kept")
        if n_kept and not kept and status.state != CLEANED:
            done.append((path.name, f"left alone: its branch holds {n_kept} kept result(s); `lab export "
                                    f"{path.name}` first, then clean with --kept"))
            continue
        what = [] if status.state == CLEANED else ["worktree", "branch"]
        if folders:
            what.append("folder")
        if not what:
            continue
        if not dry_run:
            try:
                folder.hold()  # no process can resume it while it is taken apart
            except RunFolderBusy:
                done.append((path.name, "left alone: a process took it meanwhile"))
                continue
            if status.state != CLEANED:
                _remove_worktree_and_branch(folder)
                folder.update_meta(cleaned={"time": now_iso(), "branch": folder.meta.get("branch")})
            if folders:
                shutil.rmtree(folder.path)
        done.append((path.name, ("would remove " if dry_run else "removed ") + ", ".join(what)
                     + f" ({status.state})"))
    return done


def _remove_worktree_and_branch(folder: RunFolder) -> None:
    from .git import git

    meta = folder.meta
    repo = Path(meta.get("repo", ""))
    if (repo / ".git").exists():
        if folder.worktree.exists():
            git(repo, "worktree", "remove", "--force", str(folder.worktree), check=False)
        git(repo, "worktree", "prune", check=False)
        if meta.get("branch"):
            git(repo, "branch", "-D", meta["branch"], check=False)
    if folder.worktree.exists():  # its repository is gone, or git would not remove it
        shutil.rmtree(folder.worktree)


# --- resuming a run -------------------------------------------------------------------------
def resumed_settings(folder: RunFolder, given: dict, typed: set[str]) -> tuple[dict, float]:
    """The settings (Settings fields) a resumed run goes on with: the recorded ones, overridden
    only by those of `given` that its command line typed (`typed`, never a default), and its
    total budget. The budget is the rest of the recorded one; a budget typed again is that much
    more from now."""
    from dataclasses import fields

    from .loop import Settings

    known = {f.name for f in fields(Settings)}
    recorded = {k: v for k, v in (folder.meta.get("settings") or {}).items() if k in known}
    values = {**recorded, **{k: v for k, v in given.items() if k in typed}}
    spent = active_seconds(folder.events())
    original = float(recorded.get("budget_s", given["budget_s"]))
    if "budget_s" in typed:
        values["budget_s"] = given["budget_s"]
        return values, spent + given["budget_s"]
    values["budget_s"] = original - spent
    if values["budget_s"] <= 0:
        raise LabError(f"{folder.path} has spent its budget ({spent / 3600:.2f} h of {original / 3600:.2f} h); "
                       "give --budget to go on for that much longer")
    return values, original


def format_duration(seconds: float) -> str:
    """Seconds as `lab run --budget` reads them: 8h, 45m, 1h30m, 90s."""
    seconds = max(int(round(seconds)), 1)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{unit}" for v, unit in ((h, "h"), (m, "m"), (s, "s")) if v) or "1s"


def resume_command(folder: RunFolder, runs_dir: Path = DEFAULT_RUNS, no_sandbox: bool = False) -> list[str]:
    """The arguments of the `lab` command that goes on with `folder`, with what it needs to go
    on: --runs where the run is not under the default folder, and more budget, experiments or
    dollars where the run spent its own (else the resumed run would stop at once); --no-sandbox
    is never taken from a run's record, so it is repeated when this process had it."""
    import statistics

    from .loop import RunState

    meta, events = folder.meta, folder.events()
    runs_dir = Path(runs_dir)
    under_runs = folder.path.parent.resolve() == runs_dir.resolve()
    args = ["run", "--resume", folder.path.name if under_runs else str(folder.path)]
    if under_runs and runs_dir != DEFAULT_RUNS:
        args += ["--runs", str(runs_dir)]
    settings = meta.get("settings") or {}
    state = RunState.from_events(events, meta)
    budget = float(settings.get("budget_s") or 0)
    expected = statistics.median(state.evaluation_seconds) if state.evaluation_seconds else 0.0
    if budget and budget - active_seconds(events) <= max(expected, 60.0):
        args += ["--budget", format_duration(budget)]
    if settings.get("max_experiments") and state.proposed >= settings["max_experiments"]:
        args += ["--max-experiments", str(state.proposed + settings["max_experiments"])]
    if settings.get("max_usd") and state.spent_usd >= settings["max_usd"]:
        args += ["--max-usd", f"{state.spent_usd + settings['max_usd']:.0f}"]
    if no_sandbox:
        args.append("--no-sandbox")
    return args
