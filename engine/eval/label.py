"""``keel data label --rm CHECKPOINT``: a reward model's predicted attributes written onto SFT rows.

SteerLM's data step: every response of an SFT set is labelled with the attributes a
regression reward model predicts for it (rounded to 0..4), so attribute-conditioned SFT
(``data.chat_template=nemotron``) trains on them. Rows are ``{"messages": [...]}`` whose last
turn is the assistant's response (the turns before it are the prompt), or ``{"prompt", "response"}``
(or TRL's ``"completion"``), checked as ``keel train sft`` checks them. Each output row is the input
row plus ``attributes``, the SteerLM string (``helpfulness:4,correctness:3,...``), and ``predicted``
with the raw predictions. A row whose response alone is longer than the reward model's ``seq_length`` gets
no score (no reward is read from a cut response, as in ``keel eval rewardbench``): it is left
out of the output, and the count and the first such file and line are logged and printed.

Under torchrun the rows are sharded over the data-parallel ranks (the scorer does that and
gathers them back in order). Work is done in chunks; rank 0 appends each finished chunk to
``<output>.partial``, so a killed run started again continues after the last complete
chunk, and the finished file is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any, NamedTuple

from engine.config import ConfigError
from engine.data.errors import Absent, DataError, Where, empty_dataset
from engine.data.loaders import make_parent_dir, parsed_records
from engine.data.schemas import attribute_string, check_row
from engine.files import PartialOutput
from engine.runtime import shutdown

logger = logging.getLogger(__name__)


class SftRow(NamedTuple):
    """One input row: the record as read, its prompt and response, and where it is (``file, line n``)."""

    record: dict[str, Any]
    prompt: Any
    response: str
    where: str = ""


class LabelResult(NamedTuple):
    """What :func:`label_file` did: rows written, and where each row left out (response too long) is."""

    written: int
    skipped: list[str]


def _prompt_and_response(row: Any, where: Where) -> tuple[Any, str]:
    """(prompt turns, response) of a row that keel train sft reads: ``messages`` ending with the assistant's
    turn, or ``prompt`` with ``response`` or ``completion``; checked as training checks it."""
    if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
        raise DataError(where, "<row>", "'messages' (chat), or 'prompt' with 'response' or 'completion'",
                        Absent(row) if isinstance(row, dict) else row)
    messages = check_row("chat", row, where)["messages"]
    if messages[-1]["role"] != "assistant":
        raise DataError(where, f"messages[{len(messages) - 1}].role", "'assistant': the last turn is the response "
                        "that is labelled", messages[-1]["role"])
    return messages[:-1], str(messages[-1]["content"])


def read_rows(path: str) -> list[SftRow]:
    """Each row of ``path`` with its prompt, response and place; a bad row is reported with its line (the
    shared reader's hint, data.on_error=skip, is not an option here)."""
    try:
        rows = [SftRow(row, *_prompt_and_response(row, where), str(where)) for where, row in parsed_records(path)]
    except DataError as error:
        if error.where is None:  # the file itself (its kind, its path), not a row of it
            raise error.with_hint("check keel data label's input argument") from None
        raise error.with_hint("fix the row; keel data label labels every row") from None
    if not rows:
        raise empty_dataset(path).with_hint("keel data label labels each row of its input, and it has none")
    return rows


def split_fitting(scorer: Any, rows: list[SftRow]) -> tuple[list[SftRow], list[str]]:
    """(rows the reward model can score, places of those whose response alone is longer than its seq_length).

    Decided from the tokens alone, before any scoring, so a resumed run leaves out the same rows.
    """
    fitting: list[SftRow] = []
    skipped: list[str] = []
    for row in rows:
        if scorer.fit(row.prompt, row.response) is None:
            skipped.append(row.where)
        else:
            fitting.append(row)
    return fitting, skipped


def skipped_note(skipped: list[str], seq_length: int) -> str:
    """``2 rows not labelled: ... (first: f.jsonl, line 3)``, or "" when none was skipped."""
    if not skipped:
        return ""
    return (f"{len(skipped)} row{'s' if len(skipped) != 1 else ''} not labelled: the response alone is longer "
            f"than the reward model's seq_length={seq_length} (first: {skipped[0]})")


def labelled(row: dict[str, Any], prediction: list[float], names: list[str]) -> dict[str, Any]:
    """``row`` with ``attributes`` (rounded, clipped to 0..4) and the raw ``predicted`` values."""
    ratings = {name: min(4, max(0, round(value))) for name, value in zip(names, prediction, strict=True)}
    return {**row, "attributes": attribute_string(ratings),
            "predicted": {name: round(value, 4) for name, value in zip(names, prediction, strict=True)}}


def _unlabelled(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("attributes", "predicted")}


def resume_point(partial: PartialOutput, rows: list[SftRow], source: str) -> list[Any]:
    """The complete rows of ``partial`` that a run of this input and reward model wrote (a torn last line is
    dropped). A partial file of another input (the line is not that input row) or another reward model
    (its fingerprint) is refused: it used to be continued by its line count alone."""
    done = partial.records()
    for number, record in enumerate(done, 1):
        if number > len(rows) or not isinstance(record, dict) or _unlabelled(record) != _unlabelled(rows[number - 1][0]):
            raise ConfigError(f"{partial.path}, line {number}: not row {number} of this input labelled; it is left "
                              "from another input: delete it to start over")
    made_by = (partial.recorded() or {}).get("rm")
    if done and made_by != source:
        raise ConfigError(f"{partial.path} was labelled by reward model {made_by or 'unknown'}, and this run's is "
                          f"{source}; delete it to start over, or rerun with that model")
    return done


def _check_finite(part: list[SftRow], predictions: list[list[float]]) -> None:
    """A non-finite prediction for a row that fits is a broken model, not a long row: say so, naming the row."""
    for row, prediction in zip(part, predictions, strict=True):
        if not all(math.isfinite(value) for value in prediction):
            raise ConfigError(f"{row.where or 'a row'}: the reward model predicted {prediction}, not finite numbers; "
                              "the checkpoint is broken or diverged (check it, e.g. with keel eval rewardbench)")


def label_file(scorer: Any, rows: list[SftRow], output: str, chunk: int = 256, progress: bool = True,
               source: str = "") -> LabelResult:
    """Label ``rows`` (from :func:`read_rows`) into ``output`` with the reward model ``source`` names (its
    resolved checkpoint). Rows whose response alone does not fit the model are left out and counted."""
    rows, skipped = split_fitting(scorer, rows)
    if skipped:
        logger.warning("%s", skipped_note(skipped, scorer.seq_length))
    partial = PartialOutput(output)
    kept = resume_point(partial, rows, source)
    names = list(scorer.step.rm.attributes)
    is_main = scorer.parallel.is_main
    scorer.parallel.barrier()  # every rank has checked the partial file before rank 0 rewrites it
    if is_main:  # the complete lines only, and which model wrote them
        partial.start(kept, {"rm": source})
    bar = None
    if progress and is_main:
        from engine.progress import progress_bar

        bar = progress_bar(total=len(rows), initial=len(kept), desc="label", unit="row")
    scorer.parallel.barrier()  # every rank has read the same resume point
    for start in range(len(kept), len(rows), chunk):
        part = rows[start: start + chunk]
        predictions = scorer.score([(row.prompt, row.response) for row in part]).tolist()
        _check_finite(part, predictions)
        if is_main:
            with partial.append() as sink:
                sink.writelines(json.dumps(labelled(row.record, prediction, names)) + "\n"
                                for row, prediction in zip(part, predictions, strict=True))
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    scorer.parallel.barrier()
    if is_main:
        partial.finish()
    return LabelResult(len(rows), skipped)


def _reward_model(checkpoint: str) -> str:
    """The resolved checkpoint of ``--rm``; a policy or critic is refused by name before it loads."""
    from engine.checkpoint import dist as ckpt

    try:
        path = ckpt.locate(checkpoint, "--rm")
    except ckpt.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    algorithm = ckpt.read_meta(path).get("algorithm")
    if algorithm != "rm":
        raise ConfigError(f"--rm {checkpoint}: a {algorithm} checkpoint, not a reward model (keel train rm)")
    return str(path)


def cmd_label(args: argparse.Namespace) -> int:
    from engine.eval.scoring import load_scorer

    if args.chunk < 1:
        raise ConfigError(f"--chunk {args.chunk}: must be at least 1")
    rows = read_rows(args.input)  # every row checked before any model is built
    make_parent_dir(args.output)  # and the output's directory made (label_file writes <output>.partial there)
    source = _reward_model(args.rm)
    scorer = load_scorer(args.rm)
    if scorer.step.rm.type != "regression":
        raise ConfigError(f"--rm {args.rm}: a Bradley-Terry model has no attributes; label with a regression RM")
    result = label_file(scorer, rows, args.output, args.chunk, not args.quiet, source)
    if scorer.parallel.is_main:
        note = skipped_note(result.skipped, scorer.seq_length)
        print(f"labelled {result.written} rows with {', '.join(scorer.step.rm.attributes)} into {args.output}"
              + (f"; {note}" if note else ""), flush=True)
    shutdown()
    return 0 if result.written else 1  # nothing labelled: a next step on the empty file would fail further on


def register(subparsers: Any) -> None:
    """Add ``label`` to ``keel data``."""
    parser = subparsers.add_parser(
        "label", help="write a regression reward model's predicted attributes onto SFT rows (SteerLM)",
        description="Score each row's last assistant response with a regression reward model and write its "
        "attributes (rounded to 0..4) as the SteerLM string; under torchrun rows are sharded over "
        "data-parallel ranks. Resumable: a killed run continues after its last complete chunk.")
    parser.add_argument("input", help="SFT JSONL ({messages} or {prompt, response} rows)")
    parser.add_argument("output", help="output JSONL")
    parser.add_argument("--rm", required=True, help="regression reward-model checkpoint")
    parser.add_argument("--chunk", type=int, default=256, help="rows per resumable chunk")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_label)
