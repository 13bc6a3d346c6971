"""The scheduler of one `Lab.loop`: a dispatcher per evaluation slot.

Each slot (lab/slots.py) has a dispatcher that takes the next job (a proposal a stopped process
left unfinished, a due canary, or a new proposal, asked under the agent lock: agents are not
assumed thread-safe) and runs it on its slot through the run's executor (lab/executors.py). The
first slot's dispatcher runs on the calling thread, so a sequential run (one slot) is this loop
with no thread at all, and a second Ctrl-C reaches its runner as before; each further slot gets a
thread of its own. The rules (when to stop, when a canary is due, what a verdict means, what a
failure streak or a plateau triggers) and every event are the Lab's (lab/loop.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .agents import Agent, AgentFatal, Proposal
from .slots import Slot


@dataclass
class Job:
    number: int  # the proposal's number; for a canary, the proposal count it comes after
    proposal: Proposal | None = None  # None: an A/A canary
    replay: dict | None = None  # the events of a proposal that a stopped process left unfinished


class Dispatch:
    """The dispatchers of one loop over `lab.slots`; `run` returns why the loop stopped."""

    def __init__(self, lab, agent: Agent, interrupts):
        self.lab, self.agent, self.interrupts = lab, agent, interrupts
        self.queue: list[Job] = []
        self.canaries_claimed: set[int] = set()  # canaries a slot has taken on (one per due point)
        self.stop = ""
        self.errors: list[BaseException] = []

    def run(self) -> str:
        """Queue the unfinished proposals, research once, then dispatch every slot until a stop rule."""
        lab = self.lab
        for number, pending in sorted(lab.state().open_proposals.items()):
            patch = (lab.folder.ledger / f"{pending['ledger']}.patch").read_text()
            lab.folder.append("note", text=f"re-evaluating #{number}, interrupted mid-evaluation")
            self.queue.append(Job(number, Proposal(patch=patch, hypothesis=pending["hypothesis"]), pending))
        if not any(e["type"] == "research" for e in lab.folder.events()):
            try:
                lab._research(self.agent)
            except AgentFatal as exc:  # no key, no credit: the dispatchers see the stop at once
                self._fatal(exc)
        threads = [threading.Thread(target=self._work, args=(slot,), name=f"lab-slot-{slot.index}", daemon=True)
                   for slot in lab.slots[1:]]
        for t in threads:
            t.start()
        self._work(lab.slots[0])
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        if self.errors:  # the run folder stays consistent and resumable
            raise self.errors[0]
        return self.stop or "stopped"

    def _work(self, slot: Slot) -> None:
        """One slot's dispatcher: jobs until there are none; a failure stops the other slots too."""
        lab = self.lab
        lab._local.slot = slot
        try:
            while (job := self._next_job()) is not None:
                if job.proposal is None:
                    lab.canary(at=job.number)
                    continue
                event = lab.experiment_on(slot, job.proposal, job.number, job.replay)
                with lab.agent_lock:  # a streak or a plateau researches again: the agent's turn
                    lab._after_experiment(self.agent, event)
        except AgentFatal as exc:  # from a change of approach's research
            self._fatal(exc)
        except KeyboardInterrupt:  # Ctrl-C twice, on this thread: stop now, the others after their job
            self.stop = self.stop or "stopped now"
            raise
        except BaseException as exc:
            self.errors.append(exc)

    def _next_job(self) -> Job | None:
        """Under the agent lock: an unfinished proposal, a due canary, or a new proposal; None: stop."""
        lab = self.lab
        with lab.agent_lock:
            while not (self.stop or self.errors):
                if self.queue:
                    return self.queue.pop(0)
                state = lab.state()
                self.stop = lab._stop_reason(state, self.interrupts)
                if self.stop:
                    break
                if lab._canary_due(state) and state.proposed not in self.canaries_claimed:
                    self.canaries_claimed.add(state.proposed)  # run on this slot, outside the agent lock
                    return Job(state.proposed)
                lab.say(f"asking the agent for proposal #{state.proposed + 1}")
                proposal = lab._ask(self.agent, state)
                if not proposal.failure:
                    return Job(lab._record_proposal(proposal, state.proposed + 1), proposal)
                self.stop = lab._agent_failed(self.agent, proposal)
        return None

    def _fatal(self, exc: AgentFatal) -> None:
        self.lab.folder.append("agent_failed", reason=str(exc), fatal=True)
        self.stop = f"the agent cannot go on: {exc}"
