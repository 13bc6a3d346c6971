"""A person's patch as a one-shot agent (`lab try HARNESS PATCH`, `--agent manual:PATCH`):
one proposal from a patch file, then `exhausted`."""

from __future__ import annotations

from pathlib import Path

from .replay import ReplayAgent, patch_item


class ManualAgent(ReplayAgent):
    name = "manual"
    skip_tried = False  # a person may well try the same idea again

    @classmethod
    def from_file(cls, patch: str | Path, hypothesis: str | None = None) -> "ManualAgent":
        """The patch's hypothesis: `hypothesis`, else its '#' first line or Subject:, else its name."""
        return cls([patch_item(Path(patch), hypothesis)])
