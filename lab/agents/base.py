"""The interface every proposal source implements: an LLM, an external agent CLI, a replayed
patch list, or a person. An agent proposes; the lab applies, guards, evaluates and records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LabError
from ..records import Build, Record


class AgentFatal(LabError):
    """The agent cannot go on (no key, 401, spend limit, invalid model): the run stops cleanly."""


@dataclass
class Proposal(Record):
    patch: str = ""  # a unified diff against the incumbent tree (paths relative to the tree)
    hypothesis: str = ""  # one line: what should get faster and why
    cost_usd: float = 0.0  # spent on this proposal (API usage at the price table)
    usage: dict = field(default_factory=dict)  # token counts by kind
    failure: str = ""  # why no patch came (malformed edit, no submit, API error); "" when ok
    transcript: str = ""  # path of the episode's transcript, if kept
    learned: str = ""  # what the agent says it learned in this episode (the run memory keeps it)
    next_idea: str = ""  # what it would try next
    api_unavailable: bool = False  # failed because the API stayed unavailable: not the agent's failure


@dataclass
class AgentContext:
    """What the lab hands an agent for one proposal. The agent may read, never write, the
    incumbent tree; it edits a scratch copy and returns a patch."""

    harness_name: str
    harness_root: Path  # locked harness files (read-only view)
    incumbent_tree: Path  # the current best source tree (the run's worktree, read-only)
    editable: tuple[str, ...]  # globs relative to the tree
    program_md: str
    results_tsv: str
    log_md: str
    recent_failures: list[str]
    run_dir: Path
    scratch: Path  # a folder the agent may use freely
    compile: Callable[[Path], Build] | None = None  # build only, errors returned, no timing
    profile: Callable[[], str] | None = None  # a profile digest of the incumbent
    tried_hypotheses: list[str] = field(default_factory=list)
    # The run memory (kept / dead ends / ideas with outcomes), rebuilt from the events each time.
    memory: str = ""
    # Time and money left to the run, for the brief (None: no limit).
    seconds_left: float | None = None
    usd_left: float | None = None
    spent_usd: float = 0.0
    # An instruction to change approach (after a failure streak or a plateau); "" if none.
    direction: str = ""
    # Globs of the harness folder the agent's tools never open (besides tools.DEFAULT_PRIVATE).
    private: tuple[str, ...] = ()
    # A draft check: the oracle on public seeds (+ a quick informative timing) of a tree, through
    # the lab's own evaluation path; returns a short text report. Counted in the budget and log.
    check: Callable[[Path, bool], str] | None = None
    # Report something the run should record and show (an API wait, a fault): (type, payload).
    report: Callable[..., None] | None = None


class Agent:
    name = "agent"

    def research(self, ctx: AgentContext) -> str:
        """Before the first experiment: a ranked list of hypotheses (markdown) for log.md."""
        return ""

    def propose(self, ctx: AgentContext) -> Proposal:
        raise NotImplementedError

    @property
    def spent_usd(self) -> float:
        return 0.0
