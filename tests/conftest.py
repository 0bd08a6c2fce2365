"""Shared fixtures: a tokenizer trained locally and tiny models (nothing is downloaded)."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

FIGURE5_STEPS = [
    "<step>\n<p>\nTo calculate Haley's height after 10 years, I need to add 10 times the growth rate of 3 "
    "inches to her current height.\n</p>\n<code>\n```python\ncurrent_height = 20\ngrowth_rate = 3\nyears = 10\n"
    "future_height = current_height + (growth_rate * years)\nprint(future_height)\n```\n</code>\n"
    "<output>\n50\n</output>\n</step>\n",
    "<step>\n<p>\nI have calculated Haley's height after 10 years. Haley will be 50 inches tall\nafter 10 "
    "years.\n</p>\n<p>\nFinal Answer: $50$\n</p>\n</step>\n",
]
FIGURE5_QUESTION = (
    "Haley grows at the rate of 3 inches every year. If she is currently 20 inches tall,\n"
    "what will be her height after 10 years?"
)


def _corpus() -> list[str]:
    from svpo_trl.steps import DEFAULT_FORMAT

    text = DEFAULT_FORMAT.render_solution(FIGURE5_QUESTION, FIGURE5_STEPS)
    digits = " ".join(str(i) for i in range(200))
    return [text, digits, "a = 3\nb = 4\nprint(a + b * 2 - 7 // 2)\n", "Final Answer: $12$"] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from svpo_trl.toy import train_tokenizer

    return train_tokenizer(_corpus(), vocab_size=400)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from svpo_trl.toy import tiny_llama

    return tiny_llama(tiny_tokenizer, seed=0)


@dataclass
class _Result:
    stdout: str
    error: str | None = None
    timed_out: bool = False


class ConstantSandbox:
    """Every snippet prints 1: scripted code steps need an output, not a real interpreter."""

    def __init__(self):
        self.jobs = 0

    def run_many(self, snippet_lists):
        self.jobs += len(snippet_lists)
        return [_Result("1") for _ in snippet_lists]


def count_forwards(module) -> list[int]:
    """Count ``module``'s forward calls (one entry per call), recomputations by checkpointing included.

    Wraps ``forward`` rather than hooking it: torch's checkpoint recomputation does not run forward hooks.
    """
    calls: list[int] = []
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def accelerate_launch(config_file, processes: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line up to the script, on a free port.

    accelerate's fixed default port (29500) can still be held by the previous launch's socket, which
    fails the next launch at random.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if processes is not None:
        cmd += ["--num_processes", str(processes)]
    return [*cmd, "--main_process_port", str(port)]


def randomize_value_head(model, seed: int = 0, std: float = 0.5):
    """Give ``model.v_head`` seeded random weights: a new head is all zeros (V = 0 everywhere), which
    cannot tell states apart in tests that compare values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.v_head.weight.copy_(torch.randn(model.v_head.weight.shape, generator=generator) * std)
    return model
