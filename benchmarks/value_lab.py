"""The value lab: every step ranker judged on the same frozen sibling groups, per seed, in minutes.

Per seed of the miniature (``recipes/configs/toy_reproduce.yaml``, roots made by
``benchmarks/reproduce_tables.py``: ``<root>/seed<N>/{sft,annotation,value_sft,svpo}``):

1. ``prepare`` freezes (a) the annotation's sibling groups (every expanded node's children with Q, N,
   Algorithm 1's label and the toy task's gold label) and (b) held-out groups: the value diagnostic's
   states on the first ``--heldout`` test problems with their B2 = 5 candidates sampled by the SVPO
   policy and gold labels. Both are saved as datasets under ``<lab>/seed<N>/``.
2. ``run`` scores every ranker of :data:`RANKERS` and trains every head variant of :data:`VARIANTS` on the
   training groups (frozen backbone features, or a value model with its own backbone), then scores them on
   both sets: within-group accuracy, top-1, AUC with bootstrap intervals over groups
   (``svpo_trl.value_lab.ranking_metrics``). It also writes the diagnosis of what V follows instead of
   correctness and how often the Eq. 7 labels order gold-labelled siblings the wrong way.

Writes ``benchmarks/results/value_lab.{json,md}``.

    python benchmarks/value_lab.py prepare --seeds 0 1 2
    python benchmarks/value_lab.py run --seeds 0 1 2
    python benchmarks/value_lab.py sbs-reference --seeds 0 1 2   # SBS ranked by the reference policy's prior
    python benchmarks/value_lab.py sbs --seeds 0 1 2   # after recipes/evaluate.py wrote <seed>/eval_rankers
    python benchmarks/value_lab.py render           # tables from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from svpo_trl.search.sbs import zscores
from svpo_trl.value_lab import flat_candidates, mixed_groups, ranking_metrics, score_candidates

LAB_ROOT = "outputs/value_lab"
SEED_ROOT = "outputs/reproduce"
RESULTS = "benchmarks/results/value_lab"
BETA = 0.1  # SVPOConfig.beta (paper): the implicit reward's scale (does not change a ranking)


# ---------------------------------------------------------------------------- prepare
def prepare(seed: int, heldout: int, seed_root: str, lab_root: str) -> None:
    """Freeze one seed's training-tree groups and held-out groups as datasets."""
    from datasets import Dataset

    from svpo_trl.data import load_saved_dataset
    from svpo_trl.models.loading import load_policy
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.toy.oracle import ToyStepOracle
    from svpo_trl.toy.task import load_toy_problems
    from svpo_trl.value_diagnostic import value_diagnostic
    from svpo_trl.value_lab import diagnostic_groups, tree_sibling_groups

    src = os.path.join(seed_root, f"seed{seed}")
    out = os.path.join(lab_root, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    began = time.perf_counter()
    trees = load_saved_dataset(os.path.join(src, "annotation", "trees"))
    oracle = ToyStepOracle(load_toy_problems("annotate"))
    train = tree_sibling_groups(list(trees), oracle)
    Dataset.from_list(train).save_to_disk(os.path.join(out, "train_groups"))
    print(f"[lab] seed {seed}: {len(train)} training groups ({len(mixed_groups(train))} mixed)", flush=True)
    model, tokenizer = load_policy(os.path.join(src, "svpo"))
    backend = HFBackend(model, tokenizer, batch_size=512, seed=seed)
    problems = load_toy_problems("test", heldout)
    diagnostic = value_diagnostic(
        backend, problems, "gold", num_samples=5, temperature=0.6, max_new_tokens=96, batch_size=300
    )
    held = diagnostic_groups(diagnostic.records)
    Dataset.from_list(held).save_to_disk(os.path.join(out, "heldout_groups"))
    with open(os.path.join(out, "prepare.json"), "w") as handle:
        json.dump(
            {"diagnostic": diagnostic.metrics, "seconds": time.perf_counter() - began}, handle, indent=1
        )
    print(f"[lab] seed {seed}: {len(held)} held-out groups ({len(mixed_groups(held))} mixed)", flush=True)


def load_groups(
    lab_root: str, seed: int, names: tuple[str, ...] = ("train", "heldout")
) -> dict[str, list[dict[str, Any]]]:
    """One seed's frozen groups, ``<lab>/seed<N>/<name>_groups`` for each of ``names``."""
    from svpo_trl.data import load_saved_dataset

    base = os.path.join(lab_root, f"seed{seed}")
    return {
        name: [dict(r) for r in load_saved_dataset(os.path.join(base, f"{name}_groups"))] for name in names
    }


# ---------------------------------------------------------------------------- features
# the embeddings (0), the first decoder layer's output (1) and the final, normed state (-1)
HIDDEN_LAYERS = (0, 1, -1)


def checkpoint_scores(
    path: str, groups: dict[str, list], *, hidden_layers: tuple[int, ...] = (), token_states: bool = False
) -> dict[str, dict[str, Any]]:
    """:func:`score_candidates` of every set of ``groups`` under the checkpoint at ``path``."""
    from svpo_trl.models.loading import load_policy

    model, tokenizer = load_policy(path)
    tokenizer.padding_side = "right"
    return {
        name: score_candidates(
            model, tokenizer, g, batch_size=128, hidden_layers=hidden_layers, token_states=token_states
        )
        for name, g in groups.items()
    }


def candidate_features(groups: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Properties of a step that V might follow instead of correctness."""
    flat, _ = flat_candidates(groups)
    kinds = {"answer": [], "terminal": [], "length": [], "printed": [], "depth": []}
    depth = np.concatenate([[g["depth"]] * len(g["candidates"]) for g in groups])
    for c in flat:
        text = c["text"]
        kinds["answer"].append(float("Final Answer" in text))
        kinds["terminal"].append(
            float(c.get("terminal", c.get("final_answer") is not None or c.get("malformed", False)))
        )
        kinds["length"].append(float(len(text)))
        printed = re.findall(r"<output>\s*(-?\d+)", text)
        kinds["printed"].append(float(printed[-1]) if printed else np.nan)
    out = {k: np.asarray(v, dtype=float) for k, v in kinds.items() if k != "depth"}
    out["depth"] = depth.astype(float)
    return out


# ---------------------------------------------------------------------------- heads on frozen features
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return torch.tanh(self.net(x)).squeeze(-1)


class Linear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, x):
        return torch.tanh(self.lin(x)).squeeze(-1)


class AttentionPool(nn.Module):
    """A learned query attends over the step's token states; a linear + tanh head reads the pooled state."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens, mask):
        weights = self.query(tokens).squeeze(-1).masked_fill(~mask, -1e9).softmax(-1)
        pooled = (weights.unsqueeze(-1) * tokens).sum(1)
        return torch.tanh(self.head(pooled)).squeeze(-1)


def _pad_tokens(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), length, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.as_tensor(s)
        mask[i, : len(s)] = True
    return x, mask


def _group_pairs(groups: list[dict], targets: np.ndarray) -> np.ndarray:
    """(better, worse) candidate indices of every pair of one group whose targets differ."""
    _, owner = flat_candidates(groups)
    pairs = []
    for g in range(len(groups)):
        idx = np.flatnonzero(owner == g)
        for a in idx:
            for b in idx:
                if targets[a] > targets[b]:
                    pairs.append((a, b))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def train_head(
    make: Callable[[], nn.Module],
    inputs: Callable[[np.ndarray], tuple],
    groups: list[dict],
    loss: str,
    target: np.ndarray,
    *,
    epochs: int = 60,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """Fit a head on frozen inputs: ``mse`` on ``target``, ``pairwise`` (logistic on score differences of
    sibling pairs ordered by ``target``) or ``listwise`` (softmax over each group against ``target`` > 0)."""
    torch.manual_seed(seed)
    head = make()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    n = len(target)
    all_idx = np.arange(n)
    y = torch.as_tensor(target, dtype=torch.float)
    pairs = _group_pairs(groups, target) if loss == "pairwise" else None
    _, owner = flat_candidates(groups)
    owner_t = torch.as_tensor(owner)
    for _ in range(epochs):
        opt.zero_grad()
        scores = head(*inputs(all_idx))
        if loss == "mse":
            value = ((scores - y) ** 2).mean()
        elif loss == "pairwise":
            if len(pairs) == 0:
                break
            diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]
            value = nn.functional.softplus(-4.0 * diff).mean()
        elif loss == "listwise":
            logits = 4.0 * scores
            groupmax = torch.zeros(len(groups)).scatter_reduce(0, owner_t, logits, "amax", include_self=False)
            expd = (logits - groupmax[owner_t]).exp()
            denom = torch.zeros(len(groups)).index_add(0, owner_t, expd)
            logp = logits - groupmax[owner_t] - denom[owner_t].log()
            positive = (y > 0).float()
            has = torch.zeros(len(groups)).index_add(0, owner_t, positive)
            weight = positive / has[owner_t].clamp(min=1)
            mixed = (has > 0) & (has < torch.bincount(owner_t, minlength=len(groups)).float())
            value = -(weight * logp * mixed[owner_t].float()).sum() / mixed.sum().clamp(min=1)
        else:
            raise ValueError(loss)
        value.backward()
        opt.step()
    return head.eval()


def frozen_inputs(scores: dict[str, Any], source: str) -> Callable[[np.ndarray], tuple]:
    """Inputs of a head from one checkpoint's frozen scores."""
    if source.startswith("end") or source.startswith("mean"):
        kind, layer = source.split(":")
        x = torch.as_tensor(
            scores["hidden_end" if kind == "end" else "hidden_mean"][int(layer)], dtype=torch.float
        )
        return lambda idx: (x[idx],)
    if source == "tokens":
        x, mask = _pad_tokens(scores["tokens"])
        return lambda idx: (x[idx], mask[idx])
    if source == "logprobs":
        cols = [scores[k] for k in ("logp_mean", "logp_min", "logp_sum", "prob_mean")]
        x = torch.as_tensor(np.stack(cols, 1), dtype=torch.float)
        x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)  # log-prob sums are ~10x the means: one scale for all
        return lambda idx: (x[idx],)
    raise ValueError(source)


# Head variants on the SVPO policy's frozen backbone: (name, head, input, loss, training target).
# Targets from the annotation only (what a user has): "target" (Eq. 7: R or Q), "alg1" (Algorithm 1: on a path
# to a correct terminal, +1 / -1). "gold" (the toy oracle) is an upper bound on what cleaner labels would give.
VARIANTS = [
    (
        "frozen linear, step end, MSE on Eq. 7 labels (paper head, frozen)",
        "linear",
        "end:-1",
        "mse",
        "target",
    ),
    ("frozen linear, step end, pairwise on siblings (Alg. 1 labels)", "linear", "end:-1", "pairwise", "alg1"),
    ("frozen linear, step end, listwise on siblings (Alg. 1 labels)", "linear", "end:-1", "listwise", "alg1"),
    ("frozen linear, step end, pairwise on siblings by Q", "linear", "end:-1", "pairwise", "target"),
    ("frozen MLP, step end, pairwise (Alg. 1)", "mlp", "end:-1", "pairwise", "alg1"),
    ("frozen linear, mean of step tokens, pairwise (Alg. 1)", "linear", "mean:-1", "pairwise", "alg1"),
    (
        "frozen attention pooling over step tokens, pairwise (Alg. 1)",
        "attention",
        "tokens",
        "pairwise",
        "alg1",
    ),
    ("frozen linear, layer 1 step end, pairwise (Alg. 1)", "linear", "end:1", "pairwise", "alg1"),
    ("frozen linear, embeddings mean, pairwise (Alg. 1)", "linear", "mean:0", "pairwise", "alg1"),
    ("frozen MLP, mean of step tokens, pairwise (Alg. 1)", "mlp", "mean:-1", "pairwise", "alg1"),
    (
        "linear on the step's log-probs (standardised), pairwise (Alg. 1)",
        "linear",
        "logprobs",
        "pairwise",
        "alg1",
    ),
    (
        "frozen linear, step end, pairwise on gold labels (upper bound)",
        "linear",
        "end:-1",
        "pairwise",
        "gold",
    ),
    (
        "frozen MLP, mean of step tokens, pairwise on gold labels (upper bound)",
        "mlp",
        "mean:-1",
        "pairwise",
        "gold",
    ),
]


def _target(groups: list[dict], kind: str) -> np.ndarray:
    flat, _ = flat_candidates(groups)
    if kind == "target":
        return np.asarray([c["target"] for c in flat], dtype=float)
    key = {"alg1": "alg1", "gold": "label"}[kind]
    return np.asarray([1.0 if c[key] else -1.0 for c in flat])


def _make(kind: str, dim: int) -> Callable[[], nn.Module]:
    return {"linear": lambda: Linear(dim), "mlp": lambda: MLP(dim), "attention": lambda: AttentionPool(dim)}[
        kind
    ]


def _dim(scores: dict[str, Any], source: str) -> int:
    if source == "logprobs":
        return 4
    if source == "tokens":
        return scores["tokens"][0].shape[-1]
    kind, layer = source.split(":")
    return scores["hidden_end" if kind == "end" else "hidden_mean"][int(layer)].shape[1]


def head_scores(head: nn.Module, inputs: Callable, n: int) -> np.ndarray:
    with torch.no_grad():
        return head(*inputs(np.arange(n))).numpy()


# ---------------------------------------------------------------------------- a value model with its own backbone
def finetune_value_model(
    path: str,
    groups: list[dict],
    loss: str,
    *,
    epochs: int = 3,
    lr: float = 5e-4,
    batch_groups: int = 16,
    seed: int = 0,
    label_key: str = "alg1",
) -> Any:
    """A copy of the policy at ``path`` trained as a value model on the training groups, every weight free
    (rStar-Math's separate process preference model, from the policy's weights).

    ``pairwise``: logistic loss on V(step end) differences of sibling pairs ordered by Algorithm 1's label
    (``label_key="alg1"``; ``"label"``: the gold one);
    ``token_mse``: V at *every* model-written token of the step regressed on the Eq. 7 label (Value-Guided
    Search's token-level value loss), read at the step end at test time.
    """
    from svpo_trl.models.loading import load_policy
    from svpo_trl.value_lab import encode_candidates

    torch.manual_seed(seed)
    model, tokenizer = load_policy(path)
    model.train()
    encoded = encode_candidates(tokenizer, groups)
    flat, owner = flat_candidates(groups)
    alg1 = np.asarray([1.0 if c[label_key] else -1.0 for c in flat])
    target = np.asarray([c.get("target", np.nan) for c in flat])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id or 0
    group_ids = list(range(len(groups)))
    if loss == "pairwise":  # groups whose children Algorithm 1 labels both ways: what a user has, not gold
        group_ids = [g for g in group_ids if len({alg1[i] for i in np.flatnonzero(owner == g)}) == 2]
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(group_ids)
        for start in range(0, len(order), batch_groups):
            members = np.concatenate(
                [np.flatnonzero(owner == g) for g in order[start : start + batch_groups]]
            )
            length = max(len(encoded[i][0]) for i in members)
            ids = torch.full((len(members), length), pad, dtype=torch.long)
            mask = torch.zeros((len(members), length), dtype=torch.long)
            for b, i in enumerate(members):
                ids[b, : len(encoded[i][0])] = torch.as_tensor(encoded[i][0])
                mask[b, : len(encoded[i][0])] = 1
            model.model(input_ids=ids, attention_mask=mask)  # the backbone; the head reads it by its hook
            values = model.last_values
            if loss == "pairwise":
                ends = torch.as_tensor([encoded[i][2] for i in members])
                v = values[torch.arange(len(members)), ends]
                local = {int(i): k for k, i in enumerate(members)}
                a, b = [], []
                for g in order[start : start + batch_groups]:
                    idx = np.flatnonzero(owner == g)
                    for x in idx:
                        for y in idx:
                            if alg1[x] > alg1[y]:
                                a.append(local[int(x)])
                                b.append(local[int(y)])
                value = nn.functional.softplus(-4.0 * (v[a] - v[b])).mean()
            else:
                rows, cols, ys = [], [], []
                for k, i in enumerate(members):
                    rows += [k] * len(encoded[i][1])
                    cols += encoded[i][1]
                    ys += [target[i]] * len(encoded[i][1])
                value = ((values[rows, cols] - torch.as_tensor(ys, dtype=values.dtype)) ** 2).mean()
            opt.zero_grad()
            value.backward()
            opt.step()
    model.eval()
    return model, tokenizer


FINETUNED = [
    ("own backbone (from the SVPO policy), pairwise on siblings (Alg. 1), 3 epochs", "pairwise"),
    ("own backbone (from the SVPO policy), token-level MSE on Eq. 7 labels, 3 epochs", "token_mse"),
]


# ---------------------------------------------------------------------------- run one seed
def _zscore_within(groups: list[dict], x: np.ndarray) -> np.ndarray:
    """Scores standardised within each group (so that rankers on other scales can be added)."""
    _, owner = flat_candidates(groups)
    out = np.zeros_like(x, dtype=float)
    for g in range(len(groups)):
        idx = owner == g
        out[idx] = zscores(x[idx].tolist())
    return out


def run_seed(seed: int, seed_root: str, lab_root: str) -> dict[str, Any]:
    began = time.perf_counter()
    src = os.path.join(seed_root, f"seed{seed}")
    groups = load_groups(lab_root, seed)
    scores = {
        name: checkpoint_scores(
            os.path.join(src, name),
            groups,
            hidden_layers=HIDDEN_LAYERS if name == "svpo" else (),
            token_states=name == "svpo",
        )
        for name in ("sft", "value_sft", "svpo")
    }
    rows: dict[str, dict[str, Any]] = {}
    cost: dict[str, float] = {}

    def add(name: str, per_set: dict[str, np.ndarray], seconds: float = 0.0) -> None:
        rows[name] = {s: ranking_metrics(groups[s], per_set[s], seed=seed) for s in groups}
        cost[name] = seconds

    def both(fn: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
        return {s: fn(s) for s in groups}

    recorded_prior = both(lambda s: np.asarray([c["prior"] for c in flat_candidates(groups[s])[0]]))
    add("prior (Eq. 4 mean token probability of the sampling policy)", recorded_prior)
    add("prior of the SVPO policy (recomputed)", both(lambda s: scores["svpo"][s]["prob_mean"]))
    add("step log-prob sum, SVPO policy", both(lambda s: scores["svpo"][s]["logp_sum"]))
    add("step mean log-prob, SVPO policy", both(lambda s: scores["svpo"][s]["logp_mean"]))
    add("step min token log-prob, SVPO policy", both(lambda s: scores["svpo"][s]["logp_min"]))
    add("prior of the value SFT policy", both(lambda s: scores["value_sft"][s]["prob_mean"]))
    add("V, value SFT checkpoint (paper head, Eq. 7)", both(lambda s: scores["value_sft"][s]["value"]))
    add(
        "V, SVPO checkpoint (paper head, Eq. 7 + 9 + 10)  [paper]", both(lambda s: scores["svpo"][s]["value"])
    )
    add(
        "implicit reward, SVPO vs value SFT (Eq. 8)",
        both(lambda s: BETA * (scores["svpo"][s]["logp_sum"] - scores["value_sft"][s]["logp_sum"])),
    )
    add(
        "implicit reward, value SFT vs SFT (RFT log-ratio)",
        both(lambda s: BETA * (scores["value_sft"][s]["logp_sum"] - scores["sft"][s]["logp_sum"])),
    )
    for w in (0.5, 1.0, 2.0):
        add(
            f"prior + {w} x V(SVPO), z-scored within state",
            both(
                lambda s, w=w: (
                    _zscore_within(groups[s], recorded_prior[s])
                    + w * _zscore_within(groups[s], np.nan_to_num(scores["svpo"][s]["value"]))
                )
            ),
        )
    add(
        "prior + implicit reward (value SFT vs SFT), z-scored",
        both(
            lambda s: (
                _zscore_within(groups[s], recorded_prior[s])
                + _zscore_within(groups[s], scores["value_sft"][s]["logp_sum"] - scores["sft"][s]["logp_sum"])
            )
        ),
    )
    # heads on the SVPO policy's frozen features
    svpo = scores["svpo"]
    for name, kind, source, loss, target in VARIANTS:
        t0 = time.perf_counter()
        inputs = {s: frozen_inputs(svpo[s], source) for s in groups}
        head = train_head(
            _make(kind, _dim(svpo["train"], source)),
            inputs["train"],
            groups["train"],
            loss,
            _target(groups["train"], target),
            seed=seed,
        )
        per = both(
            lambda s, head=head, inputs=inputs: head_scores(
                head, inputs[s], len(flat_candidates(groups[s])[0])
            )
        )
        add(name, per, time.perf_counter() - t0)
    for name, loss in FINETUNED:
        t0 = time.perf_counter()
        model, tokenizer = finetune_value_model(os.path.join(src, "svpo"), groups["train"], loss, seed=seed)
        tokenizer.padding_side = "right"
        per = both(
            lambda s, model=model, tokenizer=tokenizer: score_candidates(model, tokenizer, groups[s])["value"]
        )
        add(name, per, time.perf_counter() - t0)
        add(
            f"prior + {name}, z-scored",
            both(
                lambda s, per=per: (
                    _zscore_within(groups[s], recorded_prior[s]) + _zscore_within(groups[s], per[s])
                )
            ),
        )
    analysis = diagnose(groups, scores)
    return {
        "rankers": rows,
        "seconds": cost,
        "analysis": analysis,
        "total_seconds": time.perf_counter() - began,
    }


# ---------------------------------------------------------------------------- why V ranks siblings badly
def _pair_agreement(groups: list[dict], a: np.ndarray, b: np.ndarray, only_mixed_pairs: bool = True) -> float:
    """Within groups, over (on-track, off-track) pairs: how often ``a`` and ``b`` order the pair the same way."""
    flat, owner = flat_candidates(groups)
    labels = np.asarray([c["label"] for c in flat])
    agree = total = 0
    for g in mixed_groups(groups):
        idx = np.flatnonzero(owner == g)
        for i in idx:
            for j in idx:
                if labels[i] and not labels[j] and not (np.isnan(b[i]) or np.isnan(b[j])) and b[i] != b[j]:
                    total += 1
                    agree += int(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]))
    return agree / total if total else float("nan")


def diagnose(groups: dict[str, list], scores: dict[str, dict]) -> dict[str, Any]:
    """What the paper's V follows within a state, and how the Eq. 7 labels order gold-labelled siblings."""
    out: dict[str, Any] = {}
    for s, gs in groups.items():
        feats = candidate_features(gs)
        feats["prior"] = np.asarray([c["prior"] for c in flat_candidates(gs)[0]])
        feats["num_tokens"] = scores["svpo"][s]["num_tokens"].astype(float)
        entry = {}
        for model in ("value_sft", "svpo"):
            v = scores[model][s]["value"]
            entry[model] = {
                # share of (on, off) pairs where V's order agrees with the feature's order (ties excluded)
                f: _pair_agreement(gs, v, x)
                for f, x in feats.items()
            }
        # each property as a ranker on its own (what ordering by it alone would give)
        entry["as_ranker"] = {
            f: ranking_metrics(gs, np.nan_to_num(x, nan=-1e9), num_resamples=1)["within_group"]
            for f, x in feats.items()
        }
        out[s] = entry
    # the Eq. 7 labels against the gold labels on training siblings
    flat, owner = flat_candidates(groups["train"])
    gold = np.asarray([c["label"] for c in flat])
    wrong = ties = total = 0
    unvisited_wrong = 0
    off_unvisited = on_negative = 0
    for g in mixed_groups(groups["train"]):
        idx = np.flatnonzero(owner == g)
        for i in idx:
            for j in idx:
                if gold[i] and not gold[j]:
                    total += 1
                    ti, tj = flat[i]["target"], flat[j]["target"]
                    wrong += int(ti < tj)
                    ties += int(ti == tj)
                    if ti < tj and flat[j]["visits"] == 0:
                        unvisited_wrong += 1
    for c in flat:
        off_unvisited += int(not c["label"] and c["visits"] == 0)
        on_negative += int(c["label"] and c["target"] < 0)
    alg1 = np.asarray([c["alg1"] for c in flat])
    out["labels"] = {
        "gold_sibling_pairs": total,
        "eq7_orders_wrong": wrong / total if total else None,
        "eq7_ties": ties / total if total else None,
        "wrong_where_off_track_child_unvisited": unvisited_wrong / max(wrong, 1),
        "on_track_children_with_negative_label": on_negative / max(int(gold.sum()), 1),
        "off_track_children_unvisited": off_unvisited / max(int((~gold).sum()), 1),
        "alg1_agrees_with_gold": float((alg1 == gold).mean()),
        "alg1_precision_on_track": float(gold[alg1].mean()) if alg1.any() else None,
        "alg1_recall_on_track": float(alg1[gold].mean()) if gold.any() else None,
    }
    return out


# ---------------------------------------------------------------------------- tables
def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def render(results: dict[str, Any]) -> str:
    seeds = sorted(results["seeds"], key=int)
    names = list(results["seeds"][seeds[0]]["rankers"])
    lines = [
        "| ranker | held-out within-group, per seed | mean | training trees, per seed | held-out top-1 (mean) | "
        "held-out AUC (mean) | s to fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        held = [results["seeds"][s]["rankers"][name]["heldout"] for s in seeds]
        train = [results["seeds"][s]["rankers"][name]["train"] for s in seeds]
        cell = ", ".join(
            f"{_pct(h['within_group'])} [{_pct(h.get('within_group_low'))}, {_pct(h.get('within_group_high'))}]"
            for h in held
        )
        secs = statistics.fmean(results["seeds"][s]["seconds"][name] for s in seeds)
        lines.append(
            f"| {name} | {cell} | {_pct(statistics.fmean(h['within_group'] for h in held))} | "
            f"{', '.join(_pct(t['within_group']) for t in train)} | "
            f"{_pct(statistics.fmean(h['top1'] for h in held))} | {_pct(statistics.fmean(h['auc'] for h in held))} | "
            f"{secs:.0f} |"
        )
    counts = [results["seeds"][s]["rankers"][names[0]] for s in seeds]
    lines += [
        "",
        "Mixed groups (held-out / training trees) per seed: "
        + "; ".join(
            f"seed {s}: {c['heldout']['mixed_groups']} / {c['train']['mixed_groups']}"
            for s, c in zip(seeds, counts)
        ),
    ]
    return "\n".join(lines)


def render_analysis(results: dict[str, Any]) -> str:
    seeds = sorted(results["seeds"], key=int)
    lines = ["| seed | set | V of | " + " | ".join(FEATURES) + " |", "|---|---|---|" + "---|" * len(FEATURES)]
    for s in seeds:
        a = results["seeds"][s]["analysis"]
        for st in ("heldout", "train"):
            for model in ("value_sft", "svpo", "as_ranker"):
                row = a[st][model]
                label = "(feature alone: within-group)" if model == "as_ranker" else model
                lines.append(
                    f"| {s} | {st} | {label} | " + " | ".join(_pct(row.get(f)) for f in FEATURES) + " |"
                )
    lines += [
        "",
        "| seed | sibling pairs (gold) | Eq. 7 label orders them wrong | ties | of the wrong: off-track sibling unvisited | on-track children labelled < 0 | off-track children unvisited | Alg. 1 = gold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        lab = results["seeds"][s]["analysis"]["labels"]
        lines.append(
            f"| {s} | {lab['gold_sibling_pairs']} | {_pct(lab['eq7_orders_wrong'])} | {_pct(lab['eq7_ties'])} | "
            f"{_pct(lab['wrong_where_off_track_child_unvisited'])} | {_pct(lab['on_track_children_with_negative_label'])} | "
            f"{_pct(lab['off_track_children_unvisited'])} | {_pct(lab['alg1_agrees_with_gold'])} |"
        )
    return "\n".join(lines)


def render_headline(results: dict[str, Any]) -> str:
    """The README's two lines: SBS ranked by the reference's prior and by V, against greedy, pooled."""
    diffs = results["sbs"]["differences"]
    ref = diffs["SBS(1,5) ranked by the reference's prior - greedy"]
    value = diffs["SBS(1,5) ranked by V (paper) - greedy"]
    seeds = ", ".join(f"{100 * d['difference']:+.1f}" for d in ref["per_seed"])
    from svpo_trl.stats import format_difference

    return (
        f"SBS(1,5) − greedy on 1000 held-out problems, {len(ref['per_seed'])} seeds, pooled: ranked by the "
        f"reference policy's prior {format_difference(ref['pooled'])} points (per seed {seeds}); ranked by the "
        f"paper's V {format_difference(value['pooled'])}."
    )


SBS_ROWS = {
    "greedy": "greedy",
    "SBS(1,5), V (paper)": "sbs1x5",
    "SBS(1,5), prior": "sbs1x5-prior",
    "SBS(1,5), prior of the reference (value SFT) policy": "sbs1x5-reference",
}
SBS_DIFFERENCES = [
    ("SBS(1,5) ranked by the prior - greedy", "SBS(1,5), prior", "greedy"),
    (
        "SBS(1,5) ranked by the reference's prior - greedy",
        "SBS(1,5), prior of the reference (value SFT) policy",
        "greedy",
    ),
    ("SBS(1,5) ranked by V (paper) - greedy", "SBS(1,5), V (paper)", "greedy"),
    ("SBS(1,5): prior - V", "SBS(1,5), prior", "SBS(1,5), V (paper)"),
]


def sbs_reference(seed: int, seed_root: str, limit: int = 1000) -> None:
    """SBS(1,5) with the SVPO policy, its candidates ranked by the reference (value-SFT) policy's prior."""
    from svpo_trl.data import load_problems
    from svpo_trl.evaluation import Strategy, evaluate
    from svpo_trl.models.loading import load_policy
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.rankers import PolicyPriorRanker

    src = os.path.join(seed_root, f"seed{seed}")
    model, tokenizer = load_policy(os.path.join(src, "svpo"))
    reference, reference_tokenizer = load_policy(os.path.join(src, "value_sft"))
    problems = load_problems("toy", split="test").select(range(limit))
    evaluate(
        HFBackend(model, tokenizer, batch_size=512, seed=seed),
        problems,
        Strategy("sbs", beam_width=1, num_samples=5, ranker="prior"),
        ranker=PolicyPriorRanker(reference, reference_tokenizer, batch_size=256),
        batch_size=500,
        max_new_tokens=96,
        output_jsonl=os.path.join(src, "eval_rankers", "svpo__toy__sbs1x5-reference.jsonl"),
    )


def collect_sbs(seed_root: str, seeds: list[int]) -> dict[str, Any]:
    """Per-problem correctness of the SVPO policy's greedy and SBS rows (``recipes/evaluate.py`` output under
    ``<seed>/eval_rankers``), with paired bootstrap intervals per seed and pooled."""
    from svpo_trl.stats import paired_bootstrap

    correct: dict[str, dict[str, list[int]]] = {}
    for seed in seeds:
        folder = os.path.join(seed_root, f"seed{seed}", "eval_rankers")
        rows, ids = {}, {}
        for row, slug in SBS_ROWS.items():
            [path] = [p for p in os.listdir(folder) if p.endswith(f"__{slug}.jsonl")]
            with open(os.path.join(folder, path)) as handle:
                records = [json.loads(line) for line in handle]
            rows[row] = [int(r["correct"]) for r in records]
            ids[row] = [r["id"] for r in records]
        if len({tuple(v) for v in ids.values()}) != 1:
            raise ValueError(f"seed {seed}: the SBS rows were not run on the same problems in the same order")
        correct[str(seed)] = rows
    keys = sorted(correct, key=int)
    differences = {}
    for label, first, second in SBS_DIFFERENCES:
        differences[label] = {
            "per_seed": [paired_bootstrap(correct[s][first], correct[s][second]) for s in keys],
            "pooled": paired_bootstrap([correct[s][first] for s in keys], [correct[s][second] for s in keys]),
        }
    room = {}
    for seed in keys:
        with open(os.path.join(LAB_ROOT, f"seed{seed}", "prepare.json")) as handle:
            diagnostic = json.load(handle)["diagnostic"]
        n = diagnostic["num_problems"]
        room[seed] = {
            "problems": n,
            "oracle_ceiling": diagnostic["oracle_ceiling"],
            "greedy_same_problems": statistics.fmean(correct[seed]["greedy"][:n]),
        }
    return {"correct": correct, "differences": differences, "room": room}


def render_sbs(results: dict[str, Any]) -> str:
    from svpo_trl.stats import format_difference

    sbs = results["sbs"]
    seeds = sorted(sbs["correct"], key=int)
    n = len(sbs["correct"][seeds[0]]["greedy"])
    lines = [
        f"| SVPO policy, {n} held-out problems | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    ]
    lines += ["|---|" + "---|" * (len(seeds) + 1)]
    for row in SBS_ROWS:
        accs = [statistics.fmean(sbs["correct"][s][row]) for s in seeds]
        lines.append(
            f"| {row} | " + " | ".join(_pct(a) for a in accs) + f" | {_pct(statistics.fmean(accs))} |"
        )
    lines += [
        "",
        "| paired difference, points [95% interval] | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | pooled |",
    ]
    lines += ["|---|" + "---|" * (len(seeds) + 1)]
    for label, entry in sbs["differences"].items():
        cells = [format_difference(d) for d in [*entry["per_seed"], entry["pooled"]]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    room = sbs.get("room", {})
    if room:
        lines += [
            "",
            "Room for any ranker (SBS(1,5) with a perfect ranker vs greedy, first problems of the test set): "
            + "; ".join(
                f"seed {s}: {_pct(r['oracle_ceiling'])} vs {_pct(r['greedy_same_problems'])} on {r['problems']}"
                for s, r in sorted(room.items(), key=lambda kv: int(kv[0]))
            ),
        ]
    return "\n".join(lines)


FEATURES = ["prior", "answer", "terminal", "length", "num_tokens", "printed", "depth"]


def _load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {"seeds": {}}
    with open(path) as handle:
        return json.load(handle)


def parse_lab_arguments(parser: argparse.ArgumentParser, results: str) -> argparse.Namespace:
    """The lab scripts' shared flags (seeds, the reproduction's and the lab's roots, the results file), parsed;
    torch's threads set from ``SVPO_LAB_THREADS`` (1 by default)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed-root", default=SEED_ROOT)
    parser.add_argument("--lab-root", default=LAB_ROOT)
    parser.add_argument("--results", default=results)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("SVPO_LAB_THREADS", "1")))
    return args


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["prepare", "run", "sbs-reference", "sbs", "render"])
    parser.add_argument("--heldout", type=int, default=300, help="test problems of the held-out groups")
    args = parse_lab_arguments(parser, RESULTS)
    path = args.results + ".json"
    if args.command == "prepare":
        for seed in args.seeds:
            prepare(seed, args.heldout, args.seed_root, args.lab_root)
        return
    if args.command == "run":
        for seed in args.seeds:
            result = run_seed(seed, args.seed_root, args.lab_root)
            saved = _load(path)
            saved["seeds"][str(seed)] = result
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                json.dump(saved, handle)
            os.replace(path + ".tmp", path)
            print(f"[lab] seed {seed}: {result['total_seconds']:.0f} s", flush=True)
    if args.command == "sbs-reference":
        for seed in args.seeds:
            sbs_reference(seed, args.seed_root)
        return
    if args.command == "sbs":
        saved = _load(path)
        saved["sbs"] = collect_sbs(args.seed_root, args.seeds)
        with open(path, "w") as handle:
            json.dump(saved, handle)
    saved = _load(path)
    text = render(saved) + "\n\n" + render_analysis(saved)
    if "sbs" in saved:
        text += "\n\n" + render_sbs(saved)
    with open(args.results + ".md", "w") as handle:
        handle.write("# Value lab: step rankers on frozen sibling groups\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
