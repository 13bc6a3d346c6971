"""The `lab` command. Thin: each command parses its options and calls one module function."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import LabError

ENV_OPTION = click.option("--env", "env_name", type=click.Choice(["native", "docker", "nix"]),
                          default="native", show_default=True, help="where the runner runs")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
RUNS_OPTION = click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path),
                           default=Path("runs"), show_default=True, help="folder of run folders")
NO_SANDBOX_OPTION = click.option(
    "--no-sandbox", is_flag=True,
    help="run candidate code without isolation (where no sandbox can be made); recorded in every "
         "fingerprint and printed with every verdict")
MODEL_OPTION = click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="the workload's model file, for a harness that runs one (llamacpp: a GGUF); "
                                 "default: the harness's own")


# Exit codes. reproduce adds its own 3-6 (docs/reproduce.md); a traceback (a bug) exits 1 too.
EXIT_KEPT = 0  # try: KEEP; check: PASS
EXIT_NOT_KEPT = 1  # try: measured and not kept (SAME, WORSE, FAIL, CRASH, TIMEOUT); check: not PASS
EXIT_REFUSED = 2  # refused: a patch the guard refuses or that does not apply, and every LabError
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


def _sandbox(no_sandbox: bool, env_name: str = "native") -> str:
    """Apply --no-sandbox (LAB_SANDBOX=off for every runner) or refuse to start where no sandbox
    can be made; returns what isolates candidate code, for the verdict lines. In a container the
    runner checks for itself: it refuses without a sandbox, and its record says which it used."""
    import os

    from . import sandbox

    if no_sandbox:
        os.environ[sandbox.ENV_MODE] = "off"
    elif env_name != "docker":
        sandbox.check_available()
    return sandbox.describe() if env_name != "docker" or no_sandbox else "bubblewrap in the container"


def _console():
    from rich.console import Console

    return Console()


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    _console().print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lab")
def cli():
    """A reproducible benchmark lab: an agent proposes, the lab measures and decides."""


# --- harnesses ---------------------------------------------------------------------------------
@cli.command()
@JSON_OPTION
def harnesses(as_json):
    """List the harnesses found, with their editable surfaces and environments."""
    from .harness import available, load

    found = []
    for name, folder in available().items():
        try:
            found.append(load(folder).describe())
        except LabError as exc:
            found.append({"name": name, "root": str(folder), "error": str(exc)})
    if as_json:
        return _print_json(found)
    _table("harnesses", ["name", "metric", "editable", "environment", "description"], [
        [h["name"], h.get("metric", {}).get("name", "?"), ", ".join(h.get("editable", [])),
         _env_text(h.get("environment", {})), h.get("description") or h.get("error", "")]
        for h in found
    ])


def _env_text(env: dict) -> str:
    parts = [p for p in (env.get("image"), env.get("dockerfile"), env.get("nix_shell")) if p]
    return (" | ".join(parts) or "native") + (" (GPU)" if env.get("needs_gpu") else "")


@cli.command()
@click.argument("harness")
def lock(harness):
    """Record the sha256 of every locked file of HARNESS in its lock.json."""
    from .harness import load, write_lock

    path = write_lock(load(harness))
    click.echo(f"wrote {path}")


# --- single evaluations ---------------------------------------------------------------------
def _harness_and_env(harness_name, env_name, model_path=None):
    """The harness and the environment a command evaluates in, each checked to be usable here."""
    from .envs import get
    from .harness import load

    harness = load(harness_name, model=model_path)
    harness.preflight()
    env = get(env_name, harness)
    env.preflight()
    return harness, env


def _one_evaluation(harness_name, src, against, env_name, mode, runs_dir, delta=None, model_path=None,
                    no_sandbox=False, time_cap=None):
    from . import stats
    from .evaluate import run_evaluation
    from .progress import Progress
    from .store import new_run_id

    isolation = _sandbox(no_sandbox, env_name)
    harness, env = _harness_and_env(harness_name, env_name, model_path)
    src = Path(src) if src else harness.source_tree()
    work = runs_dir / "records" / f"{new_run_id(harness.name)}-{mode}"
    with Progress(f"lab {'check' if mode == 'check' else 'bench'} {harness.name}"):
        outcome = run_evaluation(harness, src, work, env=env, mode=mode,
                                 incumbent_tree=Path(against) if against else harness.source_tree(),
                                 delta=delta or stats.MIN_DELTA, max_seconds=time_cap)
    if env_name == "docker" and not no_sandbox:
        isolation = outcome.evaluation.fingerprint.get("sandbox") or isolation
    return harness, outcome, isolation


def _report(harness, outcome, as_json, isolation) -> None:
    ev, v = outcome.evaluation, outcome.verdict
    if as_json:
        return _print_json({"verdict": v.to_dict(), "speedup": v.speedup, "record": str(outcome.record_path),
                            "sandbox": isolation,
                            "check": ev.check.to_dict() if ev.check else None, "reason": ev.reason})
    if ev.check:
        for line in ev.check.lines:
            click.echo(line)
    from . import fmt

    if ev.pairs:
        import statistics

        a = statistics.median(p.incumbent.value for p in ev.pairs)
        b = statistics.median(p.candidate.value for p in ev.pairs)
        click.echo(f"{harness.metric.name}: incumbent {fmt.number(a, harness.metric.unit)}, "
                   f"candidate {fmt.number(b, harness.metric.unit)} (medians of {len(ev.pairs)} pairs)")
    text = f"verdict: {fmt.verdict(v.to_dict())}"
    if v.reason or ev.reason:
        text += f"  — {v.reason or ev.reason}"
    click.echo(text)
    click.echo(f"sandbox: {isolation}")
    click.echo(f"record: {outcome.record_path}")


@cli.command()
@click.argument("harness")
@click.option("--src", type=click.Path(exists=True, file_okay=False), help="tree to check (default: the harness's own)")
@MODEL_OPTION
@ENV_OPTION
@RUNS_OPTION
@JSON_OPTION
@NO_SANDBOX_OPTION
def check(harness, src, model_path, env_name, runs_dir, as_json, no_sandbox):
    """Build a tree of HARNESS and run its oracle; print and record the verdict."""
    h, outcome, isolation = _one_evaluation(harness, src, None, env_name, "check", runs_dir,
                                            model_path=model_path, no_sandbox=no_sandbox)
    _report(h, outcome, as_json, isolation)
    sys.exit(EXIT_KEPT if outcome.verdict.status == "PASS" else EXIT_NOT_KEPT)


@cli.command()
@click.argument("harness")
@click.option("--src", type=click.Path(exists=True, file_okay=False), help="candidate tree (default: the harness's own)")
@click.option("--against", type=click.Path(exists=True, file_okay=False), help="incumbent tree (default: the harness's own)")
@click.option("--delta", type=float, help="decision threshold as a fraction (default 0.005)")
@click.option("--time-cap", type=float, help="timing budget in seconds (default: the harness's); "
              "a SAME says how long a decision would take")
@click.option("--against-record", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="an earlier record to report beside this one; refused if it came from another machine or software")
@MODEL_OPTION
@ENV_OPTION
@RUNS_OPTION
@JSON_OPTION
@NO_SANDBOX_OPTION
def bench(harness, src, against, delta, time_cap, against_record, model_path, env_name, runs_dir, as_json,
          no_sandbox):
    """One paired evaluation: candidate (--src) against incumbent (--against)."""
    _sandbox(no_sandbox, env_name)  # before the comparison: the sandbox is part of the fingerprint
    earlier = _comparable_record(harness, against_record, env_name, model_path) if against_record else None
    h, outcome, isolation = _one_evaluation(harness, src, against, env_name, "evaluate", runs_dir, delta,
                                            model_path, no_sandbox, time_cap)
    _report(h, outcome, as_json, isolation)
    if earlier is not None and not as_json:
        v = earlier.get("verdict") or {}
        click.echo(f"earlier record {against_record}: {v.get('status', earlier.get('status', '?'))}")


def _comparable_record(harness_name, path: Path, env_name, model_path=None) -> dict:
    """Refuse to set results side by side when their fingerprints differ, naming the fields."""
    from .envs import get
    from .errors import FingerprintMismatch
    from .evaluate import model_fingerprint
    from .harness import load
    from .system.fingerprint import collect, differences

    data = json.loads(path.read_text())
    h = load(harness_name, model=model_path)
    from . import sandbox

    now = collect(extra={"harness_lock": h.lock_digest(), "environment": get(env_name, h).reference(),
                         **model_fingerprint(h), "sandbox": sandbox.describe()})
    differ = differences(data.get("fingerprint") or {}, now)
    if differ:
        raise FingerprintMismatch(
            f"{path} comes from another machine or software ({', '.join(differ[:8])}"
            + ("..." if len(differ) > 8 else "") + "); results from different fingerprints are never compared")
    return data


@cli.command()
@click.argument("harness")
@click.option("--pairs", type=int, default=0, help="at least this many pairs (default: the harness's)")
@MODEL_OPTION
@ENV_OPTION
@RUNS_OPTION
@JSON_OPTION
@NO_SANDBOX_OPTION
def noise(harness, pairs, model_path, env_name, runs_dir, as_json, no_sandbox):
    """Measure the A/A noise floor of HARNESS on this machine."""
    isolation = _sandbox(no_sandbox, env_name)
    from . import stats
    from .evaluate import run_evaluation
    from .progress import Progress
    from .store import new_run_id

    h, env = _harness_and_env(harness, env_name, model_path)
    work = runs_dir / "records" / f"{new_run_id(h.name)}-noise"
    with Progress(f"lab noise {h.name}"):
        outcome = run_evaluation(h, h.source_tree(), work, env=env, mode="aa", min_pairs=pairs or None)
    ev = outcome.evaluation
    if ev.status or not ev.pairs or outcome.verdict.status == "FAIL":  # FAIL: e.g. a broken time
        raise LabError(f"no A/A measurement: {outcome.verdict.status} {outcome.verdict.reason or ev.reason}")
    report = stats.noise_report(stats.log_ratios(ev.pairs), ev.telemetry)
    report["sandbox"] = ev.fingerprint.get("sandbox") if env_name == "docker" and not no_sandbox else isolation
    report["record"] = str(outcome.record_path)
    if as_json:
        return _print_json(report)
    from .fmt import noise_rows

    _table(f"A/A noise of {h.name}", ["quantity", "value"], noise_rows(report))


@cli.command()
@click.argument("harness")
@click.option("--src", type=click.Path(exists=True, file_okay=False), help="tree to profile (default: the harness's own)")
@MODEL_OPTION
@ENV_OPTION
@RUNS_OPTION
@NO_SANDBOX_OPTION
def profile(harness, src, model_path, env_name, runs_dir, no_sandbox):
    """A profile digest of a build (for the agent; never used for a verdict).

    Built and profiled by the runner in the environment, candidate code in the sandbox: the
    agent's profile tool, run by hand."""
    from .progress import Progress
    from .store import new_run_id
    from .workbench import profile_digest

    _sandbox(no_sandbox, env_name)
    h, env = _harness_and_env(harness, env_name, model_path)
    work = runs_dir / "records" / f"{new_run_id(h.name)}-profile"
    with Progress(f"lab profile {h.name}"):
        digest = profile_digest(h, Path(src) if src else h.source_tree(), work, env)
    click.echo(digest)


# --- runs ------------------------------------------------------------------------------------
def _display(quiet: bool):
    if quiet:
        return None
    from .progress import clock_line

    return lambda text: click.echo(clock_line(text), err=True)


@cli.command("try")
@click.argument("harness")
@click.argument("patch", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--hypothesis", default="", help="one line: what should get faster and why")
@click.option("--run", "run_ref", help="add the experiment to this run (name or folder) "
              "[default: the harness's standing try run, made on first use]")
@click.option("--new-run", is_flag=True, help="start a new try run instead of going on with the standing one")
@click.option("--no-confirm", is_flag=True, help="skip the confirming run of a KEEP")
@MODEL_OPTION
@ENV_OPTION
@RUNS_OPTION
@JSON_OPTION
@NO_SANDBOX_OPTION
def try_(harness, patch, hypothesis, run_ref, new_run, no_confirm, model_path, env_name, runs_dir, as_json,
         no_sandbox):
    """A person's idea through the same gate as an agent's: apply PATCH, evaluate, decide.

    Tries of one harness go on in one standing run (its noise floor measured once, its kept tries
    the incumbent of the next) unless --run names another or --new-run starts one. The patch is
    checked (editable surface, regular files, applies to the incumbent) before anything is
    measured. Exit 0: KEEP; 1: measured and not kept; 2: refused (the patch, or the run)."""
    isolation = _sandbox(no_sandbox, env_name)
    from .errors import PatchRejected
    from .runs import try_lab

    if run_ref and new_run:
        raise click.UsageError("--run and --new-run exclude each other")
    folder, env_name = _try_run_folder(run_ref, runs_dir, env_name)
    h, env = _harness_and_env(harness, env_name, model_path)
    text = Path(patch).read_text()
    try:
        lab, standing = try_lab(h, env, runs_dir, folder, new_run, confirm=not no_confirm,
                                display=_display(as_json), patch=text)
    except PatchRejected as exc:  # refused before a run existed: nothing was made
        if as_json:
            _print_json({"run": None, "event": {"type": "rejected", "reason": exc.reason, "detail": exc.detail},
                         "refused": str(exc), "sandbox": isolation, "exit": EXIT_REFUSED})
        else:
            click.echo(f"refused ({exc}); no run was made")
        sys.exit(EXIT_REFUSED)
    event = lab.try_patch(text, hypothesis or Path(patch).stem)
    code = _try_exit_code(event)
    if as_json:
        _print_json({"run": str(lab.folder.path), "event": event, "sandbox": isolation, "exit": code})
        sys.exit(code)
    click.echo(_try_line(event, len(lab.state().kept) if standing else 0))
    click.echo(f"sandbox: {isolation}")
    click.echo(f"run: {lab.folder.path}" + (" (the standing try run of this harness; --new-run for a fresh one)"
                                                 if standing else ""))
    sys.exit(code)


def _try_run_folder(run_ref, runs_dir, env_name):
    """The run --run names, held (one owner per run folder), and the environment of the try: the
    run's own unless --env is given. (None, env_name) without --run."""
    if not run_ref:
        return None, env_name
    from click.core import ParameterSource

    from .runs import open_run

    folder = open_run(run_ref, runs_dir, worktree=True)
    folder.hold()
    if click.get_current_context().get_parameter_source("env_name") == ParameterSource.DEFAULT:
        env_name = (folder.meta.get("settings") or {}).get("env") or env_name
    return folder, env_name


def _try_exit_code(event: dict) -> int:
    from .records import KEEP
    from .store import event_status

    if event["type"] == "rejected":
        return EXIT_REFUSED
    return EXIT_KEPT if event_status(event) == KEEP else EXIT_NOT_KEPT


# Refusals that a fresh run (--new-run) may not meet: the standing run's incumbent is not the checkout's.
AGAINST_THE_INCUMBENT = ("does not apply", "duplicate", "applies to nothing")


def _try_line(event: dict, standing_kept: int) -> str:
    """lab try's line of the experiment; `standing_kept`: the kept tries in the incumbent of the
    standing run it went on in (0: not a standing run)."""
    from .display import event_line

    if event["type"] == "rejected":
        line = f"#{event['number']} refused ({event['reason']}): {event.get('detail') or event.get('description', '')}"
        if standing_kept and event["reason"] in AGAINST_THE_INCUMBENT:
            line += (f"; this run's incumbent holds {standing_kept} kept tr{'y' if standing_kept == 1 else 'ies'}: "
                     "--new-run tries it against the checkout's source")
        return line
    return event_line(event)  # the live view's line of the same event


RUN_ARGUMENT = click.argument("run_ref", metavar="RUN")


@cli.command()
@RUN_ARGUMENT
@RUNS_OPTION
@JSON_OPTION
def log(run_ref, runs_dir, as_json):
    """Show a run's log (rebuilt from its events). RUN: a run's name (see `lab status`) or folder."""
    from .runs import open_run

    folder = open_run(run_ref, runs_dir)
    folder.render()
    if as_json:
        return _print_json(folder.events())
    click.echo((folder.path / "log.md").read_text())
    click.echo((folder.path / "results.tsv").read_text())


@cli.command()
@RUNS_OPTION
@JSON_OPTION
def status(runs_dir, as_json):
    """List the runs under --runs: state (running with its pid, stopped, died, cleaned) and progress."""
    from .loop import RunState
    from .runs import run_folders, status_of
    from .store import RunFolder

    rows = []
    for path in run_folders(runs_dir):
        folder = RunFolder.open(path)
        events = folder.events()
        st = RunState.from_events(events, folder.meta)
        state = status_of(folder, events)
        rows.append({"run": path.name, "harness": folder.meta.get("harness"), "state": state.state,
                     "pid": state.pid, "proposals": st.proposed, "verdicts": st.verdicts, "kept": len(st.kept),
                     "best_speedup": round(st.best_speedup, 4), "spent_usd": round(st.spent_usd, 4),
                     "last": events[-1]["type"] if events else "", "updated": events[-1]["time"] if events else ""})
    if as_json:
        return _print_json(rows)
    if not rows:
        return click.echo(f"no runs under {runs_dir}/")
    # Plain columns that fit 80 with the longest harness name: a name is never cut (it is what
    # log, report, export and --resume take); the harness is its first word.
    width = max(len(r["run"]) for r in rows)
    click.echo(f"{'run':<{width}}  {'state':<15} {'exp':>3} {'kept':>4} {'best':>6} {'$':>6} {'when':>5}")
    for r in rows:
        state = f"{r['state']} {r['pid']}" if r["state"] == "running" and r["pid"] else r["state"]
        click.echo(f"{r['run']:<{width}}  {state:<15} {r['proposals']:>3} {r['kept']:>4} {r['best_speedup']:>5.2f}x "
                   f"{r['spent_usd']:>6.2f} {_when(r['updated']):>5}")


def _when(iso: str) -> str:
    """An event's time, local: HH:MM today, else MM-DD."""
    import datetime as dt

    if not iso:
        return ""
    t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    return t.strftime("%H:%M") if t.date() == dt.datetime.now().astimezone().date() else t.strftime("%m-%d")


@cli.command()
@RUN_ARGUMENT
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write")
@RUNS_OPTION
def report(run_ref, out, runs_dir):
    """Write a progress plot of a run (every experiment, the running best, the noise band)."""
    from .report import write_report
    from .runs import resolve

    click.echo(f"wrote {write_report(resolve(run_ref, runs_dir), out)}")


@cli.command()
@RUNS_OPTION
@click.option("--folders", is_flag=True, help="remove the run folders too (events, ledger, log, records)")
@click.option("--kept", is_flag=True, help="also runs whose branch holds kept results (export them first)")
@click.option("-n", "--dry-run", is_flag=True, help="say what would be removed; remove nothing")
def clean(runs_dir, folders, kept, dry_run):
    """Remove the worktrees and branches of the runs under --runs that no process owns.

    A running run is never touched; a run with kept results is left alone unless --kept. Run
    folders stay (`lab log` and `lab status` still show them) unless --folders."""
    from .runs import clean as clean_runs

    done = clean_runs(runs_dir, folders=folders, kept=kept, dry_run=dry_run)
    for name, what in done:
        click.echo(f"{name}: {what}")
    if not done:
        click.echo(f"nothing to clean under {runs_dir}/")


@cli.command()
@click.argument("harness")
@click.option("--registry", required=True, help="e.g. 127.0.0.1:5000 or ghcr.io/you")
@click.option("--dockerfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="default: the harness's (Dockerfile.cuda or Dockerfile.cpu)")
@click.option("--base-image", help="override the Dockerfile's pinned BASE_IMAGE (e.g. a local mirror)")
@click.option("--tag", help="image tag (default: <lab version>-<lock digest>)")
@JSON_OPTION
def publish(harness, registry, dockerfile, base_image, tag, as_json):
    """Build, label and push HARNESS's image; pull it back by digest; write image.lock.json."""
    from .harness import load
    from .publish import publish as publish_image

    record = publish_image(load(harness), registry, dockerfile=dockerfile, base_image=base_image, tag=tag)
    if as_json:
        return _print_json(record)
    click.echo(f"published {record['image']}")


@cli.command()
@RUN_ARGUMENT
@click.option("--experiment", help="commit (prefix) or number of the experiment (default: the last kept)")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="bundle file to write")
@RUNS_OPTION
def export(run_ref, experiment, out, runs_dir):
    """Write a bundle of a kept result that a colleague can reproduce with one command."""
    from .bundle import export as export_bundle
    from .harness import load
    from .runs import open_run

    folder = open_run(run_ref, runs_dir, worktree=True)
    harness = load(folder.meta["harness_root"])
    click.echo(f"wrote {export_bundle(folder.path, harness, experiment, out)}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--env", "env_name", type=click.Choice(["auto", "native", "docker", "nix"]), default="auto",
              show_default=True, help="auto: the bundle's image by digest when it names one, else native")
@click.option("--harness", "harness_ref", help="harness name or folder (default: the bundle's harness by name)")
@MODEL_OPTION
@RUNS_OPTION
@JSON_OPTION
@NO_SANDBOX_OPTION
def reproduce(bundle, env_name, harness_ref, model_path, runs_dir, as_json, no_sandbox):
    """Reproduce a bundle: same build, same outputs on the recorded seeds, the speedup re-timed.

    Exit 0: reproduced (correct, artifacts and outputs identical, speedup consistent); 2: refused
    before anything ran (damaged or hostile bundle, other harness or model); 3: incorrect on the
    recorded seeds; 4: outputs differ; 5: an artifact differs; 6: the speedup was not reproduced
    (another verdict, or a CI that does not overlap the recorded one)."""
    from .bundle import peek, reproduce as reproduce_bundle
    from .envs import get
    from .envs.docker import DockerEnv
    from .harness import load
    from .store import new_run_id

    data = peek(bundle)
    harness = load(harness_ref or data.get("harness", ""), model=model_path)
    recorded_env = str(data.get("environment", ""))
    if env_name == "docker" or (env_name == "auto" and "@sha256:" in recorded_env):
        env = DockerEnv(harness, image=recorded_env if "@sha256:" in recorded_env else None)
    else:
        env = get("native" if env_name == "auto" else env_name, harness)
    isolation = _sandbox(no_sandbox, env.name)
    from .progress import Progress

    with Progress(f"lab reproduce {bundle.name}"):
        report = reproduce_bundle(bundle, harness, env, runs_dir / "records" / f"{new_run_id(harness.name)}-reproduce")
    if as_json:
        _print_json({**report, "sandbox": isolation})
    else:
        from . import fmt as numbers

        def fmt(v):
            return (f"{v['status']} {numbers.speedup(v['speedup'])} ({numbers.ci(*v['ci'])}, {v['pairs']} pairs)"
                    if v.get("speedup") and v.get("ci") else str(v.get("status")))

        def same(flag, yes="identical", no="DIFFERENT"):
            return yes if flag else no
        cumulative = report["speedup_recorded_cumulative"]
        _table(f"reproduction of {bundle.name}", ["", "claimed (the bundle)", "re-measured here", ""], [
            ["environment", report["environment_recorded"], report["environment_now"], ""],
            ["candidate artifact", report["artifact_recorded"][:16], report["artifact_now"][:16],
             same(report["artifact_identical"])],
            ["base artifact", report["base_artifact_recorded"][:16], report["base_artifact_now"][:16],
             same(report["base_artifact_identical"])],
            ["oracle outputs on the recorded seeds", "recorded hashes", "", same(report["outputs_identical"])],
            ["correctness", "pass", "pass" if report["correct"] else "FAIL", same(report["correct"], "ok", "FAILED")],
            ["speedup over the base", fmt(report["speedup_recorded"])
             + (f"; cumulative {numbers.speedup(cumulative)}" if isinstance(cumulative, (int, float)) else ""),
             fmt(report["speedup_now"]), same(report["speedup_consistent"], "consistent", "NOT REPRODUCED")],
            ["fingerprint fields that differ", "", ", ".join(report["fingerprint_differences"]) or "none", ""],
            ["sandbox", "", isolation, ""],
        ])
        click.echo("reproduced" if report["ok"] else
                   f"NOT reproduced: {', '.join(report['failed'])} (exit {report['exit_code']})")
    sys.exit(report["exit_code"])


DEFAULT_MAX_USD = 100.0  # the run's default spend limit: about three times the estimate of an 8 h run


def parse_duration(text: str) -> float:
    """'8h', '45m', '90s', '1h30m' -> seconds."""
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", text)
    if not parts or not any(parts.groups()):
        raise click.BadParameter(f"'{text}' is not a duration; write e.g. 8h, 45m, 90s or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


@cli.command()
@click.argument("harness", required=False)
@click.option("--budget", default="8h", show_default=True, help="wall-clock budget, e.g. 8h, 45m")
@click.option("--max-experiments", type=int, default=0, help="stop after this many proposals")
@click.option("--max-usd", type=float, default=DEFAULT_MAX_USD, show_default=True,
              help="stop when the agent has spent this much (USD, the whole run; 0: no limit); "
                   "the estimated cost is printed at start")
@click.option("--agent", "agent_spec", default="anthropic", show_default=True,
              help="anthropic | command:CMD | replay:FILE")
@click.option("--agent-model", "agent_model", default=None,
              help="model id for the anthropic agent (or --agent anthropic:MODEL)")
@click.option("--agent-effort", type=click.Choice(["low", "medium", "high", "xhigh", "max", "off"]), default=None,
              help="the anthropic agent's effort for proposals (research one level higher) "
                   "[default: medium, research high]")
@click.option("--agent-max-tokens", type=int, default=None,
              help="output limit of one response, thinking included (streamed) [default: 32000]")
@click.option("--no-thinking", is_flag=True, help="send no thinking setting (the model's own default) instead of adaptive thinking")
@click.option("--max-episode-usd", type=float, default=None,
              help="end one proposal's episode when it has cost this much [default: 5]")
@click.option("--max-api-wait", default="30m", show_default=True,
              help="how long one API outage (529, 429, 5xx, connection) is waited out before that "
                   "proposal is given up (the run goes on)")
@MODEL_OPTION
@click.option("--web-search", is_flag=True, help="let the research step use the API's web search")
@click.option("--delta", type=float, help="decision threshold as a fraction (default: from the noise floor)")
@click.option("--gpu", "gpu_index", type=int, default=0, show_default=True)
@click.option("--gpus", "gpus_text", help="parallel: one evaluation at a time per GPU, e.g. 0,1 "
              "(with --executor ray: as many at a time as GPUs named; default: the cluster's)")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="where evaluations run (default local; ray: tasks on the cluster at --address)")
@click.option("--address", default=None, help="the Ray cluster's head, HOST:PORT")
@click.option("--resume", "resume_ref", metavar="RUN", help="continue this run (its name or folder)")
@click.option("--quiet", is_flag=True)
@ENV_OPTION
@RUNS_OPTION
@NO_SANDBOX_OPTION
def run(harness, budget, max_experiments, max_usd, agent_spec, agent_model, agent_effort, agent_max_tokens,
        no_thinking, max_episode_usd, max_api_wait, model_path, web_search, delta,
        gpu_index, gpus_text, executor, address, resume_ref, quiet, env_name, runs_dir, no_sandbox):
    """The main job: let an agent hill-climb HARNESS until a budget ends.

    With --resume RUN the run keeps every setting it was started with (agent, models, limits, env,
    GPUs, ...) except the options given again; its budget is what is left of the original one
    (--budget given again: this much more from now). A run cannot change its environment or its
    model. One process owns a run folder at a time."""
    # --no-sandbox is never taken from a run's record: a resumed run is sandboxed unless the user
    # says so again on this command line.
    from .display import LiveView
    from .loop import Lab, Settings

    values, total_budget, folder = _run_settings(click.get_current_context(), resume_ref, runs_dir)
    harness = harness or (folder.meta.get("harness_root") if folder else None)
    if not harness:
        raise click.UsageError("name a harness (see `lab harnesses`) or give --resume RUN")
    isolation = _sandbox(no_sandbox, values["env"])  # no sandbox here and no --no-sandbox: stop now
    h, env, agent = _ready_to_run(harness, model_path, values, resumed=folder is not None)
    settings = Settings(**values)
    view = LiveView(settings.budget_s)
    lab = Lab.launch(h, env, settings, runs_dir, resume=folder.path if folder else None,
                     total_budget=total_budget, display=None if quiet else view)
    view.lab = lab
    click.echo(f"run folder: {lab.folder.path} (branch {lab.folder.meta['branch']}); sandbox: {isolation}")
    plan = _print_agent_plan(agent, settings.budget_s, settings.max_usd)
    if plan:  # in log.md too, for the morning
        lab.folder.append("note", kind="agent_plan", text=plan.replace("\n", "; "))
    reason = _loop_to_the_end(lab, agent, None if quiet else view, runs_dir, no_sandbox)
    click.echo(f"stopped: {reason}")
    _print_summary(lab.summary())
    click.echo(f"sandbox: {isolation}")
    click.echo(_resume_line(lab.folder, runs_dir, no_sandbox))


def _run_settings(ctx, resume_ref, runs_dir):
    """The Settings fields a run starts or goes on with, its total budget, and with --resume its
    folder, held. Bad input (a budget, GPUs) is refused before anything starts; a second owner of
    the folder before an agent or a measurement exists."""
    from .runs import open_run, resumed_settings

    given = _given_settings(ctx)
    folder = None
    if resume_ref:
        folder = open_run(resume_ref, runs_dir, worktree=True)
        folder.hold()
        typed = _typed_settings(ctx)
        if (folder.meta.get("settings") or {}).get("agent") == "manual" and "agent" not in typed:
            raise click.UsageError(f"{folder.path} was made by `lab try`: name the agent that goes on with it (--agent)")
        values, total_budget = resumed_settings(folder, given, typed)
    else:
        values, total_budget = {k: v for k, v in given.items() if v is not None}, given["budget_s"]
    values["executor"] = values.get("executor") or "local"
    values["address"] = values.get("address") or ""
    if values["executor"] == "ray" and not values["address"]:
        raise click.UsageError("--executor ray needs --address HOST:PORT (the Ray head)")
    return values, total_budget, folder


def _ready_to_run(harness_ref, model_path, values: dict, resumed: bool):
    """The harness, environment and agent of a run. What this machine lacks for the run (a GPU, a
    key) stops it before an agent or a run folder exists, all of it said at once, with the
    command that works here instead."""
    from .agents import AgentFatal, make_agent
    from .envs import get
    from .errors import EnvironmentUnavailable, MissingExtra
    from .harness import load

    h = load(harness_ref, model=model_path)  # a resumed run takes its recorded model (Lab.resume)
    missing = []
    try:
        h.preflight()
    except EnvironmentUnavailable as exc:
        missing.append(str(exc))
    harness_runs = not missing
    env = get(values["env"], h)
    if harness_runs:
        env.preflight()
    try:
        agent = make_agent(values["agent"], model=values.get("model"), web_search=values.get("web_search", False),
                           effort=values.get("agent_effort"), max_tokens=values.get("agent_max_tokens"),
                           thinking=values.get("thinking", True), max_episode_usd=values.get("max_episode_usd"),
                           max_api_wait_s=values.get("max_api_wait_s"))
    except (AgentFatal, MissingExtra) as exc:  # no key, no anthropic package
        missing.append(str(exc))
    if missing:
        instead = "" if resumed else _what_works_instead(harness_ref, h, harness_runs)
        raise EnvironmentUnavailable("; ".join(missing) + instead)
    return h, env, agent


def _loop_to_the_end(lab, agent, view, runs_dir, no_sandbox) -> str:
    """The run's loop (in the live `view`, None: quiet); why it stopped. However it ends, the run
    folder stays consistent and resumable: a second Ctrl-C exits 130 and an error 2, each with
    the command that resumes the run; a bug (not a LabError) raises its traceback."""
    started = time.monotonic()
    try:
        if view is None:
            return lab.loop(agent, started=started)
        with view:
            return lab.loop(agent, started=started)
    except KeyboardInterrupt:  # the second Ctrl-C (loop.Interrupts), caught here before Click makes it an Abort
        lab.record_stop("abandoned by a second Ctrl-C; the evaluation in flight is evaluated again on resume")
        click.echo(_resume_line(lab.folder, runs_dir, no_sandbox), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a fatal error
        lab.record_stop(f"error: {exc}"[:1000])
        if not isinstance(exc, LabError):
            click.echo(_resume_line(lab.folder, runs_dir, no_sandbox), err=True)
            raise  # a bug: its traceback
        click.echo(f"error: {exc}", err=True)
        click.echo(_resume_line(lab.folder, runs_dir, no_sandbox), err=True)
        sys.exit(EXIT_REFUSED)


def _resume_line(folder, runs_dir, no_sandbox) -> str:
    from .runs import resume_command

    return "resume: " + _command(*resume_command(folder, runs_dir, no_sandbox))


def _program() -> list[str]:
    """How this lab was started, for a command to copy: `lab` where that is the one on PATH, else
    as typed (`.venv/bin/lab`), else `python -m lab.cli` with this interpreter."""
    import os
    import shutil

    argv0 = sys.argv[0]
    if Path(argv0).name != "lab":
        return [sys.executable, "-m", "lab.cli"]
    on_path = shutil.which("lab")
    return ["lab" if on_path and os.path.samefile(on_path, argv0) else argv0]


def _command(*args: str) -> str:
    """A lab command line to copy and paste, as this lab was started."""
    import shlex

    return shlex.join([*_program(), *args])


def _shown(path: Path) -> str:
    """A path as a person would type it here: relative below the current folder, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


EXAMPLE_BUDGET = "10m"  # the CPU example's run takes about a minute; its replay file ends it


def _what_works_instead(harness_ref: str, harness, harness_runs: bool) -> str:
    """The exact command that works on this machine in place of a run it cannot make: the CPU
    example's replay where the harness cannot run here (no GPU), else the harness's own check
    and its recorded patches, which need no key."""
    from .harness import available, repo_root

    example = repo_root() / "examples" / "cdot"
    if not harness_runs:
        if harness.root == example:
            return ""
        name = "cdot" if available().get("cdot") == example else _shown(example)
        return (". What works on this machine instead (the CPU example, about a minute): `"
                + _command("run", name, "--agent", f"replay:{_shown(example / 'replay.jsonl')}", "--budget",
                           EXAMPLE_BUDGET) + "`")
    replay = next((p for p in (harness.root / "replay.jsonl", harness.root / "solutions" / "correct") if p.exists()), None)
    text = f". What works on this machine instead: `{_command('check', harness_ref)}` (build and oracle)"
    if replay:
        budget = EXAMPLE_BUDGET if harness.root == example else "1h"
        text += (f", or `{_command('run', harness_ref, '--agent', f'replay:{_shown(replay)}', '--budget', budget)}` "
                 "(its recorded patches, no key needed)")
    return text


# The run's options that are settings (Settings fields), by their Click parameter names.
SETTING_PARAMS = {"budget_s": "budget", "max_experiments": "max_experiments", "max_usd": "max_usd",
                  "delta": "delta", "env": "env_name", "gpu_index": "gpu_index", "agent": "agent_spec",
                  "model": "agent_model", "web_search": "web_search", "gpus": "gpus_text",
                  "executor": "executor", "address": "address", "agent_effort": "agent_effort",
                  "agent_max_tokens": "agent_max_tokens", "thinking": "no_thinking",
                  "max_episode_usd": "max_episode_usd", "max_api_wait_s": "max_api_wait"}


def _given_settings(ctx) -> dict:
    """The Settings fields as this command line gives them (or defaults them)."""
    from .slots import parse_gpus

    p = ctx.params
    values = {name: p[param] for name, param in SETTING_PARAMS.items()}
    values["budget_s"] = parse_duration(p["budget"])
    values["max_api_wait_s"] = parse_duration(p["max_api_wait"])
    values["thinking"] = not p["no_thinking"]
    values["gpus"] = parse_gpus(p["gpus_text"]) if p["gpus_text"] else []
    return values


def _typed_settings(ctx) -> set[str]:
    """The Settings fields this command line gives (Click's parameter source), not its defaults."""
    from click.core import ParameterSource

    return {name for name, param in SETTING_PARAMS.items()
            if ctx.get_parameter_source(param) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)}


@cli.command()
@click.argument("harness")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="default: HARNESS.sky.yaml")
@click.option("--accelerators", default="H200:1", show_default=True, help="per node, SkyPilot's syntax")
@click.option("--nodes", type=int, default=2, show_default=True)
@click.option("--image", help="default: the image of the harness's image.lock.json (lab publish)")
def skypilot(harness, out, accelerators, nodes, image):
    """Write a SkyPilot task file that starts Ray workers in HARNESS's image (not run)."""
    from .harness import load
    from .skypilot import skypilot_task

    h = load(harness)
    out = out or Path(f"{h.name}.sky.yaml")
    out.write_text(skypilot_task(h, accelerators=accelerators, nodes=nodes, image=image))
    click.echo(f"wrote {out}; start it with `sky launch -c lab-{h.name} {out}`")


def _print_agent_plan(agent, budget_s: float, max_usd: float) -> str:
    """The model settings and the estimated cost of the run, before it spends anything."""
    settings = getattr(agent, "settings", None)
    if not callable(settings):
        return ""
    from .agents.prices import EPISODES_PER_HOUR, TYPICAL_EPISODE, estimate_run_usd

    s = settings()
    usd, episodes = estimate_run_usd(agent.price, budget_s)
    tokens = sum(TYPICAL_EPISODE.values())
    thinking = ", ".join(f"{k} {v or 'off'}" for k, v in s["thinking"].items())
    effort = ", ".join(f"{k} {v or 'off'}" for k, v in s["effort"].items())
    text = (f"agent: {s['model']}, streamed, max_tokens {s['max_tokens']}, thinking ({thinking}), "
            f"effort ({effort}), at most ${s['max_episode_usd']:.2f} an episode, API outages waited "
            f"out up to {s['max_api_wait_s'] / 60:.0f} min\n"
            f"estimated agent cost: about ${usd:.0f} for {budget_s / 3600:.2f} h (~{episodes} episodes at "
            f"{EPISODES_PER_HOUR} an hour, ~{tokens / 1000:.0f}k tokens each, 88% cache reads); "
            + (f"spend limit ${max_usd:.2f} (--max-usd; 0: none)" if max_usd else "no spend limit (--max-usd 0)"))
    click.echo(text)
    return text


def _print_summary(s: dict) -> None:
    from . import fmt

    click.echo(f"best: {fmt.speedup(s['best_speedup'])} over the baseline ({s['metric']} baseline "
               f"{fmt.number(s['baseline_metric'])})" if s["baseline_metric"] is not None else "no baseline measured")
    click.echo(f"kept commits: {', '.join(f'{c} ({fmt.speedup(g)})' for c, g in s['kept']) or 'none'}")
    click.echo("experiments by verdict: " + (", ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items())) or "none")
               + f"; rejected {s['rejected']}")
    click.echo(f"spent: ${s['spent_usd']:.2f}; noise floor {fmt.percent(s['noise_floor'])}; "
               f"delta {fmt.percent(s['delta'])}")
    if s["pace"]["per_hour"] is not None:
        click.echo(f"pace: {s['pace']['experiments']} experiments in {s['pace']['seconds']:.0f} s, "
                   f"{s['pace']['per_hour']:.1f} per hour")
    click.echo(f"run folder: {s['run']}  branch: {s['branch']}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # Click's form of a Ctrl-C (lab run answers its own: loop.Interrupts)
        click.echo("aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LabError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)


if __name__ == "__main__":
    main()
