"""Pushing an annotation to the Hub: one config per dataset plus a card, after everything is saved locally; a
failed push (no network, no token) says so in one line, and a rerun pushes only what is missing, without
searching again. The Hub is never reached: ``Dataset.push_to_hub`` and the card upload are replaced."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset

import svpo_trl.hub as hub
from svpo_trl.pipeline import STAGE_MARKER, AnnotateScriptArguments, run_annotate
from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
from svpo_trl.search.testing import ScriptedBackend
from svpo_trl.toy.task import load_toy_problems

ANSWERS = {row["question"]: row["answer"] for row in load_toy_problems("annotate", 3)}


def answer_step(label: str, value: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


def scripted_policy() -> ScriptedBackend:
    """Every question: one right and one wrong answer step (a sibling pair at the root), no code to run."""

    def script(prompt: str):
        question = re.match(r"<question>(.*?)</question>", prompt, re.DOTALL).group(1)
        gold = ANSWERS[question]
        return [(answer_step("Right.", gold), 0.6), (answer_step("Wrong.", str(int(gold) + 1)), 0.4)]

    return ScriptedBackend(script)


class FakeHub:
    """Records every push; ``fail_at`` makes the n-th dataset push (0-based) raise like a network failure."""

    def __init__(self, fail_at: int | None = None, card_fails: bool = False):
        self.pushes: list[tuple[str, str, str]] = []
        self.cards: list[tuple[str, str]] = []
        self.fail_at = fail_at
        self.card_fails = card_fails

    def install(self, monkeypatch) -> FakeHub:
        fake = self

        def push_to_hub(self, repo_id, config_name="default", split=None, **kwargs):
            if fake.fail_at is not None and len(fake.pushes) == fake.fail_at:
                fake.fail_at = None
                raise ConnectionError(
                    f"Failed to resolve 'huggingface.co' pushing {config_name}\nmore detail"
                )
            fake.pushes.append((repo_id, config_name, split))

        def upload_card(repo_id, text, token):
            if fake.card_fails:
                fake.card_fails = False
                raise OSError("You must be logged in: no token found")
            fake.cards.append((repo_id, text))

        monkeypatch.setattr(Dataset, "push_to_hub", push_to_hub)
        monkeypatch.setattr(hub, "_upload_card", upload_card)
        return self


@pytest.fixture()
def annotate_stage(monkeypatch, tmp_path):
    """run_annotate on the toy questions with a scripted policy; counts how often a backend is made."""
    import svpo_trl.search.vllm_backend as vllm_backend

    made = []

    def make_backend(*args, **kwargs):
        made.append(args)
        return scripted_policy()

    monkeypatch.setattr(vllm_backend, "make_backend", make_backend)
    script = AnnotateScriptArguments(model_name_or_path="scripted", limit=3, hub_dataset_id="user/ann")
    config = MCTSConfig(
        output_dir=str(tmp_path / "ann"),
        max_simulations=2,
        max_trees=1,
        num_children=2,
        temperature_levels=1,
        progress=False,
    )
    return script, config, made


def test_a_failed_push_loses_nothing_and_a_rerun_only_pushes(annotate_stage, monkeypatch, capsys, tmp_path):
    script, config, made = annotate_stage
    out = tmp_path / "ann"
    fake = FakeHub(fail_at=1).install(monkeypatch)  # trees goes through, pairs fails
    results = run_annotate(script, config)
    printed = [line for line in capsys.readouterr().out.splitlines() if "[hub]" in line]
    assert len(printed) == 1  # one line, no traceback
    assert "push to user/ann failed (ConnectionError: Failed to resolve" in printed[0]
    assert f"everything is saved in {out}" in printed[0] and "retry the push only" in printed[0]
    assert "left: pairs, values, solution_pairs" in printed[0]
    # Everything is saved locally, solution pairs and summary included; the stage is not marked done.
    for name in hub.ANNOTATION_DATASETS:
        assert (out / name / "dataset_info.json").exists(), name
    assert results["pairs"] == 3 and results["solution_pairs"] == 3
    assert json.loads((out / "summary.json").read_text())["solution_pairs"] == 3
    assert not (out / STAGE_MARKER).exists()
    assert fake.pushes == [("user/ann", "trees", "train")] and fake.cards == []
    record = hub.read_push_record(out)
    assert record["pushed"] == ["trees"] and record["done"] is False
    assert record["error"].startswith("ConnectionError: Failed to resolve")
    assert made == [("hf", "scripted")]

    # The rerun: no backend, no search; only the configs that are missing, then the card and the marker.
    shards = sorted(p.stat().st_mtime_ns for p in (out / "shards").glob("*/tree_*.json"))
    results = run_annotate(script, config)
    assert made == [("hf", "scripted")]
    assert sorted(p.stat().st_mtime_ns for p in (out / "shards").glob("*/tree_*.json")) == shards
    assert [name for _, name, _ in fake.pushes] == ["trees", "pairs", "values", "solution_pairs"]
    [(repo, card)] = fake.cards
    assert repo == "user/ann"
    assert '"pairs": 3' in card and '"solution_pairs": 3' in card  # the summary
    assert '"max_simulations": 2' in card and '"hub_dataset_id": "user/ann"' in card  # the settings
    assert "load_dataset('user/ann', 'pairs', split='train')" in card
    marker = json.loads((out / STAGE_MARKER).read_text())
    assert marker["results"]["hub_dataset_id"] == "user/ann" and results["pairs"] == 3
    assert hub.read_push_record(out)["done"] is True and not hub.push_pending(out)


def test_a_failed_card_upload_is_retried_alone(annotate_stage, monkeypatch, capsys, tmp_path):
    script, config, made = annotate_stage
    fake = FakeHub(card_fails=True).install(monkeypatch)
    run_annotate(script, config)
    assert "left: the card" in capsys.readouterr().out
    assert len(fake.pushes) == 4 and not (tmp_path / "ann" / STAGE_MARKER).exists()
    run_annotate(script, config)
    assert len(fake.pushes) == 4 and len(fake.cards) == 1 and len(made) == 1
    assert (tmp_path / "ann" / STAGE_MARKER).exists()


def test_a_rerun_with_other_settings_searches_again(annotate_stage, monkeypatch):
    script, config, made = annotate_stage
    FakeHub(fail_at=0).install(monkeypatch)
    run_annotate(script, config)
    script.limit = 2  # other problems: not the annotation that waits for its push
    run_annotate(script, config)
    assert len(made) == 2


def test_push_to_hub_and_hub_dataset_id_are_one_way(annotate_stage, monkeypatch, tmp_path):
    script, config, _ = annotate_stage
    fake = FakeHub().install(monkeypatch)
    config.push_to_hub = "user/other"
    with pytest.raises(ValueError, match="name two repos"):
        run_annotate(script, config)
    script.hub_dataset_id = None  # --push_to_hub alone: the same push, with the solution pairs
    run_annotate(script, config)
    assert [name for _, name, _ in fake.pushes] == list(hub.ANNOTATION_DATASETS)
    assert {repo for repo, _, _ in fake.pushes} == {"user/other"} and len(fake.cards) == 1


def test_the_library_push_is_the_same_push(monkeypatch, tmp_path, capsys):
    # MCTSConfig.push_to_hub used to push a DatasetDict whose splits have different features: it always
    # failed, after the datasets were saved but before the caller got them.
    fake = FakeHub(fail_at=0).install(monkeypatch)
    config = MCTSConfig(
        max_simulations=2,
        max_trees=1,
        num_children=2,
        temperature_levels=1,
        progress=False,
        push_to_hub="u/a",
    )
    problems = load_toy_problems("annotate", 2)
    data = MCTSAnnotator(scripted_policy(), config).annotate(problems, tmp_path)
    assert len(data["pairs"]) == 2 and (tmp_path / "pairs").is_dir()
    assert "[hub] push to u/a failed" in capsys.readouterr().out
    backend = scripted_policy()
    MCTSAnnotator(backend, config).annotate(problems, tmp_path)  # resumes: every tree is on disk
    assert backend.calls == []
    assert [name for _, name, _ in fake.pushes] == ["trees", "pairs", "values"] and len(fake.cards) == 1


def test_card_upload_keeps_the_configs_header(monkeypatch):
    from huggingface_hub import DatasetCard, DatasetCardData

    uploaded = []
    header = DatasetCardData(
        configs=[{"config_name": "pairs", "data_files": [{"split": "train", "path": "p/*"}]}]
    )
    monkeypatch.setattr(
        DatasetCard,
        "load",
        classmethod(
            lambda cls, repo, token=None: DatasetCard(
                header.to_yaml() and f"---\n{header.to_yaml()}\n---\nold"
            )
        ),
    )
    monkeypatch.setattr(
        DatasetCard,
        "push_to_hub",
        lambda self, repo_id, token=None, commit_message=None: uploaded.append((repo_id, str(self))),
    )
    hub._upload_card("u/a", "# new card\n", None)
    [(repo, content)] = uploaded
    assert repo == "u/a" and content.endswith("# new card\n") and "old" not in content
    assert DatasetCard(content).data.configs == header.configs


def test_a_missing_token_is_one_line_too(tmp_path, monkeypatch, capsys):
    # The real push path up to the network: no token, offline. Nothing is mocked but the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "")
    Dataset.from_dict({"a": [1]}).save_to_disk(str(tmp_path / "pairs"))
    result = hub.push_annotation(tmp_path, "user/ann")
    assert not result.ok and result.pushed == []
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("[hub] push to user/ann failed (") and "left: pairs" in line
    assert hub.push_pending(tmp_path)
