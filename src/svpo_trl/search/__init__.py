"""svpo_trl.search: generation backends, the step sampler, MCTS annotation (Eq. 3–6), Algorithm 1, SBS."""

from .backends import Completion, GenerationBackend, HFBackend
from .mcts import MCTSAnnotator, MCTSConfig
from .pairs import extract_preference_pairs
from .sampler import StepSampler
from .sbs import SBSConfig, SBSGenerator, SBSResult, greedy
from .solution_pairs import solution_level_pairs
from .state import State
from .testing import ScriptedBackend
from .vllm_backend import VLLMBackend, make_backend

__all__ = [
    "Completion",
    "GenerationBackend",
    "HFBackend",
    "MCTSAnnotator",
    "MCTSConfig",
    "SBSConfig",
    "SBSGenerator",
    "SBSResult",
    "ScriptedBackend",
    "State",
    "StepSampler",
    "VLLMBackend",
    "extract_preference_pairs",
    "greedy",
    "make_backend",
    "solution_level_pairs",
]
