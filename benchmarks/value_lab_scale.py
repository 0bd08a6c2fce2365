"""The value lab's scale test: do heads learn to rank siblings given on-policy, gold-labelled data, and more of it?

Two hypotheses for why no head on the SVPO policy's states ranks held-out siblings (``benchmarks/value_lab.py``):

- **distribution shift**: the annotation's trees hold the stage-0 policy's steps, SBS ranks the SVPO policy's;
- **too little data**: 300 annotated questions.

``prepare`` samples, with the SVPO policy exactly as SBS and the held-out groups do (B2 = 5 candidates per state
at T = 0.6, ``svpo_trl.value_diagnostic``), states on the first ``--onpolicy`` questions of the annotate split
(the first 300 are the annotated ones) with the toy task's gold labels, and saves them as
``<lab>/seed<N>/onpolicy_groups``. Gold labels bound what Monte-Carlo rollout labels of the same steps could
give (a rollout estimate of "still leads to the answer" is the gold label plus noise).

``run`` trains, for each training size (questions), the heads of the lab on those groups and scores them on the
lab's held-out groups (the same frozen sets as every other row of the lab). Writes
``benchmarks/results/value_lab_scale.{json,md}``.

    python benchmarks/value_lab_scale.py prepare --seeds 0 1 2   # about 10 min a seed at 1500 questions
    python benchmarks/value_lab_scale.py run --seeds 0 1 2
    python benchmarks/value_lab_scale.py epochs --seeds 0 1 2    # do longer-trained frozen heads do better?
    python benchmarks/value_lab_scale.py render
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import value_lab as lab
from svpo_trl.value_lab import flat_candidates, mixed_groups, ranking_metrics, score_candidates

RESULTS = "benchmarks/results/value_lab_scale"
SIZES = (300, 750, 1500)
# (name, head, input, loss) on the SVPO policy's frozen features, pairwise on gold labels within a state
HEADS = [
    ("frozen linear, step end", "linear", "end:-1"),
    ("frozen MLP, step end", "mlp", "end:-1"),
    ("frozen MLP, mean of step tokens", "mlp", "mean:-1"),
    ("linear on the step's log-probs (standardised)", "linear", "logprobs"),
]
OWN = "own backbone (from the SVPO policy), 3 epochs"
COMBINED = "value-SFT prior + own backbone, z-scored"


def prepare(seed: int, num_questions: int, seed_root: str, lab_root: str) -> None:
    """Freeze the SVPO policy's on-policy states on the annotate split's first questions, gold-labelled."""
    from datasets import Dataset

    from svpo_trl.models.loading import load_policy
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.toy.task import load_toy_problems
    from svpo_trl.value_diagnostic import value_diagnostic
    from svpo_trl.value_lab import diagnostic_groups

    began = time.perf_counter()
    model, tokenizer = load_policy(os.path.join(seed_root, f"seed{seed}", "svpo"))
    backend = HFBackend(model, tokenizer, batch_size=512, seed=seed)
    problems = load_toy_problems("annotate", num_questions)
    diagnostic = value_diagnostic(
        backend, problems, "gold", num_samples=5, temperature=0.6, max_new_tokens=96, batch_size=500
    )
    groups = diagnostic_groups(diagnostic.records)
    out = os.path.join(lab_root, f"seed{seed}")
    Dataset.from_list(groups).save_to_disk(os.path.join(out, "onpolicy_groups"))
    with open(os.path.join(out, "onpolicy.json"), "w") as handle:
        json.dump({"questions": num_questions, "seconds": time.perf_counter() - began}, handle)
    print(
        f"[scale] seed {seed}: {len(groups)} on-policy groups ({len(mixed_groups(groups))} mixed)", flush=True
    )


def first_questions(groups: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The groups of the first ``n`` questions (group ids are ``<question id>/<state>``, in question order)."""
    seen: set[str] = set()
    out = []
    for g in groups:
        seen.add(g["id"].rsplit("/", 1)[0])
        if len(seen) > n:
            break
        out.append(g)
    return out


def run_seed(seed: int, seed_root: str, lab_root: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    began = time.perf_counter()
    src = os.path.join(seed_root, f"seed{seed}")
    sets = lab.load_groups(lab_root, seed, ("onpolicy", "heldout"))
    onpolicy, heldout = sets["onpolicy"], sets["heldout"]
    svpo = lab.checkpoint_scores(os.path.join(src, "svpo"), sets, hidden_layers=(-1,))
    reference_prior = lab.checkpoint_scores(os.path.join(src, "value_sft"), {"heldout": heldout})["heldout"][
        "prob_mean"
    ]
    rows: dict[str, dict[str, Any]] = {}
    asked = [n for n in sizes if n <= len({g["id"].rsplit("/", 1)[0] for g in onpolicy})]

    def add(name: str, n: int, fit: dict[str, Any] | None, held: np.ndarray, seconds: float) -> None:
        entry = rows.setdefault(name, {})
        entry[str(n)] = {
            "heldout": ranking_metrics(heldout, held, seed=seed),
            "fit": fit,
            "seconds": seconds,
        }

    add("prior of the value SFT policy (no training)", 0, None, reference_prior, 0.0)
    recorded = np.asarray([c["prior"] for c in flat_candidates(heldout)[0]])
    add(
        "value-SFT prior + the sampling (SVPO) policy's prior, z-scored (no training)",
        0,
        None,
        lab._zscore_within(heldout, reference_prior) + lab._zscore_within(heldout, recorded),
        0.0,
    )
    sizes_seen = {}
    for n in asked:
        train = first_questions(onpolicy, n)
        sizes_seen[str(n)] = {"groups": len(train), "mixed": len(mixed_groups(train))}
        count = len(flat_candidates(train)[0])
        target = lab._target(train, "gold")
        for name, kind, source in HEADS:
            t0 = time.perf_counter()
            inputs = {s: lab.frozen_inputs(svpo[s], source) for s in svpo}
            # the training rows are a prefix of the on-policy set's flat candidates
            head = lab.train_head(
                lab._make(kind, lab._dim(svpo["onpolicy"], source)),
                inputs["onpolicy"],
                train,
                "pairwise",
                target,
                seed=seed,
            )
            fit = ranking_metrics(train, lab.head_scores(head, inputs["onpolicy"], count), num_resamples=1)
            held = lab.head_scores(head, inputs["heldout"], len(flat_candidates(heldout)[0]))
            add(name, n, fit, held, time.perf_counter() - t0)
        t0 = time.perf_counter()
        own, own_tokenizer = lab.finetune_value_model(
            os.path.join(src, "svpo"), train, "pairwise", seed=seed, label_key="label"
        )
        own_tokenizer.padding_side = "right"
        held = score_candidates(own, own_tokenizer, heldout)["value"]
        fit_scores = score_candidates(own, own_tokenizer, train)["value"]
        add(OWN, n, ranking_metrics(train, fit_scores, num_resamples=1), held, time.perf_counter() - t0)
        combined = lab._zscore_within(heldout, reference_prior) + lab._zscore_within(heldout, held)
        add(COMBINED, n, None, combined, 0.0)
        print(f"[scale] seed {seed}: {n} questions done ({time.perf_counter() - began:.0f} s)", flush=True)
    return {
        "rows": rows,
        "sizes": sizes_seen,
        "heldout_mixed": len(mixed_groups(heldout)),
        "total_seconds": time.perf_counter() - began,
    }


# Is a frozen head undertrained? The lab trains 60 full-batch steps; here 10x and 33x (at a higher rate) too.
SCHEDULES = ((60, 3e-3), (600, 3e-3), (2000, 1e-2))
EPOCH_HEADS = [
    ("frozen linear, step end", "linear", "end:-1"),
    ("frozen MLP, step end", "mlp", "end:-1"),
    ("frozen linear, mean of step tokens", "linear", "mean:-1"),
    ("frozen MLP, mean of step tokens", "mlp", "mean:-1"),
]


def epochs_seed(seed: int, seed_root: str, lab_root: str) -> dict[str, Any]:
    """Frozen heads, pairwise on gold labels, trained on the annotation's trees or on the 1500 on-policy
    questions for each of :data:`SCHEDULES`: the fit and held-out within-group accuracy."""
    sets = lab.load_groups(lab_root, seed, ("train", "onpolicy", "heldout"))
    scores = lab.checkpoint_scores(os.path.join(seed_root, f"seed{seed}", "svpo"), sets, hidden_layers=(-1,))
    held_n = len(flat_candidates(sets["heldout"])[0])
    out: dict[str, Any] = {}
    for trained_on in ("train", "onpolicy"):
        groups = sets[trained_on]
        target = lab._target(groups, "gold")
        for name, kind, source in EPOCH_HEADS:
            inputs = {n: lab.frozen_inputs(scores[n], source) for n in sets}
            for epochs, lr in SCHEDULES:
                head = lab.train_head(
                    lab._make(kind, lab._dim(scores[trained_on], source)),
                    inputs[trained_on],
                    groups,
                    "pairwise",
                    target,
                    epochs=epochs,
                    lr=lr,
                    seed=seed,
                )
                fit = lab.head_scores(head, inputs[trained_on], len(target))
                held = lab.head_scores(head, inputs["heldout"], held_n)
                out[f"{trained_on}|{name}|{epochs}|{lr:g}"] = {
                    "fit": ranking_metrics(groups, fit, num_resamples=1)["within_group"],
                    "heldout": ranking_metrics(sets["heldout"], held, num_resamples=1)["within_group"],
                }
    return out


def render_epochs(results: dict[str, Any]) -> str:
    seeds = sorted(results.get("epochs", {}), key=int)
    if not seeds:
        return ""
    lines = [
        "| trained on (gold labels) | head | steps, rate | held-out within-group, per seed | fit, per seed |",
        "|---|---|---|---|---|",
    ]
    sets = {"train": "the annotation's trees", "onpolicy": "1500 on-policy questions"}
    for key in results["epochs"][seeds[0]]:
        trained_on, name, epochs, lr = key.split("|")
        cells = [results["epochs"][s][key] for s in seeds]
        lines.append(
            f"| {sets[trained_on]} | {name} | {epochs}, {lr} | "
            + ", ".join(lab._pct(c["heldout"]) for c in cells)
            + " | "
            + ", ".join(lab._pct(c["fit"]) for c in cells)
            + " |"
        )
    return "\n".join(lines)


class HeadPlusPriorRanker:
    """SBS ranker: z(reference prior) + z(head on the searching policy's mean step-token state), over each
    question's candidates of the round (``ranker(owners, candidates, values)``, see svpo_trl.search.rankers)."""

    def __init__(self, policy, policy_tokenizer, head, reference):
        self.policy, self.tokenizer, self.head, self.reference = policy, policy_tokenizer, head, reference

    def __call__(self, owners, candidates, values):
        from svpo_trl.search.rankers import last_step_groups
        from svpo_trl.search.sbs import zscores

        if not candidates:
            return []
        groups = last_step_groups(candidates)
        prior = np.asarray(self.reference(owners, candidates, values))
        feats = score_candidates(self.policy, self.tokenizer, groups, batch_size=128, hidden_layers=(-1,))
        x = torch.as_tensor(np.stack(feats["hidden_mean"][-1]), dtype=torch.float)
        with torch.no_grad():
            v = self.head(x).numpy()
        out = np.zeros(len(candidates))
        owners = np.asarray(owners)
        for o in np.unique(owners):
            idx = np.flatnonzero(owners == o)
            out[idx] = np.asarray(zscores(prior[idx].tolist())) + np.asarray(zscores(v[idx].tolist()))
        return out.tolist()


def sbs_seed(seed: int, seed_root: str, lab_root: str, limit: int = 1000) -> dict[str, Any]:
    """SBS(1,5) with the SVPO policy ranked by the value-SFT prior + a frozen MLP on the mean step-token state
    trained on the 1500 on-policy questions' gold labels; the lab metrics of that ranker first."""
    from svpo_trl.data import load_problems
    from svpo_trl.evaluation import Strategy, evaluate
    from svpo_trl.models.loading import load_policy
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.rankers import PolicyPriorRanker

    began = time.perf_counter()
    src = os.path.join(seed_root, f"seed{seed}")
    sets = lab.load_groups(lab_root, seed, ("onpolicy", "heldout"))
    onpolicy, heldout = sets["onpolicy"], sets["heldout"]
    model, tokenizer = load_policy(os.path.join(src, "svpo"))
    tokenizer.padding_side = "right"
    feats = {
        n: score_candidates(model, tokenizer, g, batch_size=128, hidden_layers=(-1,)) for n, g in sets.items()
    }
    inputs = {n: lab.frozen_inputs(feats[n], "mean:-1") for n in feats}
    target = lab._target(onpolicy, "gold")
    head = lab.train_head(
        lab._make("mlp", lab._dim(feats["onpolicy"], "mean:-1")),
        inputs["onpolicy"],
        onpolicy,
        "pairwise",
        target,
        seed=seed,
    )
    reference, reference_tokenizer = load_policy(os.path.join(src, "value_sft"))
    reference_tokenizer.padding_side = "right"
    prior = score_candidates(reference, reference_tokenizer, heldout, batch_size=128)["prob_mean"]
    held = lab.head_scores(head, inputs["heldout"], len(flat_candidates(heldout)[0]))
    combined = lab._zscore_within(heldout, prior) + lab._zscore_within(heldout, held)
    lab_metrics = {
        "head": ranking_metrics(heldout, held, seed=seed),
        "prior + head": ranking_metrics(heldout, combined, seed=seed),
    }
    ranker = HeadPlusPriorRanker(
        model, tokenizer, head, PolicyPriorRanker(reference, reference_tokenizer, batch_size=256)
    )
    out_jsonl = os.path.join(src, "eval_rankers", "svpo__toy__sbs1x5-prior-head.jsonl")
    problems = load_problems("toy", split="test").select(range(limit))
    evaluate(
        HFBackend(model, tokenizer, batch_size=512, seed=seed),
        problems,
        Strategy("sbs", beam_width=1, num_samples=5, ranker="prior"),
        ranker=ranker,
        batch_size=500,
        max_new_tokens=96,
        output_jsonl=out_jsonl,
    )
    from svpo_trl.pipeline.claims import read_correct

    return {"lab": lab_metrics, "correct": read_correct(out_jsonl), "seconds": time.perf_counter() - began}


def render_sbs(results: dict[str, Any], reproduction: dict[str, Any]) -> str:
    """SBS(1,5) ranked by the value-SFT prior + the on-policy head, against the reproduction's rows of the same
    SVPO policy on the same problems (``reproduction``: reproduce_tables.json)."""
    from svpo_trl.stats import format_difference, paired_bootstrap

    seeds = sorted(results.get("sbs", {}), key=int)
    if not seeds:
        return ""
    runs = reproduction["runs"]
    rows = {
        "SBS(1,5), value-SFT prior + on-policy head": lambda s: results["sbs"][s]["correct"],
        "SBS(1,5), value-SFT prior (reproduction)": lambda s: runs[s]["correct"]["SVPO/sbs(1,5,reference)"],
        "greedy (reproduction)": lambda s: runs[s]["correct"]["SVPO/greedy"],
    }
    lines = [
        "| SVPO policy (lr 1e-4), 1000 held-out problems | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | pooled |"
    ]
    lines += ["|---|" + "---|" * (len(seeds) + 1)]
    for name, get in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(lab._pct(statistics.fmean(get(s))) for s in seeds) + " | - |"
        )
    lines.append(
        "| the ranker's lab within-group accuracy (held-out states) | "
        + " | ".join(lab._pct(results["sbs"][s]["lab"]["prior + head"]["within_group"]) for s in seeds)
        + " | - |"
    )
    first, greedy = rows["SBS(1,5), value-SFT prior + on-policy head"], rows["greedy (reproduction)"]
    reference = rows["SBS(1,5), value-SFT prior (reproduction)"]
    for label, other in (("greedy", greedy), ("SBS(1,5) ranked by the value-SFT prior", reference)):
        per = [paired_bootstrap(first(s), other(s)) for s in seeds]
        pooled = paired_bootstrap([first(s) for s in seeds], [other(s) for s in seeds])
        cells = " | ".join(format_difference(d) for d in [*per, pooled])
        lines.append(f"| prior + head − {label}, points [95% interval] | {cells} |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    seeds = sorted(results["seeds"], key=int)
    if not seeds:
        return ""
    first = results["seeds"][seeds[0]]
    lines = [
        "| ranker, pairwise on gold labels of on-policy siblings | questions | held-out within-group, per seed "
        "| mean | fit (training groups), mean | s to fit |",
        "|---|---|---|---|---|---|",
    ]
    for name in first["rows"]:
        for n in first["rows"][name]:
            cells = [results["seeds"][s]["rows"][name].get(n) for s in seeds]
            if any(c is None for c in cells):
                continue
            held = [c["heldout"] for c in cells]
            fits = [c["fit"]["within_group"] for c in cells if c["fit"]]
            text = ", ".join(
                f"{lab._pct(h['within_group'])} [{lab._pct(h['within_group_low'])}, {lab._pct(h['within_group_high'])}]"
                for h in held
            )
            lines.append(
                f"| {name} | {n if n != '0' else '-'} | {text} | "
                f"{lab._pct(statistics.fmean(h['within_group'] for h in held))} | "
                f"{lab._pct(statistics.fmean(fits)) if fits else '-'} | "
                f"{statistics.fmean(c['seconds'] for c in cells):.0f} |"
            )
    lines += [
        "",
        "Training groups (mixed) per size and seed: "
        + "; ".join(
            f"seed {s}: "
            + ", ".join(
                f"{n} questions {v['groups']} ({v['mixed']})" for n, v in results["seeds"][s]["sizes"].items()
            )
            for s in seeds
        )
        + ". Held-out mixed groups: "
        + ", ".join(str(results["seeds"][s]["heldout_mixed"]) for s in seeds)
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["prepare", "run", "epochs", "sbs", "render"])
    parser.add_argument("--onpolicy", type=int, default=max(SIZES), help="annotate-split questions to sample")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="training sizes, questions")
    args = lab.parse_lab_arguments(parser, RESULTS)
    path = args.results + ".json"
    if args.command == "prepare":
        for seed in args.seeds:
            prepare(seed, args.onpolicy, args.seed_root, args.lab_root)
        return
    # each command's per-seed result, merged under its key into what the results file holds
    steps = {
        "run": ("seeds", lambda seed: run_seed(seed, args.seed_root, args.lab_root, tuple(args.sizes))),
        "epochs": ("epochs", lambda seed: epochs_seed(seed, args.seed_root, args.lab_root)),
        "sbs": ("sbs", lambda seed: sbs_seed(seed, args.seed_root, args.lab_root)),
    }
    if args.command in steps:
        key, one_seed = steps[args.command]
        for seed in args.seeds:
            result = one_seed(seed)
            saved = lab._load(path)
            saved.setdefault(key, {})[str(seed)] = result
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                json.dump(saved, handle)
            os.replace(path + ".tmp", path)
    saved = lab._load(path)
    with open(os.path.join(os.path.dirname(lab.RESULTS), "reproduce_tables.json")) as handle:
        reproduction = json.load(handle)
    text = "\n\n".join(t for t in (render(saved), render_epochs(saved), render_sbs(saved, reproduction)) if t)
    with open(args.results + ".md", "w") as handle:
        handle.write("# Value lab: on-policy gold-labelled siblings, by training size\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
