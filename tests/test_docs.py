"""README.md and docs/*.md stay true: code blocks run, figures are rendered from committed results, links resolve.

- every ``python`` block runs (a page's blocks in order, one namespace, in a directory that holds what the
  pages assume after ``make demo``); ``<!-- docs-test: needs-module M -->`` / ``needs-path P`` before a block
  skips it where M or P is absent;
- every ``bash`` block parses (``bash -n``) and names files, make targets, extras and flags that exist;
- every ``<!-- NAME:begin -->`` block is what ``benchmarks/render_docs.py`` renders from benchmarks/results/;
- every relative link names a file that exists and, with an anchor, a heading of that file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GUIDE = sorted((ROOT / "docs").glob("*.md"))


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@pytest.fixture(scope="module")
def render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- parsing
@dataclass
class CodeBlock:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None  # the <!-- docs-test: ... --> comment right before the block


FENCE = re.compile(r"^(```+)\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.+?)\s*-->$")


def code_blocks(path: Path) -> list[CodeBlock]:
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start = match.group(1), match.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        previous = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        directive = DIRECTIVE.match(previous)
        blocks.append(
            CodeBlock(path, start + 1, lang, "\n".join(body), directive.group(1) if directive else None)
        )
        i += 1
    return blocks


def _outside_code(text: str) -> list[str]:
    """The page's lines that are not inside a fenced block."""
    kept, fence = [], None
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            kept.append(line)
    return kept


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _outside_code(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(path: Path) -> list[str]:
    """Every relative link of ``path`` whose file is missing or whose anchor is no heading of that file."""
    problems = []
    text = "\n".join(_outside_code(path.read_text()))
    for match in LINK.finditer(re.sub(r"`[^`\n]*`", "", text)):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{_page_id(path)}: link to {target}: {file_part} does not exist")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{_page_id(path)}: link to {target}: no heading with the anchor #{anchor}")
    return problems


# ---------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_the_link_check_fails_on_a_broken_link_or_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Stage 0: choosing (`x.py`) — now\n")
    page = tmp_path / "b.md"
    page.write_text(
        "# B\n\n[fine](a.md#stage-0-choosing-xpy--now) [self](#b) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](a.md#nowhere)\n\n```bash\n# [not a link](nothing.md)\n```\n"
    )
    assert [problem.split(": ", 1)[1] for problem in broken_links(page)] == [
        "link to missing.md: missing.md does not exist",
        "link to a.md#nowhere: no heading with the anchor #nowhere",
    ]


def test_github_slugs():
    assert github_slug(
        "Stage 0 for a small real model: SmolLM2-135M (`benchmarks/real_model_stage0.py`)"
    ) == ("stage-0-for-a-small-real-model-smollm2-135m-benchmarksreal_model_stage0py")
    assert github_slug("SVPO training (`SVPOTrainer`, Eq. 8–10)") == "svpo-training-svpotrainer-eq-810"
    assert (
        github_slug("The GPU recipe (the paper's setting) — untested")
        == "the-gpu-recipe-the-papers-setting--untested"
    )


# ---------------------------------------------------------------------------- structure
def test_readme_is_short_and_links_every_guide_page():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 250, "the README is for a five-minute read: move detail to docs/"
    for page in GUIDE:
        assert f"](docs/{page.name}" in readme, f"the README does not link {page.name}"
    for section in (
        "## Quickstart",
        "## What the demo prints",
        "## The pipeline at a glance",
        "## The guide",
    ):
        assert section in readme


@pytest.mark.parametrize("page", GUIDE, ids=_page_id)
def test_every_guide_page_says_what_it_is_for_and_links_back(page):
    head = page.read_text().split("\n")[:12]
    assert head[0].startswith("# "), f"{page.name} opens with its title"
    assert head[2].strip() and not head[2].startswith("#"), (
        f"{page.name}: a sentence of what it is for follows"
    )
    assert any("](../README.md)" in line for line in head), f"{page.name} links back to the README"
    if page.name != "README.md":
        assert f"]({page.name}" in (ROOT / "docs" / "README.md").read_text(), (
            f"the guide index lists {page.name}"
        )


# ---------------------------------------------------------------------------- rendered figures
@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_rendered_blocks_are_what_the_committed_results_render(page, render_docs):
    text = page.read_text()
    for name, content in render_docs.blocks_in(text):
        expected = render_docs.BLOCKS[name]().strip()
        assert content == expected, (
            f"{_page_id(page)}: the {name} block is stale: run python benchmarks/render_docs.py"
        )


def test_the_pages_hold_the_blocks_they_promise(render_docs):
    readme = {name for name, _ in render_docs.blocks_in((ROOT / "README.md").read_text())}
    assert {"demo", "demo_claims_seed0", "reproduce_headline"} <= readme
    results = {name for name, _ in render_docs.blocks_in((ROOT / "docs" / "results.md").read_text())}
    assert {
        "demo",
        "demo_run",
        "demo_claims",
        "reproduce_tables",
        "stage0_calibration",
        "benchmark_summary",
    } <= results
    used = set()
    for page in PAGES:
        used |= {name for name, _ in render_docs.blocks_in(page.read_text())}
    assert used == set(render_docs.BLOCKS), f"renderers no page uses: {set(render_docs.BLOCKS) - used}"


def test_the_demo_table_follows_its_results_file(render_docs, tmp_path, monkeypatch):
    """Another seed in demo.json moves the table's mean and range: the file, not the page, is edited."""
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    first = data["seeds"]["0"]
    second = json.loads(json.dumps(first))
    for row in second["rows"]:
        row["accuracy"] = round(row["accuracy"] + 2.0, 1)
    data["seeds"] = {"0": first, "1": second}
    (tmp_path / "demo.json").write_text(json.dumps(data))
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    table = render_docs.demo()
    a = first["rows"][0]["accuracy"]
    expected = f"| SFT | greedy | {a + 1:.1f} ({a:.1f}–{a + 2:.1f}) | {a:.1f}, {a + 2:.1f} |"
    assert "Seeds 0, 1 of `make demo`" in table and expected in table, table
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- demo:begin -->\nold\n<!-- demo:end -->\ny\n")
    assert render_docs.main([str(page), "--check"]) == 1 and "old" in page.read_text()
    assert render_docs.main([str(page)]) == 0 and expected in page.read_text()
    assert render_docs.main([str(page), "--check"]) == 0


def test_the_demo_claims_are_recomputed_from_the_per_problem_results(render_docs):
    """The README's paired lines are what the claims module computes from demo.json's 0/1 lists, and each
    line's two accuracies are those of the rows it names."""
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    block = render_docs.demo_claims_seed0()
    rows = {f"{r['system']}/{r['decoding']}": r["accuracy"] for r in data["seeds"]["0"]["rows"]}
    assert len(data["claims"]) >= 3
    for claim, line in zip(data["claims"], block.splitlines()[2:]):
        assert line.startswith(f"  - {claim['claim']}: ")
        from svpo_trl.evaluation import Strategy

        first = rows[f"{claim['first'][0]}/{Strategy.parse(claim['first'][1]).label}"]
        second = rows[f"{claim['second'][0]}/{Strategy.parse(claim['second'][1]).label}"]
        assert f": {first:.1f} vs {second:.1f}, " in line, line


def test_intervals_quoted_in_the_reading_are_those_of_the_rendered_tables(render_docs):
    """The reading of the reproduction quotes intervals in prose: each must be one the tables render."""
    text = (ROOT / "docs" / "results.md").read_text()
    prose = render_docs.MARKER.sub("", text).replace("−", "-")
    rendered = render_docs.reproduce_tables().replace("−", "-")
    quoted = re.findall(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", prose)
    assert quoted, "the reading quotes no interval: is this test still looking at the right page?"
    assert [q for q in quoted if q not in rendered] == []


def test_an_unknown_block_is_named(render_docs):
    with pytest.raises(ValueError, match="no renderer for the blocks \\['nope'\\]"):
        render_docs.render_text("<!-- nope:begin -->\nx\n<!-- nope:end -->\n", "p.md")


# ---------------------------------------------------------------------------- python blocks
def _python_pages() -> list[Path]:
    return [page for page in PAGES if any(b.lang == "python" for b in code_blocks(page))]


def _stops_at_once(model):
    """``model`` rewired to end every step with EOS at once, so that the pages' search and evaluation examples
    run in seconds (an untrained model writes 256 random tokens a step): dimension 0 of the residual stream is a
    positive constant (embeddings 10 there, no layer writes to it), the final norm keeps only it, and the LM head
    reads it into the EOS logit alone."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[model.config.eos_token_id, 0] = 10.0
    return model


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory):
    """What the pages assume after `make demo`, in small: outputs/toy/svpo and value_sft (a checkpoint with a
    trained-looking value head) and outputs/toy/annotation (a few annotated toy questions), plus ../shared where it exists."""
    import torch

    from svpo_trl import MCTSAnnotator, MCTSConfig, ValueHeadForCausalLM
    from svpo_trl.data import load_problems
    from svpo_trl.search.testing import ScriptedBackend
    from svpo_trl.steps import DEFAULT_FORMAT as FORMAT
    from svpo_trl.toy import tiny_llama
    from svpo_trl.toy.task import build_toy_tokenizer

    base = tmp_path_factory.mktemp("docs")
    work = base / "work"
    (work / "outputs" / "toy").mkdir(parents=True)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (base / "shared").symlink_to(shared)
    tokenizer = build_toy_tokenizer()
    model = ValueHeadForCausalLM.from_causal_lm(_stops_at_once(tiny_llama(tokenizer, seed=0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.v_head.weight.copy_(torch.randn(model.v_head.weight.shape, generator=generator) * 0.5)
    for stage in ("svpo", "value_sft"):  # value_sft: the reference policy of sbs(1,5,reference)
        model.save_pretrained(work / "outputs" / "toy" / stage)
        tokenizer.save_pretrained(work / "outputs" / "toy" / stage)
    # A scripted policy (one right and one wrong answer step per question) gives every tree a pair to draw.
    problems = list(load_problems("toy", split="annotate").select(range(4)))
    gold = {row["question"]: row["answer"] for row in problems}

    def script(prompt: str):
        question = re.match(r"<question>(.*?)</question>", prompt, re.DOTALL).group(1)
        right = FORMAT.render_answer_step("Right.", gold[question])
        return [(right, 0.6), (FORMAT.render_answer_step("Wrong.", str(int(gold[question]) + 1)), 0.4)]

    config = MCTSConfig(
        output_dir=str(work / "outputs" / "toy" / "annotation"), max_simulations=4, max_trees=1
    )
    MCTSAnnotator(ScriptedBackend(script), config).annotate(problems)
    return work


def _skip_reason(block: CodeBlock, work: Path) -> str | None:
    if block.directive is None:
        return None
    kind, _, value = block.directive.partition(" ")
    if kind == "needs-module":
        return None if importlib.util.find_spec(value) else f"needs the module {value}"
    if kind == "needs-path":
        return None if (work / value).exists() else f"needs the path {value}"
    raise AssertionError(
        f"{_page_id(block.page)}:{block.line}: unknown docs-test directive {block.directive!r}"
    )


@pytest.mark.parametrize("page", _python_pages(), ids=_page_id)
def test_python_blocks_run(page, demo_outputs, monkeypatch, capsys):
    work = demo_outputs.parent / f"run-{page.parent.name}-{page.stem}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo_outputs, work, symlinks=True)
    monkeypatch.chdir(work)
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    for block in code_blocks(page):
        if block.lang != "python":
            continue
        reason = _skip_reason(block, work)
        if reason:
            skipped.append(f"line {block.line}: {reason}")
            continue
        try:
            exec(compile(block.code, f"{_page_id(page)}:{block.line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{_page_id(page)}, the python block at line {block.line} fails: {error!r}"
            ) from error
    if skipped:
        with capsys.disabled():
            print(f"\n[docs] {_page_id(page)}: skipped {'; '.join(skipped)}")


def test_every_directive_is_known():
    for page in PAGES:
        for block in code_blocks(page):
            if block.directive:
                kind = block.directive.partition(" ")[0]
                assert kind in ("needs-module", "needs-path"), (page, block.line, block.directive)
    for page in PAGES:
        for block in code_blocks(page):
            assert block.lang in ("python", "bash", "text", "yaml"), (
                f"{_page_id(page)}:{block.line}: a code block is python, bash, yaml or text (output), "
                f"not {block.lang!r}"
            )


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_yaml_blocks_are_settings_the_runner_takes(page):
    """A YAML block is a piece of a setting file: it parses, and the claims it shows are well-formed."""
    from svpo_trl.pipeline.claims import claim_lines

    for block in code_blocks(page):
        if block.lang != "yaml":
            continue
        setting = yaml.safe_load(block.code)
        assert isinstance(setting, dict), f"{_page_id(page)}:{block.line}: not a YAML mapping"
        claims = (setting.get("pipeline") or {}).get("claims") or []
        rows = {}
        for claim in claims:
            for side in (claim["first"], claim["second"]):
                from svpo_trl.evaluation import Strategy

                rows[f"{side[0]}/{Strategy.parse(side[1]).label}"] = [1, 0]
        assert len(claim_lines(rows, claims)) == len(claims)


# ---------------------------------------------------------------------------- bash blocks
def _recipe_flags() -> dict[str, set[str]]:
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

    types = {
        "recipes/sft.py": [SFTScriptArguments, SFTConfig],
        "recipes/annotate.py": [AnnotateScriptArguments, MCTSConfig],
        "recipes/value_sft.py": [TrainScriptArguments, ValueSFTConfig],
        "recipes/svpo.py": [SVPOScriptArguments, SVPOConfig],
        "recipes/evaluate.py": [EvaluateArguments],
    }
    return {
        script: {"config", "section", "help"} | {f.name for t in classes for f in dataclasses.fields(t)}
        for script, classes in types.items()
    }


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "2>&1", "(", ")", ";;"}
REPO_PREFIXES = ("recipes/", "benchmarks/", "accelerate_configs/", "docs/", "tests/", ".ci/", "src/")


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block, as token lists (comments dropped, operators split off)."""
    code = code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in code.split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in OPERATORS or set(token) <= set(";&|<>()"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def bash_problems(block: CodeBlock, recipe_flags: dict[str, set[str]]) -> list[str]:
    where = f"{_page_id(block.page)}:{block.line}"
    problems = []
    syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    if syntax.returncode:
        problems.append(f"{where}: bash -n: {syntax.stderr.strip()}")
    targets, extras = _make_targets(), _extras()
    for tokens in _commands(block.code):
        while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value before the command
            tokens = tokens[1:]
        if not tokens:
            continue
        for token in tokens:
            path = token.split("=", 1)[-1]
            if path.startswith(REPO_PREFIXES) and not (ROOT / path).exists() and "*" not in path:
                problems.append(f"{where}: {path} does not exist")
        if tokens[0] == "make":
            problems += [
                f"{where}: no make target {t}" for t in tokens[1:] if "=" not in t and t not in targets
            ]
        if tokens[:2] == ["pip", "install"]:
            for token in tokens:
                for extra in re.findall(r"\[([^\]]+)\]", token):
                    problems += [f"{where}: no extra {e}" for e in extra.split(",") if e not in extras]
        scripts = [
            i for i, t in enumerate(tokens) if t.endswith(".py") and t.startswith(("recipes/", "benchmarks/"))
        ]
        if not scripts:
            continue
        script = tokens[scripts[0]]
        flags = {t[2:].split("=", 1)[0] for t in tokens[scripts[0] + 1 :] if t.startswith("--")}
        if script in recipe_flags:
            unknown = {f for f in flags if f.replace("-", "_") not in recipe_flags[script]}
        elif (ROOT / script).exists():
            source = (ROOT / script).read_text()
            unknown = {
                f for f in flags if f"--{f}" not in source and f"--{f.replace('_', '-')}" not in source
            }
        else:
            unknown = set()
        problems += [f"{where}: {script} has no flag --{f}" for f in sorted(unknown)]
    return problems


def test_bash_blocks_name_what_exists():
    recipe_flags = _recipe_flags()
    problems = []
    for page in PAGES:
        for block in code_blocks(page):
            if block.lang == "bash":
                problems += bash_problems(block, recipe_flags)
    assert problems == []


def test_the_bash_check_catches_a_wrong_flag_file_and_target(tmp_path):
    page = tmp_path / "p.md"
    code = (
        "python recipes/evaluate.py --model_name_or_path x --no_such_flag 1\n"
        "accelerate launch --config_file accelerate_configs/nowhere.yaml recipes/svpo.py --recipe dpo\n"
        "make not-a-target\n"
        'pip install -e ".[vllm,nonsense]"\n'
        "python benchmarks/reproduce_tables.py --seeds 0 --fictional\n"
    )
    problems = bash_problems(CodeBlock(page, 1, "bash", code, None), _recipe_flags())
    assert [p.split(": ", 1)[1] for p in problems] == [
        "recipes/evaluate.py has no flag --no_such_flag",
        "accelerate_configs/nowhere.yaml does not exist",
        "no make target not-a-target",
        "no extra nonsense",
        "benchmarks/reproduce_tables.py has no flag --fictional",
    ]


# ---------------------------------------------------------------------------- make help
def test_make_help_lists_every_target_with_one_line():
    makefile = (ROOT / "Makefile").read_text()
    undocumented = [
        t for t in _make_targets() if not re.search(rf"^{re.escape(t)}:[^\n]*## \S", makefile, re.MULTILINE)
    ]
    assert undocumented == [], f"targets without a '## what it does' comment: {undocumented}"
    if shutil.which("make"):
        out = subprocess.run(
            ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        listed = {line.split()[0] for line in out.strip().split("\n")}
        assert listed == _make_targets()
