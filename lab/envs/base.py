from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Mount:
    host: Path
    target: str  # path inside the environment (natively: ignored, the host path is used)
    read_only: bool = True


@dataclass
class RunResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0


@dataclass
class Env:
    """Base of every environment. `run` must kill the whole process tree on timeout."""

    name: str = "native"
    extra_env: dict = field(default_factory=dict)

    def reference(self) -> str:
        """What names this environment exactly: an image digest, a flake lock hash, 'native'."""
        raise NotImplementedError

    def preflight(self) -> None:
        """Raise EnvironmentUnavailable with what to do when this environment cannot run."""

    def path_of(self, mount: Mount) -> str:
        """The path under which the runner sees a mounted folder."""
        return mount.target

    def run(
        self,
        argv: list[str],
        *,
        mounts: list[Mount],
        timeout_s: float,
        cpus: list[int] | None = None,
        gpus: list[int] | None = None,
        env: dict | None = None,
        network: bool = False,
        on_line=None,
    ) -> RunResult:
        """Run argv; `on_line`, where given, gets each line of its stderr as it comes (the
        runner's progress; an environment that cannot stream hands none, the result has all)."""
        raise NotImplementedError
