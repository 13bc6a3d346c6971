"""The runner in a Nix dev shell of the lab's flake (`nix develop <flake>#<shell> --command ...`).

The shell pins the toolchain (compilers, CUDA, Python and its packages) through flake.lock; the
lab's own package comes from the checkout on PYTHONPATH. Everything else is as native: the same
process group, timeout, CPU pinning and scrubbed environment (NativeEnv.run), with paths on the
host. The GPU driver is the host's (see docs/environments.md for non-NixOS hosts).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ..errors import EnvironmentUnavailable
from ..harness import repo_root
from .native import NativeEnv

NIX_FLAGS = ["--extra-experimental-features", "nix-command flakes"]


class NixEnv(NativeEnv):
    def __init__(self, harness=None, flake: str | Path | None = None, shell: str | None = None):
        super().__init__()
        self.name = "nix"
        self.harness = harness
        declared = harness.environment.nix_shell if harness is not None else ""
        ref_flake, _, ref_shell = declared.partition("#")
        needs_gpu = bool(harness is not None and harness.environment.needs_gpu)
        # '.#cuda' in a harness means the lab's own flake (the checkout), not the caller's cwd.
        self.flake = Path(flake) if flake else (
            repo_root() if ref_flake in ("", ".") else Path(ref_flake))
        self.shell = shell or ref_shell or ("cuda" if needs_gpu else "cpu")
        self.extra_env = {"PYTHONPATH": str(repo_root())}

    def preflight(self) -> None:
        if shutil.which("nix") is None:
            raise EnvironmentUnavailable(
                "Nix is not installed here: install it (https://nixos.org/download, then enable "
                "flakes), or use --env docker or --env native"
            )
        if not (self.flake / "flake.nix").is_file():
            raise EnvironmentUnavailable(f"no flake.nix in {self.flake}; give the lab's checkout")

    def reference(self) -> str:
        """The shell and the hash of flake.lock, which pins nixpkgs and everything in the shell."""
        lock = self.flake / "flake.lock"
        if lock.is_file():
            digest = hashlib.sha256(lock.read_bytes()).hexdigest()
            return f"nix:{self.flake}#{self.shell}@flake.lock:{digest[:16]}"
        digest = hashlib.sha256((self.flake / "flake.nix").read_bytes()).hexdigest()
        return f"nix:{self.flake}#{self.shell}@unlocked-flake.nix:{digest[:16]}"

    def command(self, argv: list[str]) -> list[str]:
        return ["nix", *NIX_FLAGS, "develop", f"{self.flake}#{self.shell}", "--command", *argv]

    def run(self, argv, *, mounts, timeout_s, cpus=None, gpus=None, env=None, network=False, on_line=None):
        self.preflight()
        return super().run(self.command(list(argv)), mounts=mounts, timeout_s=timeout_s, cpus=cpus,
                           gpus=gpus, env=env, network=network, on_line=on_line)
