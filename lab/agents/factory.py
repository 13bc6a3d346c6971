"""`--agent SPEC` to an Agent: anthropic[:MODEL] | command:CMD | replay:FILE | manual:PATCH."""

from __future__ import annotations

from ..errors import LabError
from .base import Agent

SPECS = ("anthropic (the Messages API; needs ANTHROPIC_API_KEY; anthropic:MODEL picks the model), "
         "command:CMD (an agent CLI run in a copy of the editable files, e.g. 'command:claude -p'), "
         "replay:FILE (patches from a folder of *.patch or a JSON/JSONL list), "
         "manual:PATCH (one patch file)")


def make_agent(spec: str, *, model: str | None = None, web_search: bool = False, max_turns: int = 30,
               max_tokens: int | None = None, prices_file=None, timeout_s: float = 1800,
               base_url: str | None = None, effort: str | None = None, thinking: bool = True,
               max_episode_usd: float | None = None, max_api_wait_s: float | None = None) -> Agent:
    """The agent a spec names. Errors (no key, unknown spec, missing file) surface here, before
    a run folder exists. `effort` (low .. max, or off) sets the proposals' effort; research runs
    one level higher. None keeps the anthropic agent's defaults (anthropic_agent.py)."""
    kind, sep, arg = (spec or "").strip().partition(":")
    if kind == "anthropic":
        from .anthropic_agent import AnthropicAgent

        if sep and arg.strip() and model and model != arg.strip():
            raise LabError(f"two models given: '{arg.strip()}' in --agent and '{model}' in --agent-model")
        from .anthropic_agent import (DEFAULT_MAX_API_WAIT_S, DEFAULT_MAX_EPISODE_USD, DEFAULT_MAX_TOKENS,
                                      DEFAULT_THINKING, EFFORTS)

        efforts: dict | None = None
        if effort == "off":
            efforts = {"research": None, "propose": None}
        elif effort:
            if effort not in EFFORTS:
                raise LabError(f"--agent-effort '{effort}' is none of {', '.join(EFFORTS)}, off")
            efforts = {"propose": effort, "research": EFFORTS[min(EFFORTS.index(effort) + 1, len(EFFORTS) - 1)]}
        return AnthropicAgent(model or arg.strip() or None, web_search=web_search, max_turns=max_turns,
                              max_tokens=max_tokens or DEFAULT_MAX_TOKENS, prices_file=prices_file,
                              base_url=base_url, effort=efforts,
                              thinking=DEFAULT_THINKING if thinking else {"research": None, "propose": None},
                              max_episode_usd=DEFAULT_MAX_EPISODE_USD if max_episode_usd is None else max_episode_usd,
                              max_api_wait_s=DEFAULT_MAX_API_WAIT_S if max_api_wait_s is None else max_api_wait_s)
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
