"""The value lab: judge a step ranker in seconds on frozen sibling groups, not in an 85-minute pipeline.

SBS (§3.3) needs one thing of its ranker: among the ``B2`` candidate steps sampled from one state, put a
step that still leads to the right answer above one that does not. The lab freezes such groups once and
scores any ranker on them:

- **training-tree groups** (:func:`tree_sibling_groups`): every expanded node of the MCTS annotation with
  its children, each child with its Q, N, prior, Algorithm 1 label and (toy task) the gold label;
- **held-out groups** (:func:`diagnostic_groups`): the states the value diagnostic met on test problems,
  with their ``B2`` sampled candidates and gold labels (``svpo_trl.value_diagnostic``).

A ranker is a score per candidate (higher is better). :func:`score_candidates` computes, under any
checkpoint, what the rankers of the lab read: V at the step end, the step's token log-probs (the prior of
Eq. 4 and the implicit reward of Eq. 8 against a reference) and, on request, hidden states for heads
trained on frozen features. :func:`ranking_metrics` gives within-group accuracy, top-1 and AUC, each with
a bootstrap interval over groups. Training-tree and held-out numbers side by side tell overfitting from
no signal. ``benchmarks/value_lab.py`` runs the variants and writes the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .search.tree import Tree
from .tokenization import tokenize_solution
from .value_diagnostic import pairwise_accuracy

__all__ = [
    "diagnostic_groups",
    "encode_candidates",
    "flat_candidates",
    "mixed_groups",
    "ranking_metrics",
    "score_candidates",
    "tree_sibling_groups",
]


def tree_sibling_groups(
    trees: Sequence[dict[str, Any]], oracle: Any = None, *, min_children: int = 2
) -> list[dict[str, Any]]:
    """One group per expanded node of the annotation's ``trees`` rows with ``min_children`` or more children.

    A group is ``{"id", "prompt", "prefix" (the parent's step texts), "depth", "candidates"}``; each
    candidate holds ``text``, ``q`` (backed-up Q), ``target`` (the Eq. 7 label: R if terminal, else Q),
    ``visits`` (N), ``prior``, ``num_samples``, ``terminal``, ``reward``, ``alg1`` (Algorithm 1's label: on
    a path to a correct terminal), ``final_answer`` and ``label``: on track by ``oracle.on_track(prompt,
    steps)`` (the toy task's :class:`~svpo_trl.toy.oracle.ToyStepOracle`), else ``alg1``.
    """
    groups = []
    for row in trees:
        tree = Tree.from_nodes(_prompt_of(row), row["nodes"])
        for node in tree:
            children = tree.children(node)
            if len(children) < min_children:
                continue
            prefix = [n.text for n in tree.path(node)]
            candidates = []
            for child in children:
                label = (
                    child.correct if oracle is None else oracle.on_track(tree.prompt, [*prefix, child.text])
                )
                candidates.append(
                    {
                        "text": child.text,
                        "q": float(child.q_value),
                        "target": child.value_label,
                        "visits": int(child.visit_count),
                        "prior": float(child.prior),
                        "num_samples": int(child.num_samples),
                        "terminal": bool(child.is_terminal),
                        "reward": child.reward,
                        "alg1": bool(child.correct),
                        "final_answer": child.final_answer,
                        "label": bool(label),
                    }
                )
            groups.append(
                {
                    "id": f"{row['id']}/{row.get('tree_index', 0)}/{node.node_id}",
                    "prompt": tree.prompt,
                    "prefix": prefix,
                    "depth": node.depth,
                    "candidates": candidates,
                }
            )
    return groups


def _prompt_of(row: dict[str, Any]) -> str:
    from .steps import DEFAULT_FORMAT

    return row.get("prompt") or DEFAULT_FORMAT.prompt(row["question"])


def diagnostic_groups(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The value diagnostic's per-problem records (``__value_diagnostic.jsonl``) as lab groups.

    Each recorded state becomes ``{"id", "prompt", "prefix", "depth", "candidates"}`` with every
    candidate's ``text``, ``label`` (gold on track), ``prior`` (of the policy that sampled it), ``value``
    (its V then) and ``malformed``; identical candidate texts of one state are kept once.
    """
    groups = []
    for record in records:
        for k, group in enumerate(record["groups"]):
            if "prompt" not in group:
                raise ValueError(
                    f"diagnostic record {record['id']!r}, group {k}: no 'prompt'/'prefix' (written before the "
                    "value lab existed); run the value diagnostic again"
                )
            seen, candidates = set(), []
            for c in group["candidates"]:
                if c["text"] in seen:
                    continue
                seen.add(c["text"])
                candidates.append(
                    {
                        "text": c["text"],
                        "label": bool(c["on_track"]),
                        "prior": float(c["prior"]),
                        "value": c.get("value"),
                        "malformed": bool(c.get("malformed", False)),
                        "final_answer": c.get("final_answer"),
                    }
                )
            groups.append(
                {
                    "id": f"{record['id']}/{k}",
                    "prompt": group["prompt"],
                    "prefix": list(group["prefix"]),
                    "depth": group["depth"],
                    "candidates": candidates,
                }
            )
    return groups


def flat_candidates(groups: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every candidate of every group in order, and the group index of each (scores are flat arrays)."""
    flat, owner = [], []
    for g, group in enumerate(groups):
        for c in group["candidates"]:
            flat.append(c)
            owner.append(g)
    return flat, np.asarray(owner, dtype=np.int64)


def mixed_groups(groups: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the groups whose candidates mix on-track and off-track steps (where ranking decides)."""
    return [g for g, group in enumerate(groups) if len({bool(c["label"]) for c in group["candidates"]}) == 2]


def _group_stats(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """Pairwise wins (ties half), number of (on, off) pairs, and whether the top-scored one is on track."""
    accuracy, pairs = pairwise_accuracy(scores[labels].tolist(), scores[~labels].tolist())
    return accuracy * pairs, pairs, int(labels[int(np.argmax(scores))])


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with ties half (NaN when one class is empty)."""
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def ranking_metrics(
    groups: Sequence[dict[str, Any]],
    scores: Sequence[float] | np.ndarray,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """How well ``scores`` (one per candidate, in :func:`flat_candidates` order) rank the groups' steps.

    - ``within_group``: over the mixed groups, the share of (on-track, off-track) candidate pairs of one
      group that the score orders right (ties half), pooled over pairs; 0.5 is chance.
    - ``top1``: in mixed groups, how often the best-scored candidate is on track (the first of ties).
    - ``auc``: AUC over all candidates of all groups pooled (compares states across problems too).
    Each comes with ``<name>_low`` / ``<name>_high``, a percentile bootstrap interval over groups
    (``num_resamples`` draws). ``mixed_groups``, ``groups`` and ``pairs`` count what was measured.
    """
    flat, owner = flat_candidates(groups)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (len(flat),):
        raise ValueError(
            f"ranking_metrics: {scores.shape[0] if scores.ndim else 0} scores for {len(flat)} candidates"
        )
    labels = np.asarray([bool(c["label"]) for c in flat])
    starts = np.searchsorted(owner, np.arange(len(groups)))
    ends = np.searchsorted(owner, np.arange(len(groups)), side="right")
    mixed = mixed_groups(groups)
    stats = np.asarray(
        [_group_stats(labels[starts[g] : ends[g]], scores[starts[g] : ends[g]]) for g in mixed], dtype=float
    ).reshape(-1, 3)
    rng = np.random.default_rng(seed)

    def within(rows: np.ndarray) -> float:
        return float(rows[:, 0].sum() / rows[:, 1].sum()) if rows[:, 1].sum() else float("nan")

    def top1(rows: np.ndarray) -> float:
        return float(rows[:, 2].mean()) if len(rows) else float("nan")

    result: dict[str, Any] = {
        "groups": len(groups),
        "mixed_groups": len(mixed),
        "pairs": int(stats[:, 1].sum()),
        "within_group": within(stats),
        "top1": top1(stats),
        "auc": _auc(labels, scores),
    }
    tail = (1 - confidence) / 2
    if len(mixed):
        draws = rng.integers(0, len(mixed), size=(num_resamples, len(mixed)))
        for name, fn in (("within_group", within), ("top1", top1)):
            values = np.asarray([fn(stats[d]) for d in draws])
            result[f"{name}_low"], result[f"{name}_high"] = np.nanquantile(values, [tail, 1 - tail]).tolist()
    all_draws = rng.integers(0, len(groups), size=(num_resamples, len(groups))) if len(groups) else []
    aucs = []
    for d in all_draws:
        idx = np.concatenate([np.arange(starts[g], ends[g]) for g in d])
        aucs.append(_auc(labels[idx], scores[idx]))
    if np.isfinite(aucs).any():
        result["auc_low"], result["auc_high"] = np.nanquantile(np.asarray(aucs), [tail, 1 - tail]).tolist()
    return result


def encode_candidates(
    tokenizer: Any, groups: Sequence[dict[str, Any]]
) -> list[tuple[list[int], list[int], int]]:
    """Per candidate (in :func:`flat_candidates` order): the token ids of prompt + prefix + step, the positions
    of the step's model-written tokens, and the step's last token (where V is read)."""
    flat, owner = flat_candidates(groups)
    encoded = []
    for c, g in zip(flat, owner):
        group = groups[int(g)]
        tok = tokenize_solution(tokenizer, group["prompt"], [*group["prefix"], c["text"]], add_eos=False)
        start = tok.step_ends[-2] + 1 if len(tok.step_ends) > 1 else tok.prompt_len
        end = tok.step_ends[-1]
        positions = [p for p in range(start, end + 1) if tok.completion_mask[p]]
        # An answer step's generation stops at "</step>" and the sampler appends the newline (where V is read):
        # the policy did not write it, so its probability (low: after a final answer the model ends the text)
        # is no part of the step's log-prob or prior, as in search (Step.prior, Eq. 4).
        if (
            c["text"].endswith("</step>\n")
            and positions
            and positions[-1] == end
            and tokenizer.decode([tok.input_ids[end]]) == "\n"
        ):
            positions = positions[:-1]
        encoded.append((tok.input_ids, positions, end))
    return encoded


def score_candidates(
    model: Any,
    tokenizer: Any,
    groups: Sequence[dict[str, Any]],
    *,
    batch_size: int = 64,
    hidden_layers: Sequence[int] = (),
    token_states: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """What a checkpoint says of every candidate (in :func:`flat_candidates` order), one forward each.

    Returns arrays: ``value`` (V at the step's last token, NaN without a head), ``logp_sum`` /
    ``logp_mean`` / ``logp_min`` (log-probs of the step's model-written tokens: Eq. 8's log pi of the step
    is ``logp_sum``), ``prob_mean`` (Eq. 4's prior: the mean token probability), ``num_tokens``; with
    ``hidden_layers``, ``hidden_end[layer]`` (hidden state of that layer at the step end) and
    ``hidden_mean[layer]`` (mean over the step's model-written tokens); with ``token_states``,
    ``tokens``: the last layer's hidden states of those tokens, one array per candidate.
    Positions and tokens are the training's (:func:`~svpo_trl.tokenization.tokenize_solution`), where V is
    read in value pre-training, MCTS and SBS alike.
    """
    import torch
    from tqdm.auto import tqdm

    encoded = encode_candidates(tokenizer, groups)
    n = len(encoded)
    out: dict[str, Any] = {
        key: np.full(n, np.nan) for key in ("value", "logp_sum", "logp_mean", "logp_min", "prob_mean")
    }
    out["num_tokens"] = np.zeros(n, dtype=np.int64)
    out["hidden_end"] = {layer: [None] * n for layer in hidden_layers}
    out["hidden_mean"] = {layer: [None] * n for layer in hidden_layers}
    if token_states:
        out["tokens"] = [None] * n
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    want_hidden = bool(hidden_layers) or token_states
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="scoring candidates"):
            chunk = order[start : start + batch_size]
            length = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for b, i in enumerate(chunk):
                row = torch.as_tensor(encoded[i][0])
                ids[b, : len(row)] = row
                mask[b, : len(row)] = 1
            outputs = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=want_hidden
            )
            logprobs = torch.log_softmax(outputs.logits.float(), dim=-1)
            values = getattr(outputs, "values", None)
            values = values if isinstance(values, torch.Tensor) else None
            for b, i in enumerate(chunk):
                _, positions, end = encoded[i]
                pos = torch.as_tensor(positions, device=logprobs.device)
                token_lp = logprobs[b, pos - 1, ids[b, pos].to(logprobs.device)]
                out["logp_sum"][i] = float(token_lp.sum())
                out["logp_mean"][i] = float(token_lp.mean())
                out["logp_min"][i] = float(token_lp.min())
                out["prob_mean"][i] = float(token_lp.exp().mean())
                out["num_tokens"][i] = len(positions)
                if values is not None:
                    out["value"][i] = float(values[b, end])
                for layer in hidden_layers:
                    states = outputs.hidden_states[layer][b].float()
                    out["hidden_end"][layer][i] = states[end].cpu().numpy()
                    out["hidden_mean"][layer][i] = states[pos].mean(0).cpu().numpy()
                if token_states:
                    out["tokens"][i] = outputs.hidden_states[-1][b, pos].float().cpu().numpy()
    model.train(was_training)
    for layer in hidden_layers:
        out["hidden_end"][layer] = np.stack(out["hidden_end"][layer])
        out["hidden_mean"][layer] = np.stack(out["hidden_mean"][layer])
    return out
