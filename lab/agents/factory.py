"""`--agent SPEC` to an Agent: anthropic[:MODEL] | command:CMD | replay:FILE | manual:PATCH."""

from __future__ import annotations

from ..errors import LabError
from .base import Agent

SPECS = ("anthropic (the Messages API; needs ANTHROPIC_API_KEY; anthropic:MODEL picks the model), "
         "command:CMD (an agent CLI run in a copy of the editable files, e.g. 'command:claude -p'), "
         "replay:FILE (patches from a folder of *.patch or a JSON/JSONL list), "
         "manual:PATCH (one patch file)")


def make_agent(spec: str, *, model: str | None = None, web_search: bool = False, max_turns: int = 30,
               max_tokens: int = 8000, prices_file=None, timeout_s: float = 1800,
               base_url: str | None = None) -> Agent:
    """The agent a spec names. Errors (no key, unknown spec, missing file) surface here, before
    a run folder exists."""
    kind, sep, arg = (spec or "").strip().partition(":")
    if kind == "anthropic":
        from .anthropic_agent import AnthropicAgent

        if sep and arg.strip() and model and model != arg.strip():
            raise LabError(f"two models given: '{arg.strip()}' in --agent and '{model}' in --agent-model")
        return AnthropicAgent(model or arg.strip() or None, web_search=web_search, max_turns=max_turns,
                              max_tokens=max_tokens, prices_file=prices_file, base_url=base_url)
    if kind == "command":
        from .command import CommandAgent

        if not arg.strip():
            raise LabError("command:CMD needs a command, e.g. --agent 'command:claude -p'")
        return CommandAgent(arg, timeout_s=timeout_s)
    if kind in ("replay", "manual"):
        if not arg.strip():
            example = "solutions/correct" if kind == "replay" else "idea.patch"
            raise LabError(f"{kind}:{'FILE' if kind == 'replay' else 'PATCH'} needs a path, "
                           f"e.g. --agent {kind}:{example}")
        if kind == "replay":
            from .replay import ReplayAgent

            return ReplayAgent.from_path(arg.strip())
        from .manual import ManualAgent

        return ManualAgent.from_file(arg.strip())
    raise LabError(f"unknown agent '{spec}': use {SPECS}")
