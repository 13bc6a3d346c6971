"""Where the runner runs: natively, in a pinned Docker image, or in a Nix dev shell.

Every environment runs one argv (the runner) with the given mounts, CPU set and GPUs, kills the
whole process group when the timeout passes, and names itself by digest or lock hash so that a
record says exactly where it was produced.
"""

from __future__ import annotations

from ..errors import LabError
from .base import Env, Mount, RunResult

NAMES = ("native", "docker", "nix")


def get(name: str, harness=None) -> Env:
    """The environment called `name` for `harness` (docker and nix read the harness's pins)."""
    if name == "native":
        from .native import NativeEnv

        return NativeEnv()
    if name == "docker":
        from .docker import DockerEnv

        return DockerEnv(harness)
    if name == "nix":
        from .nix import NixEnv

        return NixEnv(harness)
    raise LabError(f"unknown environment '{name}': choose one of {', '.join(NAMES)}")


__all__ = ["Env", "Mount", "RunResult", "get", "NAMES"]
