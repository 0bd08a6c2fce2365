"""Render the figures quoted in README.md and docs/*.md from the committed results in benchmarks/results/.

Every figure a page quotes sits between two markers, ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``,
and is what the renderer ``NAME`` in :data:`BLOCKS` makes of a committed results file. Nobody types those
lines: after a benchmark writes new results, regenerate the pages, and the tests
(``tests/test_docs.py``) fail while a page and its results file disagree.

    python benchmarks/render_docs.py              # rewrite every block in README.md and docs/*.md
    python benchmarks/render_docs.py --check      # exit 1 naming the stale blocks, change nothing
    python benchmarks/render_docs.py docs/results.md

The demo's blocks (``demo``, ``demo_claims``, ``demo_run``) render ``benchmarks/results/demo.json``, which
``python benchmarks/demo_seeds.py --publish NAME`` writes from the seeds it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _benchmark_module(name: str):
    """benchmarks/<name>.py (a benchmark's tables live next to the runs that make them)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    """A GitHub table; ``align`` holds "r" for a right-aligned column, "" otherwise."""
    align = align or [""] * len(header)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def typed_table(name: str) -> Callable[[], str]:
    """A table kept as ``{"source", "header", "rows", "align"?}``: figures whose run saved no results file,
    copied once into one (its ``source`` says so), so that pages render them instead of retyping them."""

    def render() -> str:
        data = _load(name)
        return markdown_table(data["header"], data["rows"], data.get("align"))

    return render


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _demo_seeds() -> tuple[dict[str, Any], list[str]]:
    data = _load("demo.json")
    return data, sorted(data["seeds"], key=int)


def demo() -> str:
    """The table ``make demo`` prints, from benchmarks/results/demo.json: each row's mean and range over the
    seeds measured, and every seed's value."""
    data, seeds = _demo_seeds()
    first = data["seeds"][seeds[0]]["rows"]
    header = [
        "System",
        "Decoding",
        "toy, mean (range)",
        "per seed",
        "tokens / question",
        "seconds / question",
    ]
    rows = []
    for i, row in enumerate(first):
        per_seed = [data["seeds"][s]["rows"][i] for s in seeds]
        assert all((r["system"], r["decoding"]) == (row["system"], row["decoding"]) for r in per_seed), (
            "every seed of demo.json lists the same rows in the same order"
        )
        accuracy = [r["accuracy"] for r in per_seed]
        rows.append(
            [
                row["system"],
                row["decoding"],
                f"{statistics.fmean(accuracy):.1f} ({min(accuracy):.1f}–{max(accuracy):.1f})",
                ", ".join(f"{a:.1f}" for a in accuracy),
                f"{statistics.fmean(r['tokens_per_question'] for r in per_seed):.0f}",
                f"{statistics.fmean(r['seconds_per_question'] for r in per_seed):.3f}",
            ]
        )
    table = markdown_table(header, rows)
    return (
        f"{table}\n\n<sub>Seeds {', '.join(seeds)} of `make demo` ({data['problems']} problems), from "
        f"`benchmarks/results/demo.json` ({data['source']}).</sub>"
    )


def demo_claims_seed0() -> str:
    """The paired lines the demo printed after its table on the first seed, as it prints them (README)."""
    from svpo_trl.pipeline.claims import claim_lines

    data, seeds = _demo_seeds()
    lines = claim_lines(data["seeds"][seeds[0]]["correct"], data["claims"])
    return (
        "```text\n[pipeline] what this run shows (paired on the same problems):\n"
        + "\n".join(f"  - {line}" for line in lines)
        + "\n```"
    )


def demo_claims() -> str:
    """The paired lines the demo prints after its table, per seed (from the per-problem results in demo.json)."""
    from svpo_trl.pipeline.claims import claim_lines

    data, seeds = _demo_seeds()
    lines = []
    for claim in data["claims"]:
        per_seed = [claim_lines(data["seeds"][s]["correct"], [claim])[0] for s in seeds]
        lines.append(f"- {claim['claim']}:")
        lines += [f"  - seed {s}: {line.split(': ', 1)[1]}" for s, line in zip(seeds, per_seed)]
    return "\n".join(lines)


def demo_variants() -> str:
    """Every demo setting measured over seeds (benchmarks/results/demo_seeds.json): each row's accuracy per seed
    and its range, the rows whose range is over 2 points in bold."""
    data = _load("demo_seeds.json")
    rows = []
    for name, variant in data["variants"].items():
        seeds = sorted(variant["seeds"], key=int)
        for key in variant["seeds"][seeds[0]]["correct"]:
            values = [100 * statistics.fmean(variant["seeds"][s]["correct"][key]) for s in seeds]
            spread = max(values) - min(values)
            cell = f"**{spread:.1f}**" if spread > 2 else f"{spread:.1f}"
            rows.append([name, key, ", ".join(f"{v:.1f}" for v in values), cell])
    return markdown_table(["setting", "row", "seeds 0, 1, 2", "range"], rows, ["", "", "", "r"])


def demo_run() -> str:
    """How long the demo takes, and in which setting (docs/results.md)."""
    data, seeds = _demo_seeds()
    runs = []
    for s in seeds:
        run = data["seeds"][s]
        resumed = f" after reusing {', '.join(run['resumed'])}" if run.get("resumed") else ""
        runs.append(f"seed {s} {run['pipeline_minutes']:.1f} min{resumed}")
    text = (
        f"`{data['setting']}` with `num_threads: {data['num_threads']}`, on {data['machine']}; the seeds' runs: "
        f"{'; '.join(runs)}."
    )
    fresh = data.get("fresh_clone")
    if fresh:
        text += (
            f" On a fresh clone with a new virtual environment, `{fresh['command']}` took "
            f"{fresh['total_minutes']:.1f} minutes: {fresh['install_minutes']:.1f} to install, "
            f"{fresh['pipeline_minutes']:.1f} for the pipeline ({fresh['note']})."
        )
    return text


def reproduce_tables() -> str:
    """The reproduction's full tables (docs/results.md), as ``reproduce_tables.py --render-only`` makes them."""
    markdown, _ = _benchmark_module("reproduce_tables").tables(_load("reproduce_tables.json")["runs"])
    return markdown


HEADLINE_ROWS = [
    "SFT/greedy",
    "Value SFT/greedy",
    "DPO/greedy",
    "SVPO/greedy",
    "SVPO/sbs(1,5)",
    "SVPO/sbs(3,5)",
    "SVPO/sbs(1,5,reference)",
    "DPO (lr 2e-5)/greedy",
    "SVPO (lr 2e-5)/greedy",
    "SVPO (lr 2e-5)/sbs(1,5,prior)",
]
HEADLINE_DIFFERENCES = {
    "greedy: SVPO - SFT": "SVPO − SFT (greedy)",
    "greedy: SVPO - DPO": "SVPO − DPO (greedy)",
    "SVPO: SBS(1,5) - greedy": "SBS(1,5) − greedy (SVPO, ranked by V)",
    "SVPO: SBS(1,5) ranked by the value-SFT prior - greedy": "SBS(1,5) − greedy (SVPO, ranked by the value-SFT prior)",
    "greedy (lr 2e-5): SVPO - DPO": "SVPO − DPO at lr 2e-5 (greedy)",
    "SVPO (lr 2e-5): SBS(1,5) ranked by the prior - greedy": "SBS(1,5) − greedy (SVPO at lr 2e-5, ranked by its prior)",
}


def reproduce_headline() -> str:
    """The README's short version of the reproduction, from the same JSON as the full tables."""
    from svpo_trl.stats import format_difference

    saved = _load("reproduce_tables.json")
    runs = saved["runs"]
    _, summary = _benchmark_module("reproduce_tables").tables(runs)
    seeds = sorted(runs, key=int)
    n = len(runs[seeds[0]]["correct"]["SFT/greedy"])
    rows = []
    for row in HEADLINE_ROWS:
        system, strategy = row.rsplit("/", 1)
        rows.append([system, strategy, _mean_std([100 * v for v in summary["accuracy"][row]], 1)])
    header = ["Model", "Decoding", f"accuracy, % (mean ± std, {len(seeds)} seeds × {n} held-out problems)"]
    pooled = [
        f"{text} {_minus(format_difference(summary['differences'][label]['pooled']))}"
        for label, text in HEADLINE_DIFFERENCES.items()
    ]
    return (
        markdown_table(header, rows)
        + "\n\nPaired differences pooled over seeds, in points with bootstrap 95% intervals: "
        + "; ".join(pooled)
        + "."
    )


def _minus(text: str) -> str:
    return text.replace("-", "−")


def reproduce_targets() -> str:
    """The reproduction's targets, met or missed per seed (docs/results.md), from reproduce_tables.json."""
    from svpo_trl.stats import format_difference

    runs = _load("reproduce_tables.json")["runs"]
    _, summary = _benchmark_module("reproduce_tables").tables(runs)
    seeds = sorted(runs, key=int)
    pct = lambda values: 100 * statistics.fmean(values)  # noqa: E731
    greedy = [pct(runs[s]["correct"]["SFT/greedy"]) for s in seeds]
    spread = max(greedy) - min(greedy)
    # The diagnostic ran on the first problems of the test set: greedy on the same problems.
    ceilings = []
    for s in seeds:
        sft = runs[s]["value_by_model"]["SFT"]
        n = sft["num_problems"]
        ceilings.append((100 * sft["oracle_ceiling"], pct(runs[s]["correct"]["SFT/greedy"][:n])))
    room = [c - g for c, g in ceilings]
    diffs = summary["differences"]
    sft_gain = diffs["greedy: SVPO - SFT"]["per_seed"]
    sbs_gain = diffs["SVPO: SBS(1,5) - greedy"]["per_seed"]
    reference_gain = diffs["SVPO: SBS(1,5) ranked by the value-SFT prior - greedy"]["per_seed"]
    svpo_room = []
    for s in seeds:
        m = runs[s]["value_by_model"]["SVPO"]
        svpo_room.append(
            (100 * m["oracle_ceiling"], pct(runs[s]["correct"]["SVPO/greedy"][: m["num_problems"]]))
        )
    dpo = diffs["greedy: SVPO - DPO"]
    value = [runs[s]["value_by_model"]["SVPO"] for s in seeds]
    yes = lambda ok, note="": ("yes" if ok else "**no**") + (f" ({note})" if note else "")  # noqa: E731
    rows = [
        [
            "stage-0 greedy spread ≤ 10 points",
            *[f"{g:.1f}" for g in greedy],
            yes(spread <= 10, f"{spread:.1f}"),
        ],
        [
            f"stage-0 SBS oracle ceiling ≥ greedy + 10 (first {n})",
            *[f"{c:.1f} vs {g:.1f}" for c, g in ceilings],
            yes(min(room) >= 10, f"+{min(room):.0f} to +{max(room):.0f}"),
        ],
        [
            "SVPO greedy − SFT greedy > 0",
            *[_minus(format_difference(d)) for d in sft_gain],
            yes(all(d["low"] > 0 for d in sft_gain)),
        ],
        [
            "SVPO + SBS(1,5) − SVPO greedy ≥ +3",
            *[_minus(format_difference(d)) for d in sbs_gain],
            yes(all(d["difference"] >= 0.03 for d in sbs_gain)),
        ],
        [
            "SVPO + SBS(1,5) ranked by the value-SFT prior − greedy ≥ +3, interval above 0",
            *[_minus(format_difference(d)) for d in reference_gain],
            yes(all(d["difference"] >= 0.03 and d["low"] > 0 for d in reference_gain)),
        ],
        [
            f"SVPO SBS(1,5) oracle ceiling ≥ greedy + 8 (first {n})",
            *[f"{c:.1f} vs {g:.1f}" for c, g in svpo_room],
            yes(
                min(c - g for c, g in svpo_room) >= 8,
                _minus(f"{min(c - g for c, g in svpo_room):+.1f} to {max(c - g for c, g in svpo_room):+.1f}"),
            ),
        ],
        [
            "V within-group ≥ 65% and above the prior",
            *[
                f"{100 * m['within_group_accuracy']:.1f} vs {100 * m['prior_within_group_accuracy']:.1f}"
                for m in value
            ],
            yes(
                all(
                    m["within_group_accuracy"] >= 0.65
                    and m["within_group_accuracy"] > m["prior_within_group_accuracy"]
                    for m in value
                )
            ),
        ],
        [
            "SVPO greedy ≥ DPO greedy on average",
            *[_minus(f"{100 * d['difference']:+.1f}") for d in dpo["per_seed"]],
            yes(dpo["pooled"]["difference"] >= 0, _minus(format_difference(dpo["pooled"])) + " pooled"),
        ],
        [
            "the same at lr 2e-5 (SVPO and DPO)",
            *[
                _minus(f"{100 * d['difference']:+.1f}")
                for d in diffs["greedy (lr 2e-5): SVPO - DPO"]["per_seed"]
            ],
            yes(
                diffs["greedy (lr 2e-5): SVPO - DPO"]["pooled"]["difference"] >= 0,
                _minus(format_difference(diffs["greedy (lr 2e-5): SVPO - DPO"]["pooled"])) + " pooled",
            ),
        ],
    ]
    return markdown_table(["target (every seed)", *[f"seed {s}" for s in seeds], "met?"], rows)


def gsm8k_conversion() -> str:
    """The GSM8K conversion figures (docs/data.md), from gsm8k_step_conversion.json."""
    d = _load("gsm8k_step_conversion.json")
    dropped = d["dropped_by_reason"]
    return (
        f"Measured on the {d['problems']:,} GSM8K training problems (`python benchmarks/gsm8k_step_conversion.py`, "
        f"results in `benchmarks/results/gsm8k_step_conversion.{{json,md}}`): **{d['converted']:,} convert "
        f"({100 * d['converted'] / d['problems']:.1f}%)**; {dropped['no calculation gives the gold']} are dropped because no "
        'calculation gives the gold (the last step is done in words, e.g. "so he buys 5 bags because 4 < 4.8 < 5") '
        f"and {dropped['no calculation']} because they have no calculation at all. Every converted solution was run "
        "in `PythonSandbox`, each code step after the earlier ones as the step sampler runs them: "
        f"{d['code_steps_with_identical_output']:,} of {d['code_steps_run']:,} code steps print exactly the "
        f"`<output>` the conversion wrote, and {d['solutions_whose_run_prints_the_gold']:,} of {d['converted']:,} "
        "solutions print the gold and state it as the final answer "
        f"({d['solutions_whose_final_answer_is_the_gold']:,}, `is_equiv`)."
    )


def real_model_mcts() -> str:
    """What the search made of the real model after SFT (docs/results.md), from real_model_stage0.json."""
    data = _load("real_model_stage0.json")
    settings, row = data["settings"], data["rows"][-1]
    return (
        f"MCTS after {row['sft_steps']} steps ({row['sft_examples']} solutions), reduced to {row['questions']} toy "
        f"questions, 1 tree, {settings['max_simulations']} simulations of {settings['num_children']} children, "
        f"{settings['max_new_tokens']} tokens per step, each tree at a temperature drawn from 0.6/0.8/1.0: "
        f"{row['steps_written']} steps written, {100 * row['well_formed_share']:.0f}% well-formed (the rest ran out "
        f"of tokens or broke the format), {row['answer_steps']} answer steps, **{row['correct_terminals']} correct, "
        f"{row['pairs']} pairs** ({row['tokens']} tokens, {row['search_seconds'] / 60:.0f} minutes of wall time here)."
    )


def benchmark_summary() -> str:
    """One row per benchmark script with its headline figure, from each script's committed JSON."""
    sandbox = _load("sandbox_throughput.json")
    overhead = _load("trainer_overhead.json")
    annotation = _load("annotation_throughput.json")
    gsm8k = _load("gsm8k_step_conversion.json")
    backbone = _load("toy_backbone_cost.json")["sizes"]
    params = overhead["setup"]["parameters"] / 1e6
    rows = [
        [
            "`benchmarks/sandbox_throughput.py`",
            '`PythonSandbox.run_many` over 200 three-snippet arithmetic paths vs `subprocess.run([python, "-c", '
            "code])` per path, same run",
            f"{sandbox['run_many_exec_per_s']:g} exec/s vs {sandbox['naive_subprocess_exec_per_s']:g}/s: "
            f"**{sandbox['speedup_vs_naive']:g}×**; p50 latency {sandbox['run_many_latency_ms_p50']:.1f} ms; "
            f"{sandbox['run_many_cpu_ms_per_exec']:.1f} vs {sandbox['naive_cpu_ms_per_exec']:.0f} CPU ms per execution",
            "≥ 3×",
        ],
        [
            "`benchmarks/trainer_overhead.py`",
            f"`SVPOTrainer` (all terms) vs TRL `DPOTrainer` (sigmoid + sft), {params:.1f}M-parameter Llama, same "
            "batch, interleaved steps",
            f"median step time ratio **{overhead['ratio']['time']:.3f}** (CPU time {overhead['ratio']['cpu_time']:.3f}); "
            f"peak memory ratio **{overhead['ratio']['memory']:.3f}**",
            "≤ 1.10 / ≤ 1.05",
        ],
        [
            "`benchmarks/annotation_throughput.py`",
            "MCTS annotator tokens/s vs the backend's own batched `generate` on the same calls (paired replay), "
            f"{annotation['problems']} toy problems, tiny Llama",
            f"ratio {annotation['ratio']:.2f} (±25% noise); **{100 * annotation['overhead_share']:.1f}%** of wall "
            "time outside `generate`",
            "≥ 0.8 / ≤ 20%",
        ],
        [
            "`benchmarks/gsm8k_step_conversion.py`",
            f"share of the {gsm8k['problems']:,} GSM8K training problems `--convert_gsm8k` turns into step-format "
            "solutions, each run in the sandbox",
            f"**{gsm8k['converted']:,} ({100 * gsm8k['converted'] / gsm8k['problems']:.1f}%)**; "
            f"{gsm8k['code_steps_with_identical_output']:,} / {gsm8k['code_steps_run']:,} code steps print the "
            f"converted output; {gsm8k['solutions_whose_run_prints_the_gold']:,} / {gsm8k['converted']:,} reach "
            "the gold",
            "—",
        ],
        [
            "`benchmarks/toy_sft_calibration.py`",
            "greedy accuracy, pass@5 and mixed-outcome share of the stage-0 toy policy, per seed; with "
            "`--diagnostic N` the SBS oracle ceiling and the prior's ranking accuracy",
            "see [stage-0 calibration](results.md#stage-0-choosing-the-miniature)",
            "room for a ranker",
        ],
        [
            "`benchmarks/reproduce_tables.py`",
            "the paper's Table 3 and Table 5 at toy scale over seeds",
            "see [the reproduction](results.md#miniature-reproduction-of-tables-3-and-5)",
            "—",
        ],
        [
            "`benchmarks/value_lab.py`, `benchmarks/value_lab_scale.py`",
            "step rankers and value heads on frozen sibling groups; heads trained on on-policy siblings by size",
            "see [the value lab](value_lab.md)",
            "≥ 70% within-group, above the prior",
        ],
        [
            "`benchmarks/toy_backbone_cost.py`",
            "a training step and a generation batch of larger toy backbones, one CPU thread",
            f"256 × 4: **{backbone['256x4']['train_step_s'] / backbone['128x2']['train_step_s']:.1f}×** the "
            f"miniature's training step, {backbone['256x4']['generate_64x96_s'] / backbone['128x2']['generate_64x96_s']:.1f}× "
            "its generation",
            "a seed ≤ 60 CPU min",
        ],
    ]
    return markdown_table(["script", "what it measures", "result", "target"], rows)


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def vllm_figures() -> str:
    """The vLLM measurements on the CPU (docs/scaling.md), from the two vLLM results files."""
    scorers = _load("vllm_value_scorers_cpu.json")
    vllm, hf = scorers["scorers"]["vllm"], scorers["scorers"]["hf"]
    run = _load("annotation_throughput_vllm_cpu.json")
    return (
        f"- Value scorers, measured on the CPU (`benchmarks/results/vllm_value_scorers_cpu.md`, tiny Llama, "
        f"{scorers['texts']} prefixes of ~{scorers['mean_tokens_per_text']:.0f} tokens): `vllm` "
        f"{vllm['seconds_per_100_values']:.3f} s per 100 values vs `hf` {hf['seconds_per_100_values']:.3f} s, values "
        f"equal to {_sci(scorers['max_abs_difference'])}, but the second engine costs ~{vllm['startup_seconds']:.0f} s "
        f"to start and +{vllm['rss_added_mib'] / 1024:.1f} GiB.\n"
        f"- Annotation throughput on the CPU (`benchmarks/results/annotation_throughput_vllm_cpu.md`, untrained "
        f"0.5M-parameter Llama, {run['problems']} problems): {run['annotator_tokens_per_second']:.0f} tokens/s, "
        f"{run['ratio']:.2f} of raw per-call vLLM generation ({run['ratio_to_batch']:.2f} of one big raw batch), "
        f"{100 * run['prefix_cache_hit_rate']:.1f}% prefix-cache hit rate, {100 * run['overhead_share']:.1f}% of "
        "wall time outside generate."
    )


def value_lab(part: str) -> Callable[[], str]:
    """One of the value lab's tables (``rankers``, ``analysis``, ``sbs``) from benchmarks/results/value_lab.json."""

    def render() -> str:
        module = _benchmark_module("value_lab")
        results = _load("value_lab.json")
        renderers = {
            "rankers": module.render,
            "analysis": module.render_analysis,
            "sbs": module.render_sbs,
            "headline": module.render_headline,
        }
        return renderers[part](results)

    return render


def value_lab_scale(part: str) -> Callable[[], str]:
    """One of the lab's scale-test tables (docs/value_lab.md), from benchmarks/results/value_lab_scale.json."""

    def render() -> str:
        module = _benchmark_module("value_lab_scale")
        saved = _load("value_lab_scale.json")
        if part == "sbs":
            return module.render_sbs(saved, _load("reproduce_tables.json"))
        return {"sizes": module.render, "epochs": module.render_epochs}[part](saved)

    return render


BLOCKS: dict[str, Callable[[], str]] = {
    "value_lab_scale": value_lab_scale("sizes"),
    "value_lab_scale_epochs": value_lab_scale("epochs"),
    "value_lab_scale_sbs": value_lab_scale("sbs"),
    "value_lab_rankers": value_lab("rankers"),
    "value_lab_analysis": value_lab("analysis"),
    "value_lab_sbs": value_lab("sbs"),
    "value_lab_headline": value_lab("headline"),
    "demo": demo,
    "demo_run": demo_run,
    "demo_claims": demo_claims,
    "demo_variants": demo_variants,
    "demo_claims_seed0": demo_claims_seed0,
    "reproduce_headline": reproduce_headline,
    "reproduce_tables": reproduce_tables,
    "reproduce_targets": reproduce_targets,
    "gsm8k_conversion": gsm8k_conversion,
    "benchmark_summary": benchmark_summary,
    "vllm_figures": vllm_figures,
    "stage0_calibration": typed_table("toy_sft_calibration_diagnostic.json"),
    "real_model_sft_log": typed_table("real_model_stage0_sft_log.json"),
    "real_model_mcts": real_model_mcts,
    "label_quality": typed_table("label_quality_toy.json"),
    "demo_stage0_probes": typed_table("demo_stage0_probes.json"),
    "deepspeed_cpu": typed_table("deepspeed_cpu.json"),
}
MARKER = re.compile(r"<!-- ([a-z0-9_]+):begin -->\n(.*?)<!-- \1:end -->", re.DOTALL)


def blocks_in(text: str) -> list[tuple[str, str]]:
    """(name, content) of every rendered block of a page, in order."""
    return [(m.group(1), m.group(2).strip()) for m in MARKER.finditer(text)]


def render_text(text: str, path: str = "<text>") -> str:
    """``text`` with every block rendered again; an unknown block name is an error."""
    unknown = [name for name, _ in blocks_in(text) if name not in BLOCKS]
    if unknown:
        raise ValueError(f"{path}: no renderer for the blocks {unknown}; known: {sorted(BLOCKS)}")
    cache: dict[str, str] = {}

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in cache:
            cache[name] = BLOCKS[name]().strip()
        return f"<!-- {name}:begin -->\n{cache[name]}\n<!-- {name}:end -->"

    return MARKER.sub(replace, text)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing")
    args = parser.parse_args(argv)
    stale = []
    for path in [Path(f) for f in args.files] or pages():
        text = path.read_text()
        rendered = render_text(text, str(path))
        if rendered != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(rendered)
    verb = "stale" if args.check else "regenerated"
    print(f"{verb}: {', '.join(stale)}" if stale else "every rendered block is up to date")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
