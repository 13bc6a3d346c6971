"""Proposal sources. `make_agent("anthropic" | "command:CMD" | "replay:FILE" | "manual")`."""

from .base import Agent, AgentContext, AgentFatal, Proposal

__all__ = ["Agent", "AgentContext", "AgentFatal", "Proposal", "make_agent"]


def make_agent(spec: str, **options) -> Agent:
    from .factory import make_agent as _make

    return _make(spec, **options)
