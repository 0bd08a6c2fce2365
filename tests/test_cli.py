"""Recipe argument parsing: one setting YAML with a section per stage, CLI overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from svpo_trl.cli import parse_stage_args


@dataclass
class Script:
    model_name_or_path: str = "base"
    limit: int | None = None


@dataclass
class Training:
    learning_rate: float = 1e-5
    seed: int = 42
    strategies: list[str] = field(default_factory=lambda: ["greedy"])


SETTING = """
seed: 7
env:
  SVPO_TEST_ENV: from-yaml
sft:
  learning_rate: 0.002
  model_name_or_path: toy
svpo:
  learning_rate: 1.0e-4
  strategies: [greedy, "sbs(1,5)"]
"""


def test_stage_section_with_shared_keys_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("SVPO_TEST_ENV", raising=False)
    path = tmp_path / "setting.yaml"
    path.write_text(SETTING)
    script, training = parse_stage_args("sft", [Script, Training], ["--config", str(path)])
    assert (script.model_name_or_path, training.learning_rate, training.seed) == ("toy", 0.002, 7)
    script, training = parse_stage_args("svpo", [Script, Training], ["--config", str(path), "--limit", "3"])
    assert (script.model_name_or_path, training.learning_rate, script.limit) == ("base", 1e-4, 3)
    assert training.strategies == ["greedy", "sbs(1,5)"]
    _, training = parse_stage_args(
        "svpo", [Script, Training], ["--config", str(path), "--learning_rate", "0.5"]
    )
    assert training.learning_rate == 0.5
    import os

    assert os.environ["SVPO_TEST_ENV"] == "from-yaml"


def test_shared_keys_only_reach_stages_that_know_them(tmp_path):
    path = tmp_path / "setting.yaml"
    path.write_text("seed: 3\nsft:\n  limit: 2\n")
    (script,) = parse_stage_args("sft", [Script], ["--config", str(path)])
    assert script.limit == 2


def test_unknown_key_in_a_stage_section_is_named(tmp_path):
    path = tmp_path / "setting.yaml"
    path.write_text("svpo:\n  learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys for stage 'svpo': \['--learning_rat'\]"):
        parse_stage_args("svpo", [Script, Training], ["--config", str(path)])


def test_flat_trl_style_file(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("learning_rate: 0.25\nmodel_name_or_path: m\n")
    script, training = parse_stage_args("svpo", [Script, Training], ["--config", str(path)])
    assert (script.model_name_or_path, training.learning_rate) == ("m", 0.25)


def test_setting_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        parse_stage_args("sft", [Script], ["--config", str(path)])


@pytest.mark.parametrize("setting", ["toy.yaml", "deepseekmath_7b.yaml"])
def test_shipped_settings_parse_for_every_stage(setting):
    """Every key of every shipped setting is a real field of its stage (bf16 off: no GPU here)."""
    from pathlib import Path

    from trl import SFTConfig

    from svpo_trl.pipeline import (
        AnnotateScriptArguments,
        EvaluateArguments,
        SFTScriptArguments,
        TrainScriptArguments,
    )
    from svpo_trl.search.mcts import MCTSConfig
    from svpo_trl.trainer.svpo_config import SVPOConfig
    from svpo_trl.trainer.value_sft_config import ValueSFTConfig

    config = ["--config", str(Path(__file__).parents[1] / "recipes" / "configs" / setting)]
    cpu = ["--bf16", "false"]
    assert parse_stage_args("sft", [SFTScriptArguments, SFTConfig], [*config, *cpu])[1].output_dir
    assert parse_stage_args("annotate", [AnnotateScriptArguments, MCTSConfig], config)[1].max_depth == 8
    _, value_sft = parse_stage_args("value_sft", [TrainScriptArguments, ValueSFTConfig], [*config, *cpu])
    _, svpo = parse_stage_args("svpo", [TrainScriptArguments, SVPOConfig], [*config, *cpu])
    script, _ = parse_stage_args("dpo", [TrainScriptArguments, SVPOConfig], [*config, *cpu])
    assert (script.recipe, script.dataset_config) == ("dpo", "solution_pairs")
    assert svpo.beta == 0.1 and svpo.margin == 0.5
    extra = ["--model_name_or_path", "m", "--output_dir", "o"]
    (evaluate,) = parse_stage_args("evaluate", [EvaluateArguments], [*config, *extra])
    assert evaluate.dataset_split == "test"
    if setting == "deepseekmath_7b.yaml":  # the paper's Appendix A.1 values survive parsing
        assert (value_sft.mse_weight, value_sft.learning_rate, value_sft.num_train_epochs) == (0.01, 2e-5, 10)
        assert (svpo.sft_weight, svpo.regularization_weight, svpo.learning_rate) == (5.0, 0.001, 5e-6)
