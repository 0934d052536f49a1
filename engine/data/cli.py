"""``keel data ...`` sub-commands: validate, convert and write synthetic data sets.

:func:`register` adds the sub-commands to an argparse sub-parsers object; each handler
is ``func(args) -> int`` (0 = success). This module is the data layer's console: it
prints for the user; the library modules only log.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from engine.algorithms.dpo_reference import register as register_ref_logprobs
from engine.data.convert import CONVERTERS, convert_file
from engine.data.errors import HINT, DataError
from engine.data.loaders import write_jsonl
from engine.data.schemas import FORMATS
from engine.data.synthetic import BUILTIN, SPLITS, UNSPLIT, builtin_format, builtin_rows
from engine.data.validate import validate_file
from engine.eval.label import register as register_label

TEMPLATE_CHOICES = ("auto", "plain", "llama3", "chatml", "nemotron")
SYNTH_NAMES = tuple(name.split(":", 1)[1] for name in BUILTIN)


def _print_summary(summary: dict[str, Any], remedy: Callable[[str], str]) -> None:
    print(f"{summary['source']}: {summary['valid']} valid of {summary['rows']} rows "
          f"({summary['skipped']} bad), format={summary['format']}, template={summary['template']}")
    print(f"tokens: {summary['tokens']} total, mean {summary['mean_length']:.1f}, max {summary['max_length']} "
          f"(seq_length {summary['seq_length']}); over-long rows: {summary['overlong']}, "
          f"prompt fills the sequence: {summary['prompt_too_long']}")
    if summary["overlong_policy"] != "none" and summary["overlong"]:
        sft = summary["format"] in ("chat", "text")
        cut = "truncated to seq_length+1" if sft else "with their prompt cut from the left"
        room = "no loss token left" if sft else "a response that does not fit"
        print(f"training (data.overlong={summary['overlong_policy']}): keeps {summary['cut']} over-long rows {cut}; "
              f"drops {summary['dropped_by_policy']} by the policy, {summary['dropped_no_room']} with {room} "
              "(a problem)")
        if summary["valid"] and summary["dropped_by_policy"] >= summary["valid"]:
            print("every row is dropped: training refuses a source with none left (raise --seq-length, or "
                  "keep over-long rows cut)")
    print("length histogram:")
    for bucket, count in summary["histogram"].items():
        print(f"  {bucket:>12}: {count}")
    for problem in summary["problems"]:
        print(f"problem: {problem}")
    for fmt, count in summary["looks_like"].items():  # the hint a raised error carries, once for all such rows
        print(f"{count} bad row{'s have' if count > 1 else ' has'} the fields of {fmt} rows: {remedy(fmt)}")
    print("OK" if summary["ok"] else "PROBLEMS FOUND")


VALIDATE_DEFAULTS = {"tokenizer": "byte", "seq_length": 128, "template": "auto"}  # keel train sft's
VALIDATE_FROM_RUN = {"format": "format", "tokenizer": "tokenizer", "seq_length": "seq_length", "template": "chat_template",
                     "overlong": "overlong"}


def algorithm_of_run(path: str, tree: dict[str, Any], named: str = "--config ") -> str:
    """The ``keel train`` algorithm whose config has every section of ``tree`` and the fewest others; errors
    call the file ``named`` + ``path``."""
    import dataclasses

    from engine.cli import ALGORITHMS, _algorithm

    sections = {name: {f.name for f in dataclasses.fields(_algorithm(name).CONFIG)} for name in ALGORITHMS}
    fitting = sorted((len(fields), name) for name, fields in sections.items() if set(tree) <= fields)
    if not fitting:
        raise ValueError(f"{named}{path}: no keel train algorithm has all of its sections {sorted(tree)}")
    if len(fitting) > 1 and fitting[0][0] == fitting[1][0]:
        tied = [name for size, name in fitting if size == fitting[0][0]]
        raise ValueError(f"{named}{path} suits {', '.join(tied)}: say which with --algorithm")
    return fitting[0][1]


def run_config(path: str, algorithm: str | None, overrides: Sequence[str] = (), named: str = "--config ") -> Any:
    """The config run file ``path`` trains with: the algorithm's defaults (``algorithm``, else guessed from the
    file's sections), the file's values and ``overrides``, and the tokenizer and template its ``checkpoint.load``
    carries (:func:`engine.config.load_config`). Errors call the file ``named`` + ``path``."""
    import yaml

    from engine.cli import _algorithm
    from engine.config import load_config

    try:
        tree = yaml.safe_load(open(path).read()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{named}{path}: cannot read it: {exc}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{named}{path}: the top level must be a mapping of sections")
    cls = _algorithm(algorithm or algorithm_of_run(path, tree, named)).CONFIG
    return load_config(cls, path, list(overrides))  # ConfigError


def settings_of_run(config: Any) -> dict[str, Any]:
    """The ``data.*`` settings that a run's ``config`` (:func:`run_config`) trains with, by option name; the
    format is ``prompts`` for the runs that sample (online RL, iterative): they read ``rollout.prompts``."""
    settings = {option: getattr(config.data, key) for option, key in VALIDATE_FROM_RUN.items()}
    if hasattr(config, "rollout"):
        settings["format"] = "prompts"
    return settings


def check_run_rewards(args: argparse.Namespace) -> None:
    """A prompt file checked against ``--config``'s run (``args.run``, read by :func:`_validate_settings`): the
    run's reward functions can judge its rows (:func:`engine.rewards.config.check_judged`; :class:`DataError`
    when one can judge none, or some under the run's ``data.on_error=raise``)."""
    functions = getattr(args.run, "reward_functions", None) or []
    if not args.config or not functions or args.format != "prompts":  # an --algorithm's defaults name no rewards
        return
    args.run.check_named_code()  # each function imports and takes the run's call (a ConfigError is a ValueError)
    from engine.data.prompts import load_prompts
    from engine.rewards.config import check_judged

    check_judged(functions, load_prompts(args.source, args.num, args.seed), args.run.data.on_error)


def _validate_settings(args: argparse.Namespace) -> None:
    """Fill the options the user left out: from ``--config``'s run (kept as ``args.run``), else the built-in
    defaults."""
    if args.overrides and not args.config:
        raise ValueError(f"overrides {' '.join(args.overrides)} apply to a run: give its --config (the options "
                         "above set the data settings without one)")
    if args.config:
        args.run = run_config(args.config, args.algorithm, args.overrides)
    elif args.algorithm:  # the algorithm's defaults: an RL run's prompts format, its tokenizer and length
        from engine.cli import _algorithm

        args.run = _algorithm(args.algorithm).CONFIG()
    else:
        args.run = None
    run = settings_of_run(args.run) if args.run is not None else {}
    for option in VALIDATE_FROM_RUN:
        if getattr(args, option) is None:
            setattr(args, option, run.get(option, VALIDATE_DEFAULTS.get(option)))
    if args.format is None:
        args.format = builtin_format(args.source) if args.source.startswith("builtin:") else "chat"


def _with_option_hint(error: Exception, other_format: Optional[Callable[[str], str]] = None) -> Exception:
    """A bad row's hint names these commands' options, not the training config's: ``--on-error skip`` for
    ``data.on_error``, and ``other_format(format)`` for a row with another format's fields (whose hint would
    say ``set data.format=...``)."""
    if not isinstance(error, DataError):
        return error
    if error.looks_like and other_format is not None:
        return error.with_hint(other_format(error.looks_like))
    if str(error).endswith(f"({HINT})"):
        return error.with_hint("fix the row, or pass --on-error skip to drop bad rows")
    return error


# what the commands that read one row format read, in words
READS = {"attributes": "HelpSteer attribute rows (prompt, response and its ratings)",
         "helpsteer2_preference": "HelpSteer2-Preference rows (prompt, response_1, response_2, preference_strength)"}
CONVERTS_TO = {"helpsteer2-dpo": "pairs", "helpsteer2-preference-bt": "pairs", "steerlm": "chat"}


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        _validate_settings(args)
    except ValueError as error:
        print(f"error: {error}")
        return 1
    fmt = args.format
    try:
        summary = validate_file(args.source, fmt, args.tokenizer, args.seq_length, template=args.template,
                                on_error=args.on_error, num=args.num, seed=args.seed, overlong=args.overlong)
        if summary["ok"]:
            check_run_rewards(args)
    except (DataError, ValueError) as error:  # with --config the format is the run's data.format, as the hint says
        print(f"error: {_with_option_hint(error, None if args.config else _pass_format)}")
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, _set_format(args.run) if args.config else _format_option)
    return 0 if summary["ok"] else 1


def _pass_format(fmt: str) -> str:
    return f"the row has the fields of {fmt} rows: {_format_option(fmt)}"


def _format_option(fmt: str) -> str:
    return f"pass --format {fmt}"


def _set_format(run: Any) -> Callable[[str], str]:
    """The remedy for rows of format ``fmt`` under ``--config``'s run: set it, where the run trains on it."""
    formats = run.data_formats()

    def remedy(fmt: str) -> str:
        if fmt in formats:
            return f"set data.format={fmt} in the run's config"
        return f"this run does not train on them; it reads data.format {' or '.join(map(repr, formats))}"
    return remedy


def _convert(kind: str) -> Any:
    def other_format(fmt: str) -> str:
        done = f"; {fmt} rows need no conversion: train on them as they are" if fmt == CONVERTS_TO[kind] else ""
        return f"the row has the fields of {fmt} rows, and convert-{kind} reads {READS[CONVERTERS[kind][0]]}{done}"

    def run(args: argparse.Namespace) -> int:
        try:
            counts = convert_file(kind, args.input, args.output, on_error=args.on_error)
        except (DataError, ValueError) as error:
            print(f"error: {_with_option_hint(error, other_format)}")
            return 1
        print(f"wrote {counts['written']} rows to {args.output}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        if not counts["written"]:  # an empty output trains nothing: a failure, whatever the reason counted above
            print(f"error: no row of {args.input} made a {CONVERTS_TO[kind]} row (the counts above say why; "
                  f"keel data validate {args.input} --format {CONVERTERS[kind][0]} checks its rows)")
            return 1
        return 0

    return run


def cmd_synth(args: argparse.Namespace) -> int:
    name = args.name if args.name.startswith("builtin:") else f"builtin:{args.name}"
    if args.split != "train" and name in UNSPLIT:
        split = ", ".join(b.split(":", 1)[1] for b in BUILTIN if b not in UNSPLIT)
        print(f"keel: --split {args.split}: {args.name} has no splits (its rows draw on one word list); the sets "
              f"with {'/'.join(SPLITS)} splits are {split}", file=sys.stderr)
        return 1
    if args.split != "train":
        name = f"{name}:{args.split}"
    if args.num < 1:
        print(f"keel: --num {args.num}: give the number of rows to write (>= 1)", file=sys.stderr)
        return 1
    count = write_jsonl(builtin_rows(name, args.num, args.seed), args.output)
    print(f"wrote {count} synthetic {builtin_format(name)} rows ({name}, seed {args.seed}) to {args.output}")
    return 0


def _diverging_reads(fmt: str) -> str:
    return (f"the row has the fields of {fmt} rows, and diverging reads pairs or helpsteer2_preference rows (a "
            "preference with its annotators' own ratings)")


def cmd_diverging(args: argparse.Namespace) -> int:
    from engine.data.loaders import iter_records, load_rows
    from engine.eval.diverging import describe_rule, list_diverging

    try:
        fmt = args.format
        if fmt == "auto":
            first = next((raw for _, raw in iter_records(args.source)), None)
            fmt = "helpsteer2_preference" if isinstance(first, dict) and "response_1" in first else "pairs"
        rows, counts = list_diverging(load_rows(args.source, fmt, on_error=args.on_error), args.threshold)
    except (DataError, ValueError) as error:
        print(f"error: {_with_option_hint(error, _diverging_reads)}")
        return 1
    share = counts["diverging"] / counts["with_annotators"] if counts["with_annotators"] else 0.0
    print(f"{args.source} ({fmt}): {counts['rows']} rows, {counts['with_annotators']} with annotators: "
          f"{counts['unanimous']} unanimous, {counts['diverging']} diverging ({100 * share:.1f}%; "
          f"{counts['direction']} disagree on the direction, {counts['spread_only']} by spread only)")
    print(describe_rule(args.threshold))
    if args.out:
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} diverging rows to {args.out}")
    return 0


def _add_convert(subparsers: Any, name: str, kind: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("input", help="input .jsonl/.json/.parquet file or hf:<org>/<name>[/<dir>][:<split>]")
    parser.add_argument("output", help="output .jsonl file")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad input rows")
    parser.set_defaults(func=_convert(kind))


def _add_validate(subparsers: Any) -> None:
    from engine.cli import ALGORITHMS

    validate = subparsers.add_parser("validate", help="check every row of a data file and report lengths",
                                     description="Validate and tokenise every row; exit 1 if anything is wrong.")
    validate.add_argument("source", help="data file, hf:<org>/<name> or builtin:<name>")
    validate.add_argument("overrides", nargs="*", default=[],
                          help="with --config: section.field=value overrides of the run, as keel train takes them")
    validate.add_argument("--config", default=None,
                          help="a training config (YAML): its data.format, tokenizer, seq_length, chat_template and "
                               "overlong, and the tokenizer its checkpoint.load carries, are the defaults of the "
                               "options below")
    validate.add_argument("--algorithm", default=None, choices=tuple(ALGORITHMS),
                          help="the keel train algorithm of --config (default: the one its sections name); "
                               "without --config, that algorithm's defaults (e.g. grpo: a prompts file)")
    validate.add_argument("--format", choices=FORMATS, default=None,
                          help="row format (default: chat, or the built-in set's own)")
    validate.add_argument("--tokenizer", default=None, help="byte (default), builtin-sp or a tokenizer file")
    validate.add_argument("--seq-length", type=int, default=None,
                          help="sequence length used in training (default 128, keel train sft's; the run's with --config)")
    validate.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                          help="chat template (default auto: the tokenizer's own when it carries one, else plain)")
    validate.add_argument("--overlong", choices=("truncate", "drop", "cut_prompt"), default=None,
                          help="data.overlong that training applies to rows over seq_length (default: the run's "
                               "with --config, else truncate for chat/text rows and cut_prompt for the others)")
    validate.add_argument("--on-error", choices=("raise", "skip"), default="skip",
                          help="skip: list every bad row (default); raise: stop at the first")
    validate.add_argument("--num", type=int, default=512, help="rows of a builtin: source")
    validate.add_argument("--seed", type=int, default=0, help="seed of a builtin: source")
    validate.add_argument("--json", action="store_true", help="print the summary as JSON")
    validate.set_defaults(func=cmd_validate)


def register(subparsers: Any) -> None:
    """Add ``validate``, ``convert-*``, ``synth`` and ``diverging`` to ``subparsers`` (from ``add_subparsers``)."""
    _add_validate(subparsers)
    _add_convert(subparsers, "convert-helpsteer2-dpo", "helpsteer2-dpo",
                 "HelpSteer2 ratings -> DPO pairs (higher helpfulness chosen, ties dropped)")
    _add_convert(subparsers, "convert-helpsteer2-preference-bt", "helpsteer2-preference-bt",
                 "HelpSteer2-Preference -> Bradley-Terry pairs (margin |strength|, ties dropped)")
    _add_convert(subparsers, "convert-steerlm", "steerlm",
                 "HelpSteer attribute rows -> SteerLM attribute-conditioned SFT rows")

    synth = subparsers.add_parser("synth", help="write a built-in synthetic data set to JSONL",
                                  description="Write deterministic synthetic rows (clearly synthetic) to JSONL.")
    synth.add_argument("name", choices=SYNTH_NAMES + tuple(BUILTIN), help="which built-in set")
    synth.add_argument("--split", choices=SPLITS, default="train",
                       help="train, or validation/eval: words and number pairs train never uses (not for sft)")
    synth.add_argument("output", help="output .jsonl file")
    synth.add_argument("--num", type=int, default=1000, help="number of rows")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.set_defaults(func=cmd_synth)

    diverging = subparsers.add_parser(
        "diverging", help="count and extract preference pairs whose annotators disagree",
        description="Flag pairs whose annotators disagree on the direction (or whose strengths spread above "
        "--threshold) in helpsteer2_preference rows or pairs with annotator_strengths.")
    diverging.add_argument("source", help="data file, hf:<org>/<name> or builtin:<name>")
    diverging.add_argument("--format", choices=("auto", "pairs", "helpsteer2_preference"), default="auto",
                           help="row format (auto: helpsteer2_preference when rows have response_1)")
    diverging.add_argument("--threshold", type=float, default=None,
                           help="also flag pairs whose annotators' max-min strength is above this")
    diverging.add_argument("--out", default=None, help="write the diverging rows to this .jsonl file")
    diverging.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad input rows")
    diverging.set_defaults(func=cmd_diverging)
    register_ref_logprobs(subparsers)
    register_label(subparsers)
