"""Argument parsing for the recipes: TRL's `TrlParser`, with one YAML file per setting.

A setting (``recipes/configs/toy.yaml``) holds one section per pipeline stage (``sft``, ``annotate``,
``value_sft``, ``svpo``, ``dpo``, ``evaluate``) and optional top-level keys shared by every stage
(e.g. ``seed``). Each recipe reads its own section (``--section`` picks another, e.g. ``dpo`` for
``recipes/svpo.py``), so the same file drives a single stage
(``accelerate launch recipes/svpo.py --config recipes/configs/toy.yaml``) and the whole pipeline.
A flat YAML file without sections works as with plain TRL. Command-line flags override the file.

Mistakes in a setting (an unknown key, a value of the wrong type, a section that is not there) raise a
:class:`~svpo_trl.errors.UsageError` naming the file, the section and the key; :func:`run_recipe` prints
it as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from trl import TrlParser

from .errors import PathNotFoundError, UsageError

# Sections of a setting file: one per stage, and ``pipeline`` (read by the pipeline alone).
STAGES = ("sft", "annotate", "value_sft", "svpo", "dpo", "evaluate", "pipeline")

# Where the training arguments come from: their flags are listed after the library's own in --help.
_UPSTREAM_MODULES = ("transformers.", "trl.")


def load_setting(path: str) -> dict[str, Any]:
    """Read a setting YAML file; errors name the file (missing, not YAML, not a mapping)."""
    if not os.path.isfile(path):
        raise PathNotFoundError(f"--config: path does not exist: {path}")
    with open(path) as handle:
        try:
            setting = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(setting, dict):
        raise UsageError(f"{path}: expected a YAML mapping of stage sections, got {type(setting).__name__}")
    return setting


def apply_num_threads(setting: dict[str, Any], path: str) -> None:
    """``num_threads: N`` at the top of a setting file: torch's CPU threads for every stage.

    The order of a matmul's floating-point sums depends on how many threads share it, so on a CPU the thread
    count is part of what a run computes: the same seed with 1 and 2 threads trains different models. A
    setting that fixes it gives the same numbers on every machine with that many cores or more.
    """
    if "num_threads" not in setting:
        return
    threads = setting["num_threads"]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"{path}: num_threads must be a positive integer, got {threads!r}")
    import torch

    torch.set_num_threads(threads)


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value


def seed_setting(base: dict[str, Any], seed: int, root: str) -> dict[str, Any]:
    """The setting with every output under ``root`` (each path under ``pipeline.output_dir`` moved there) and
    every stage seeded with ``seed``: one seed of a setting, beside the others (the benchmarks over seeds)."""
    old = base.get("pipeline", {}).get("output_dir", "outputs/toy")
    setting = _relocate(base, old, root)
    setting["seed"] = seed
    return setting


def setting_sections(setting: dict[str, Any]) -> list[str]:
    """The stage sections a setting file has, in file order (empty for a flat TRL-style file)."""
    return [name for name in setting if name in STAGES]


def stage_section(setting: dict[str, Any], stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)``: the top-level keys shared by all stages, and the keys of ``stage``'s section.

    A setting without any stage section is a flat TRL-style file: all of it is the stage's own.
    """
    if not setting_sections(setting):
        return {}, {k: v for k, v in setting.items() if k != "env"}
    shared = {k: v for k, v in setting.items() if k not in STAGES and k != "env"}
    own = setting.get(stage) or {}
    if not isinstance(own, dict):
        raise UsageError(f"section '{stage}' must be a mapping, got {type(own).__name__}")
    return shared, own


class RecipeParser(TrlParser):
    """`TrlParser` whose ``--help`` lists this library's flags before the inherited training arguments.

    A recipe's own flags (script arguments, and the fields an svpo_trl config declares or re-declares with
    the paper's defaults) go into one group; the hundreds of transformers/TRL ``TrainingArguments`` follow in
    a second group.
    """

    def __init__(self, dataclass_types: Iterable[type], **kwargs: Any):
        self._own_group: argparse._ArgumentGroup | None = None
        self._upstream_group: argparse._ArgumentGroup | None = None
        super().__init__(list(dataclass_types), **kwargs)

    def _group(self, upstream: bool) -> argparse._ArgumentGroup:
        if self._own_group is None:
            self._own_group = self.add_argument_group("svpo_trl arguments of this recipe")
        if upstream and self._upstream_group is None:
            self._upstream_group = self.add_argument_group(
                "training arguments (transformers TrainingArguments / TRL)"
            )
        return self._upstream_group if upstream else self._own_group

    def _add_dataclass_arguments(self, dtype: type) -> None:
        from typing import get_type_hints

        type_hints = get_type_hints(dtype)
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        upstream = {f.name for f in fields if _declared_upstream(dtype, f.name)}
        for is_upstream in (False, True):
            for field in fields:
                if (field.name in upstream) == is_upstream:
                    field.type = type_hints[field.name]
                    self._parse_dataclass_field(self._group(is_upstream), field)


def _declared_upstream(dtype: type, name: str) -> bool:
    """Whether the most derived class that declares field ``name`` comes from transformers or TRL."""
    for cls in dtype.__mro__:
        if name in inspect.get_annotations(cls):
            return cls.__module__.startswith(_UPSTREAM_MODULES)
    return False


def _split_config_flags(args: list[str]) -> tuple[str | None, str | None, list[str]]:
    """``--config``/``--section`` (also ``--config=FILE``) taken out of ``args``: (config, section, rest)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--section")
    known, rest = pre.parse_known_args(args)
    return known.config, known.section, rest


def _describe_type(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(repr(c) for c in action.choices)
    name = getattr(action.type, "__name__", str(action.type))
    kind = {"string_to_bool": "a boolean (true/false)", "int": "an integer", "float": "a number"}.get(
        name, name
    )
    return f"a list of {kind.removeprefix('a ').removeprefix('an ')}s" if action.nargs == "+" else kind


def _coerce(action: argparse.Action, value: Any) -> Any:
    """``value`` converted as the command line would convert it; ValueError when it cannot be."""
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(action, item) for item in items]
    return _coerce_one(action, value)


def _coerce_one(action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    name = getattr(action.type, "__name__", "")
    if isinstance(value, str) and action.type is not None:
        value = action.type(value)
    elif (isinstance(value, bool) and name in ("int", "float")) or (
        name == "int" and not isinstance(value, int)
    ):
        raise ValueError(value)
    elif name == "float":
        if not isinstance(value, int | float):
            raise ValueError(value)
        value = float(value)
    elif name == "string_to_bool" and not isinstance(value, bool):
        raise ValueError(value)
    if action.choices and value not in action.choices:
        raise ValueError(value)
    return value


def _apply_setting(parser: RecipeParser, values: dict[str, Any], path: str, section: str) -> None:
    """Set the parser's defaults from a section; unknown keys and ill-typed values name file and key."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        # The first action of a dest is the field itself; a bool's --no_<name> complement comes after it.
        actions.setdefault(action.dest, action)
    unknown = [key for key in values if key not in actions]
    if unknown:
        raise UsageError(
            f"{path}: unknown keys for stage '{section}': {['--' + k for k in unknown]} — remove them or fix "
            "their names"
        )
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _coerce(actions[key], value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise UsageError(
                f"{path}: section '{section}', key '{key}': expected {_describe_type(actions[key])}, got {value!r}"
            ) from error
    parser.set_defaults_with_config(**checked)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The recipe's docstring as written, and every flag's default."""


def build_parser(dataclass_types: Iterable[type], description: str | None = None) -> RecipeParser:
    """The parser of a recipe: its dataclasses' flags plus ``--config`` and ``--section``."""
    parser = RecipeParser(
        dataclass_types,
        description=description,
        formatter_class=_HelpFormatter,
        # argparse would list every flag here, hundreds of TrainingArguments included
        usage="%(prog)s [--config FILE] [--section NAME] [--FLAG VALUE ...]",
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="setting YAML with a section per stage (recipes/configs/toy.yaml); command-line flags override it",
    )
    parser.add_argument(
        "--section",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="which section of --config to read (default: this recipe's stage, e.g. dpo for recipes/svpo.py)",
    )
    return parser


def parse_stage_args(
    stage: str,
    dataclass_types: Iterable[type],
    args: list[str] | None = None,
    *,
    description: str | None = None,
) -> tuple:
    """Parse ``--config setting.yaml`` (the ``stage`` section, or ``--section NAME``) plus CLI overrides.

    Unknown keys in the section, values of the wrong type and a ``--section`` the file does not have raise a
    :class:`~svpo_trl.errors.UsageError` naming the file and the key or the sections there are.
    """
    args = list(sys.argv[1:] if args is None else args)
    config, section, args = _split_config_flags(args)
    parser = build_parser(dataclass_types, description)
    if config is not None:
        setting = load_setting(config)
        sections = setting_sections(setting)
        if section is not None and section not in sections:
            found = ", ".join(sections) if sections else "none (a flat file)"
            raise UsageError(f"--section {section}: {config} has no such section; its sections: {found}")
        section = section or stage
        for key, value in (setting.get("env") or {}).items():
            os.environ[key] = str(value)
        apply_num_threads(setting, config)
        shared, own = stage_section(setting, section)
        known = {action.dest for action in parser._actions}
        # Shared keys go to the stages that have such a field; a stage's own keys must all be known.
        shared = {k: v for k, v in shared.items() if k in known}
        _apply_setting(parser, {**shared, **own}, config, section)
    elif section is not None:
        raise UsageError(f"--section {section}: no --config file to read it from")
    *parsed, unknown = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see --help for this recipe's flags)")
    return tuple(parsed)


def run_recipe(main: Callable[[], Any]) -> Any:
    """Run a recipe's ``main``: a :class:`~svpo_trl.errors.UsageError` ends it with one line on stderr
    (exit status 2) instead of a traceback. ``SVPO_TRL_TRACEBACK=1`` shows the traceback too."""
    try:
        return main()
    except UsageError as error:
        if os.environ.get("SVPO_TRL_TRACEBACK"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
