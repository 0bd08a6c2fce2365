"""A partial solution: the state s_t = y_<t of §3.1, shared by MCTS, SBS and greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..steps import Step


@dataclass
class State:
    """``prompt`` (the formatted question) followed by the steps taken so far."""

    prompt: str
    steps: list[Step] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The text a model continues from: prompt plus every step's text."""
        return self.prompt + "".join(step.text for step in self.steps)

    @property
    def code_history(self) -> list[str]:
        """Code of the earlier C-steps on this path, run before a new snippet (Jupyter-like state)."""
        return [step.code for step in self.steps if step.kind == "code" and step.code]

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def is_terminal(self) -> bool:
        return bool(self.steps) and self.steps[-1].is_terminal

    def child(self, step: Step) -> State:
        return State(self.prompt, [*self.steps, step])
