"""SVPOTrainer and ValueSFTTrainer under DeepSpeed ZeRO-2 / ZeRO-3, 2 processes on the CPU (accelerate launch).

Each run (tests/deepspeed_worker.py) trains 3 steps with the value head; the checks: every parameter moved
(gathered under ZeRO-3), the processes agree, the checkpoint ``trainer.save_model`` writes loads back with
``ValueHeadForCausalLM.from_pretrained`` with the trained head, and the step-1 loss equals that of a
single-process, non-DeepSpeed fp32 run on the same batch (bf16 within 1 %, fp32 within 1e-5), and so
does the gradient norm.

DeepSpeed runs on the CPU through its CPU accelerator with gloo; the first run JIT-compiles its shared-memory
all-reduce op with the local C++ compiler (about a minute, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_worker
from svpo_trl.models import ValueHeadForCausalLM
from svpo_trl.toy import tiny_llama

from conftest import accelerate_launch

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
TERMS = {
    "svpo": ["loss/dpo", "loss/margin", "loss/regularization", "loss/sft", "loss/mse"],
    "value_sft": ["nll", "mse"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A tiny Llama saved with a value head, and another saved without one (as an SFT stage leaves it)."""
    root = tmp_path_factory.mktemp("deepspeed_models")
    models = {
        "head": ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0)),
        "plain": tiny_llama(tiny_tokenizer, seed=1),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    return {name: root / name for name in models}


def _launch(stage: int, trainer: str, model: Path, output: Path, *extra: str) -> list[dict]:
    cmd = [*accelerate_launch(REPO / "accelerate_configs" / f"deepspeed_zero{stage}_cpu.yaml"), *extra]
    cmd += [str(REPO / "tests" / "deepspeed_worker.py"), "--trainer", trainer]
    cmd += ["--model", str(model), "--output", str(output)]
    if stage == 3:  # the recipes' setting (gradient_checkpointing: true), and the hardest case for it
        cmd.append("--gradient_checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    (output.parent / f"{output.name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


def _reference(trainer: str, model: Path, output: Path, v_head: dict) -> dict:
    threads = torch.get_num_threads()
    try:
        return deepspeed_worker.train(trainer, str(model), str(output), single_process=True, v_head=v_head)
    finally:
        torch.set_num_threads(threads)


def _check_run(records: list[dict], output: Path, dtype: str) -> None:
    first, second = records
    assert first["world_size"] == 2 and {r["rank"] for r in records} == {0, 1}
    # Logged values are gathered over the processes (the last entry holds each process's own runtime)
    assert first["log_history"][:-1] == second["log_history"][:-1]
    assert first["param_dtype"] == dtype
    # Every parameter, v_head included (gathered under ZeRO-3), moved; both processes hold the same head
    num_parameters = len(list(ValueHeadForCausalLM.from_pretrained(output / "final").parameters()))
    assert first["num_parameters"] == num_parameters
    assert first["unchanged"] == [] and second["unchanged"] == []
    assert first["v_head_trained"] == second["v_head_trained"]
    assert first["v_head_trained"] != first["v_head_loaded"]

    config = json.loads((output / "final" / "config.json").read_text())
    assert config["has_value_head"] is True and config["architectures"] == ["LlamaForCausalLM"]
    saved = ValueHeadForCausalLM.from_pretrained(output / "final")
    assert str(saved.dtype) == dtype  # the gathered 16-bit weights under bf16
    for name, param in saved.v_head.named_parameters():
        assert param.float().flatten().tolist() == first["v_head_trained"][name], name


def _check_step_one(run: dict, reference: dict, trainer: str, rel: float) -> None:
    step, expected = run["log_history"][0], reference["log_history"][0]
    assert step["step"] == expected["step"] == 1
    assert step["loss"] == pytest.approx(expected["loss"], rel=rel)
    # Adam hides a wrong gradient scale from the losses; the norm shows it (e.g. an average over processes)
    assert step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=rel)
    for term in TERMS[trainer]:
        assert step[term] == pytest.approx(expected[term], rel=rel, abs=rel), term


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("trainer", ["svpo", "value_sft"])
def test_zero_bf16_trains_saves_and_matches_one_process(trainer, stage, checkpoints, tmp_path):
    # Value SFT starts from a checkpoint without a head (as after the SFT stage): under ZeRO-3 the new head is
    # initialised inside deepspeed.zero.Init, partitioned
    model = checkpoints["plain" if trainer == "value_sft" else "head"]
    records = _launch(stage, trainer, model, tmp_path / "run")
    _check_run(records, tmp_path / "run", "torch.bfloat16")

    loaded = records[0]["v_head_loaded"]
    assert records[1]["v_head_loaded"] == loaded or stage == 2  # ZeRO-2 broadcasts rank 0's at engine start
    if trainer == "value_sft":
        assert loaded["bias"] == [0.0] and 0.01 < torch.tensor(loaded["weight"]).std() < 0.03
    else:  # the saved head, restored exactly (in bf16 when ZeRO-3 Init casts at load)
        dtype = getattr(torch, records[0]["loaded_dtype"].removeprefix("torch."))
        assert records[0]["loaded_dtype"] == ("torch.bfloat16" if stage == 3 else "torch.float32")
        assert loaded == deepspeed_worker._v_head(ValueHeadForCausalLM.from_pretrained(model, dtype=dtype))
    reference = _reference(trainer, model, tmp_path / "reference", loaded)
    _check_step_one(records[0], reference, trainer, rel=1e-2)


def test_zero3_fp32_svpo_equals_one_process(checkpoints, tmp_path):
    records = _launch(3, "svpo", checkpoints["head"], tmp_path / "run", "--mixed_precision", "no")
    _check_run(records, tmp_path / "run", "torch.float32")
    reference = _reference("svpo", checkpoints["head"], tmp_path / "reference", records[0]["v_head_loaded"])
    _check_step_one(records[0], reference, "svpo", rel=1e-5)
    for step, expected in zip(records[0]["log_history"][1:3], reference["log_history"][1:3]):
        assert step["loss"] == pytest.approx(expected["loss"], rel=1e-3)
