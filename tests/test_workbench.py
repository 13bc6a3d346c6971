"""The agent's compile and profile tools (lab/workbench.py) go through the runner in the run's
environment, the same Env object that runs every evaluation, and its sandbox; never a build on
the host. So does `lab profile`, the profile tool run by hand. A recording environment shows
what ran where."""

import json

from click.testing import CliRunner

import lab.envs
from lab import sandbox
from lab.cli import cli
from lab.envs.native import NativeEnv
from lab.harness import stage_editable
from lab.loop import Lab, Settings
from lab.records import Evaluation
from lab.slots import Slot
from lab.system.cpus import allowed_cpus

from conftest import CDOT, git_apply_in_copy, lab_cli


class Recording(NativeEnv):
    """The native environment, noting the mode and CPU set of every runner it starts."""

    def __init__(self):
        super().__init__()
        self.runs = []

    def run(self, argv, **options):
        self.runs.append((argv[argv.index("--mode") + 1], options.get("cpus")))
        return super().run(argv, **options)


def test_compile_and_profile_run_the_runner_in_the_runs_environment(cdot, cdot_repo, tmp_path):
    env = Recording()
    lab = Lab.start(cdot, cdot_repo / "runs", env, Settings(canary_every=0))
    ctx = lab._context(lab.state())  # what the agent gets
    draft = ctx.scratch / "draft"
    stage_editable(cdot, ctx.incumbent_tree, draft)

    build = ctx.compile(draft)
    assert build.ok and build.artifact and env.runs == [("build", None)]
    record = Evaluation.from_dict(json.loads((lab.folder.path / "agent" / "compile" / "record.json").read_text()))
    assert record.mode == "build" and record.check is None and not record.pairs, "build only"
    assert record.fingerprint["sandbox"] == sandbox.describe(), "the build ran in the run's sandbox"

    broken = git_apply_in_copy(draft, (CDOT / "solutions" / "wrong" / "no-compile.patch").read_text(), tmp_path)
    failed = ctx.compile(broken)
    assert not failed.ok and failed.error, "a failed build comes back with the compiler's errors"

    assert ctx.profile() == "harness cdot has no profiler"  # the harness's digest, from the runner
    assert [mode for mode, _ in env.runs] == ["build", "build", "profile"]


def test_the_agents_tools_leave_the_slots_cores_alone(cdot, cdot_repo):
    env = Recording()
    lab = Lab.start(cdot, cdot_repo / "runs", env, Settings(canary_every=0))
    allowed = allowed_cpus()
    lab.attach(lab.executor, [Slot(0, 0, allowed[-1:])])
    ctx = lab._context(lab.state())
    ctx.compile(ctx.incumbent_tree)
    assert env.runs == [("build", allowed[:-1] or None)]


def test_lab_profile_runs_the_runner_in_the_environment_it_names(cdot, cdot_repo, monkeypatch, tmp_path):
    """`lab profile --env` builds and profiles as the agent's tool does: the runner in that
    environment (mode profile), candidate code in its sandbox, its record under --runs."""
    env = Recording()
    monkeypatch.setattr(lab.envs, "get", lambda name, harness=None: env)
    runs = tmp_path / "runs"
    out = CliRunner().invoke(cli, ["profile", str(cdot.root), "--env", "native", "--runs", str(runs)])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == "harness cdot has no profiler"  # the harness's digest, from the runner
    assert env.runs == [("profile", None)]
    (path,) = runs.glob("records/*-profile/record.json")
    record = Evaluation.from_dict(json.loads(path.read_text()))
    assert record.mode == "profile" and record.candidate_build.ok
    assert record.fingerprint["sandbox"] == sandbox.describe(), "the build ran in the sandbox"

    broken = git_apply_in_copy(cdot.root, (CDOT / "solutions" / "wrong" / "no-compile.patch").read_text(), tmp_path)
    failed = lab_cli("profile", str(cdot.root), "--src", str(broken), "--runs", str(runs))
    assert failed.returncode == 2 and "error: the tree does not build: " in failed.stderr, failed.stderr
