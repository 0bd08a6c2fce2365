"""What a larger toy backbone would cost on this CPU: one training step and one batch of generation.

The miniature's policy is a tiny Llama (``toy_hidden_size`` 128, ``toy_num_layers`` 2). Issue 17 asks whether a
larger backbone is affordable. This times, at one torch thread, a stage-0 training step (batch 32 of the toy
task's solution texts, forward + backward + AdamW) and the greedy generation of 96 tokens for 64 prompts, for a
few sizes, and scales the measured per-seed time of the reproduction's stages by the ratio to the default.

    python benchmarks/toy_backbone_cost.py     # writes benchmarks/results/toy_backbone_cost.{json,md}
"""

from __future__ import annotations

import json
import time

import torch

from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.toy import build_toy_tokenizer, load_toy_problems, tiny_llama

SIZES = [(128, 2), (256, 4), (512, 6)]
RESULTS = "benchmarks/results/toy_backbone_cost"


def time_size(tokenizer, texts, prompts, hidden: int, layers: int) -> dict[str, float]:
    model = tiny_llama(tokenizer, seed=0, hidden_size=hidden, num_layers=layers)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    steps = []
    for _ in range(4):
        t0 = time.perf_counter()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t0)
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **enc, max_new_tokens=96, min_new_tokens=96, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    generate = time.perf_counter() - t0
    return {"parameters": params, "train_step_s": min(steps[1:]), "generate_64x96_s": generate}


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = build_toy_tokenizer()
    tokenizer.padding_side = "left"
    rows = list(load_toy_problems("train", 96))
    texts = [DEFAULT_FORMAT.prompt(r["question"]) + r["solution"] for r in rows[:32]]
    prompts = [DEFAULT_FORMAT.prompt(r["question"]) for r in rows[32:96]]
    results = {f"{h}x{n}": time_size(tokenizer, texts, prompts, h, n) for h, n in SIZES}
    base = results["128x2"]
    lines = [
        "| hidden x layers | parameters | training step, s | ratio | generate 64 x 96 tokens, s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['train_step_s']:.3f} | "
            f"{r['train_step_s'] / base['train_step_s']:.1f}x | {r['generate_64x96_s']:.2f} | "
            f"{r['generate_64x96_s'] / base['generate_64x96_s']:.1f}x |"
        )
    text = "\n".join(lines)
    with open(RESULTS + ".json", "w") as handle:
        json.dump({"threads": 1, "sizes": results}, handle, indent=1)
    with open(RESULTS + ".md", "w") as handle:
        handle.write("# A larger toy backbone: cost on one CPU thread\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
