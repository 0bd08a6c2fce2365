"""Recipe argument parsing: one setting YAML with a section per stage, CLI overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from svpo_trl.cli import parse_stage_args
from svpo_trl.errors import PathNotFoundError, UsageError


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
    with pytest.raises(UsageError, match=r"unknown keys for stage 'svpo': \['--learning_rat'\]"):
        parse_stage_args("svpo", [Script, Training], ["--config", str(path)])


def test_config_equals_form_and_any_section(tmp_path):
    path = tmp_path / "setting.yaml"
    path.write_text(SETTING)
    _, training = parse_stage_args("svpo", [Script, Training], [f"--config={path}"])
    assert training.learning_rate == 1e-4
    # --section works for every stage's parser, in both forms
    script, training = parse_stage_args(
        "svpo", [Script, Training], ["--config", str(path), "--section", "sft"]
    )
    assert (script.model_name_or_path, training.learning_rate) == ("toy", 0.002)
    _, training = parse_stage_args("evaluate", [Script, Training], [f"--config={path}", "--section=svpo"])
    assert training.strategies == ["greedy", "sbs(1,5)"]


def test_unknown_section_lists_the_sections(tmp_path):
    path = tmp_path / "setting.yaml"
    path.write_text(SETTING)
    with pytest.raises(
        UsageError, match=r"--section dop: .*setting.yaml has no such section; its sections: sft, svpo"
    ):
        parse_stage_args("svpo", [Script, Training], ["--config", str(path), "--section", "dop"])
    with pytest.raises(UsageError, match="no --config file"):
        parse_stage_args("svpo", [Script, Training], ["--section", "dpo"])


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("svpo:\n  learning_rate: fast\n", "learning_rate", "a number"),
        ("svpo:\n  limit: 2.5\n", "limit", "an integer"),
        ("svpo:\n  limit: true\n", "limit", "an integer"),
        ("seed: [1, 2]\nsvpo: {}\n", "seed", "an integer"),
        ("svpo:\n  resume: maybe\n", "resume", "a boolean"),
    ],
)
def test_a_value_of_the_wrong_type_names_file_section_and_key(tmp_path, text, key, expected):
    @dataclass
    class WithBool:
        resume: bool = True

    path = tmp_path / "typed.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=rf"typed.yaml: section 'svpo', key '{key}': expected {expected}"):
        parse_stage_args("svpo", [Script, Training, WithBool], ["--config", str(path)])


def test_yaml_values_are_converted_as_the_command_line_would(tmp_path):
    path = tmp_path / "setting.yaml"
    # PyYAML reads 1e-4 as a string, and a single strategy as a scalar
    path.write_text("svpo:\n  learning_rate: 1e-4\n  limit: '3'\n  strategies: greedy\n")
    script, training = parse_stage_args("svpo", [Script, Training], ["--config", str(path)])
    assert (training.learning_rate, script.limit, training.strategies) == (1e-4, 3, ["greedy"])


def test_setting_file_errors_name_the_file(tmp_path):
    with pytest.raises(PathNotFoundError, match=r"--config: path does not exist: .*missing.yaml"):
        parse_stage_args("sft", [Script], ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  limit: [1\n")
    with pytest.raises(UsageError, match=r"bad.yaml: not valid YAML"):
        parse_stage_args("sft", [Script], ["--config", str(bad)])


def test_flat_trl_style_file(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("learning_rate: 0.25\nmodel_name_or_path: m\n")
    script, training = parse_stage_args("svpo", [Script, Training], ["--config", str(path)])
    assert (script.model_name_or_path, training.learning_rate) == ("m", 0.25)


def test_setting_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UsageError, match="expected a YAML mapping"):
        parse_stage_args("sft", [Script], ["--config", str(path)])


@pytest.mark.parametrize("setting", ["toy.yaml", "toy_reproduce.yaml", "deepseekmath_7b.yaml"])
def test_shipped_settings_parse_for_every_stage(setting):
    """Every key of every shipped setting is a real field of its stage (bf16 off: no GPU here)."""
    from pathlib import Path

    from trl import SFTConfig

    from svpo_trl.pipeline import (
        AnnotateScriptArguments,
        EvaluateArguments,
        SFTScriptArguments,
        SVPOScriptArguments,
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
    _, svpo = parse_stage_args("svpo", [SVPOScriptArguments, SVPOConfig], [*config, *cpu])
    script, _ = parse_stage_args("dpo", [SVPOScriptArguments, SVPOConfig], [*config, *cpu])
    assert (script.recipe, script.dataset_config) == ("dpo", "solution_pairs")
    assert svpo.beta == 0.1 and svpo.margin == 0.5
    extra = ["--model_name_or_path", "m", "--output_dir", "o"]
    (evaluate,) = parse_stage_args("evaluate", [EvaluateArguments], [*config, *extra])
    assert evaluate.dataset_split == "test"
    if setting == "deepseekmath_7b.yaml":  # the paper's Appendix A.1 values survive parsing
        assert (value_sft.mse_weight, value_sft.learning_rate, value_sft.num_train_epochs) == (0.01, 2e-5, 10)
        assert (svpo.sft_weight, svpo.regularization_weight, svpo.learning_rate) == (5.0, 0.001, 5e-6)


# ------------------------------------------------------------------------------------ the recipes' --help
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_help(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        recipe(name).main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["sft", "annotate", "value_sft", "svpo", "evaluate"])
def test_every_recipe_help_shows_config_and_section(name, capsys):
    text = recipe_help(name, capsys)
    assert "--config FILE" in text and "--section NAME" in text
    assert text.index("--config FILE") < text.index("--model_name_or_path")


@pytest.mark.parametrize(
    ("name", "own"),
    [
        ("sft", ["--model_name_or_path", "--dataset_name", "--convert_gsm8k"]),
        ("value_sft", ["--model_name_or_path", "--annotation_dir", "--mse_weight"]),
        ("svpo", ["--model_name_or_path", "--recipe", "--beta", "--margin_weight", "--sft_weight"]),
    ],
)
def test_training_recipes_list_their_own_flags_before_training_arguments(name, own, capsys):
    text = recipe_help(name, capsys)
    upstream = text.index("training arguments (transformers TrainingArguments / TRL)")
    # before: hundreds of TrainingArguments flags came first and the recipe's own were at the end
    assert all(0 < text.index(f"  {flag}") < upstream for flag in own), [text.index(f"  {f}") for f in own]
    assert text.index("  --adam_beta1") > upstream


def test_value_sft_has_no_flags_that_do_nothing_there(capsys):
    text = recipe_help("value_sft", capsys)
    assert "--recipe" not in text and "--dataset_config" not in text
    assert "--recipe" in recipe_help("svpo", capsys)
    with pytest.raises(UsageError, match=r"unrecognized arguments: --recipe dpo \(see --help"):
        recipe("value_sft").main(["--model_name_or_path", "m", "--annotation_dir", "a", "--recipe", "dpo"])


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("outputs/toy/sft", True),
        ("./sft", True),
        ("/abs/model", True),
        ("~/models/x", True),
        ("../shared/data/gsm8k", True),
        ("model dir", True),  # a space: no Hub id has one
        ("Qwen/Qwen2.5-0.5B", False),
        ("gpt2", False),
        ("openai/gsm8k", False),
    ],
)
def test_local_paths_are_told_from_hub_ids(name, local):
    from svpo_trl.errors import looks_like_local_path

    assert looks_like_local_path(name) is local


def test_dir_slash_name_is_local_when_dir_is_here(tmp_path, monkeypatch):
    from svpo_trl.errors import looks_like_local_path, require_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("outputs/sft")
    (tmp_path / "outputs").mkdir()
    assert looks_like_local_path("outputs/sft")
    with pytest.raises(PathNotFoundError, match=r"--model_name_or_path: path does not exist: outputs/sft \("):
        require_path("outputs/sft", "model_name_or_path")
    require_path("Qwen/Qwen2.5-0.5B", "model_name_or_path")  # a Hub id: left to the Hub
