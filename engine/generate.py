"""``keel generate``: completions from a policy checkpoint on the native generation backend.

The checkpoint is loaded at the generation layout's tensor-parallel size and resharded into
the backend (:mod:`engine.generation.native`: the megatron model with a KV cache), the same
path online RL takes every iteration. Prompts of mixed lengths are batched; greedy
(``--temperature 0``) or sampled (temperature, top-p, top-k) decoding; each row stops at the
template's end-of-turn or EOS, or at ``--max-length`` tokens of prompt + completion (default: the model's
context, not the checkpoint's training ``data.seq_length``; prompts it would cut short are counted in
a warning); row ``i`` draws from ``--seed + i``. An SFT ``{messages}`` row is completed from its turns
before the last assistant reply, which its output row keeps as ``reference``, and so does a TRL
``{prompt, completion}`` row with its completion (the generated text is the output's ``completion``); every
output row keeps its input row's other fields (``id``, ``answer``...). Under torchrun,
``--tensor G`` splits the model over ``G`` ranks and the world's ``world / G`` replicas share
the prompts. SteerLM policies (``nemotron`` template) take target attributes: a prompt row's own
``attributes`` (a dict or ``'verbosity:4,...'``), else the defaults of HelpSteer2-era models
(helpfulness, correctness, coherence 4; complexity, verbosity 2); ``--attributes helpfulness=4,verbosity=1``
over those defaults sets the targets of every row.

Completed batches are appended to ``OUTPUT.partial``; ``OUTPUT.partial.meta`` records what they
depend on (the resolved checkpoint, a hash of the prompts file, every generation option). A run
started again with the same command resumes after the last complete row; one whose checkpoint,
prompts or options differ is refused, naming the difference. The output is renamed into place
at the end (and the meta file removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from engine.config import ConfigError
from engine.data.chat import TEMPLATES, prompt_messages, render_prompt, stop_token_ids
from engine.data.errors import Absent, DataError, empty_dataset
from engine.data.loaders import make_parent_dir, parsed_records
from engine.data.schemas import ATTRIBUTES, check_messages, check_row
from engine.faults import maybe_fail
from engine.files import PartialOutput
from engine.generation.base import SamplingParams
from engine.runtime import shutdown
from engine.stop_signals import StopSignals

logger = logging.getLogger(__name__)
STEERLM_DEFAULTS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}
TEMPLATE_NAMES = ("auto", *TEMPLATES)
# What a partial output's fingerprint (OUTPUT.partial.meta) records, and how each is set.
FINGERPRINT = {"checkpoint": "the checkpoint", "prompts_sha256": "the prompts file's contents",
               "template": "--template", "attributes": "--attributes", "max_new_tokens": "--max-new-tokens",
               "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed",
               "max_length": "--max-length"}


def parse_attributes(text: Optional[str]) -> dict[str, int]:
    """``"verbosity=4,complexity=1"`` over :data:`STEERLM_DEFAULTS`; names and 0..4 values checked."""
    attributes = dict(STEERLM_DEFAULTS)
    given: set[str] = set()
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in ATTRIBUTES or not value.strip().isdigit() or not 0 <= int(value) <= 4:
            raise ConfigError(f"--attributes: {item!r} is not NAME=0..4 with NAME one of {', '.join(ATTRIBUTES)}")
        if name in given:
            raise ConfigError(f"--attributes: {name} is given twice ({text})")
        given.add(name)
        attributes[name] = int(value)
    return attributes


def resolve_checkpoint(checkpoint: str) -> Path:
    """The step directory ``checkpoint`` names (:func:`engine.checkpoint.dist.locate`); else a one-line
    :class:`ConfigError` listing the forms it takes."""
    from engine.checkpoint import dist as ckpt

    try:
        return ckpt.locate(checkpoint)
    except ckpt.CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def saved_config(checkpoint: str, tensor: int = 1) -> tuple[Any, str]:
    """(the checkpoint run's shared config at TP ``tensor``/PP1, resolved checkpoint path)."""
    from engine.checkpoint import dist as ckpt
    from engine.config import TrainConfig, from_dict

    path = resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    try:
        ckpt.refuse_scorer(path, meta, "generated from")
    except ckpt.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {key: value for key, value in meta["config"].items() if key in shared}  # drop the algorithm's own section
    saved["parallel"] = {"tensor": tensor, "pipeline": 1}
    # how over-long training rows were cut (DPO's cut_prompt...) is no concern of generation
    saved["data"] = {key: value for key, value in saved.get("data", {}).items() if key != "overlong"}
    return from_dict(TrainConfig, saved, f"{path}/{ckpt.META}"), str(path)


def load_backend(checkpoint: str, tensor: int = 1, max_batch_size: int = 8) -> tuple[Any, Any, Any]:
    """(native backend holding the checkpoint's weights, tokenizer, the saved run's config).

    The weights are loaded into a frozen model at TP ``tensor`` (any saved layout reshards on load)
    and resharded into the backend, which is then the only copy kept.
    """
    from megatron.core.models.gpt import GPTModel

    from engine.data.tokenizers import load_tokenizer
    from engine.generation.native import NativeBackend
    from engine.generation.reshard import Resharder
    from engine.models.presets import resolve_preset
    from engine.parallel.generation_layout import GenerationLayout, GenerationParallelState
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    from engine.runner import ModelRunner

    config, path = saved_config(checkpoint, tensor)
    env = read_launch_env()
    GenerationLayout.for_world(tensor, env.world_size, resolve_preset(config.model), named=f"--tensor {tensor}")
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                        seed=config.run.seed)
    runner = ModelRunner.frozen(config, parallel, (GPTModel, {}))
    runner.load(Path(path))
    backend = NativeBackend(config, GenerationParallelState.initialize(tensor), max_batch_size)
    Resharder(runner.chunks, backend).reshard()
    del runner
    return backend, load_tokenizer(config.data.tokenizer), config


def read_prompts(path: str) -> list[dict[str, Any]]:
    """The rows of :func:`placed_prompts`."""
    return [row for _, row in placed_prompts(path)]


def placed_prompts(path: str) -> list[tuple[Any, dict[str, Any]]]:
    """``(where, {"prompt": str | messages})`` per row of ``path``. An SFT ``messages`` row gives its turns
    before the last assistant reply as the prompt and that reply as ``reference`` (unless the row has one), to
    compare the completion with; a ``{prompt, completion}`` row gives its completion as ``reference`` the same way.

    Each prompt is checked as the ``prompts`` schema checks it (a string, or messages ending with a
    user turn), so a bad one is a :class:`DataError` naming the file, line and field.
    """
    if not os.path.isfile(path):  # the loaders would also offer hf: and builtin: sources, which keel generate does not read
        raise DataError(None, "<source>", "an existing .jsonl, .json or .parquet file", got=path, source=path,
                        hint="check keel generate's prompts argument")
    try:
        placed = [(where, _prompt_row(where, row)) for where, row in parsed_records(path)]
    except DataError as exc:  # the loaders' hint offers data.on_error, which keel generate does not read
        if exc.where is None:  # the file itself (its kind, its path), not a row of it
            raise exc.with_hint("check keel generate's prompts argument") from None
        raise exc.with_hint("fix the row in the prompts file; keel generate completes every row") from None
    if not placed:
        raise empty_dataset(path).with_hint("keel generate completes each row of the prompts file, and it has none")
    return placed


def _prompt_row(where: Any, row: Any) -> dict[str, Any]:
    """One checked row of :func:`read_prompts`."""
    if not isinstance(row, dict):
        raise DataError(where, "<row>", "a JSON object with a 'prompt' (or SFT 'messages')", row)
    if "prompt" not in row and "messages" in row:
        row = _sft_prompt(row, where)
    elif "prompt" not in row:
        raise DataError(where, "prompt", "a string or messages (or SFT 'messages')", Absent(row))
    else:
        check_row("prompts", {"prompt": row["prompt"]}, where)  # the prompt only: other fields pass through
        if row.get("completion") is not None:  # TRL's prompt-completion: the generated text takes its place
            row = {"reference": _completion_reference(row["completion"], where), **row}
    return row


def _completion_reference(completion: Any, where: Any) -> str:
    """A prompt-completion row's own completion as the text kept as ``reference``: a string, or TRL's
    conversational form (the reply's turn alone, ``[{"role": "assistant", "content": ...}]``)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict) \
            and completion[0].get("role") == "assistant" and isinstance(completion[0].get("content"), str):
        return str(completion[0]["content"])
    raise DataError(where, "completion", "a string, or TRL's conversational [{role: assistant, content}] reply "
                    "(it is kept as 'reference'; the generated text is the output's 'completion')", completion)


def _sft_prompt(row: dict[str, Any], where: Any) -> dict[str, Any]:
    """``row`` with its SFT ``messages`` up to the last assistant reply as ``prompt``, the reply as ``reference``."""
    messages = row["messages"]
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        reply = check_messages(messages, where, "messages")[-1]  # the reply is checked too: it is written out
        return {"reference": reply["content"], **row, "prompt": messages[:-1]}
    check_messages(messages, where, "messages", last="user")
    return {**row, "prompt": messages}


def row_attributes(row: dict[str, Any], where: Any, default: dict[str, int], forced: bool) -> dict[str, int]:
    """The targets of a prompt row for a SteerLM policy: its ``attributes`` field (a dict or a
    ``'helpfulness:4,...'`` string, over :data:`STEERLM_DEFAULTS`), else ``default``; ``forced`` (``--attributes``
    given) sets ``default`` for every row."""
    from engine.data.schemas import parse_attributes as parse_row_attributes

    if forced or row.get("attributes") is None:
        return default
    return {**STEERLM_DEFAULTS, **parse_row_attributes(row["attributes"], where)}


def _targets(row: dict[str, Any], attributes: Optional[dict[str, int]]) -> Optional[dict[str, int]]:
    """The attributes a row is rendered with: its resolved own for a SteerLM policy, none otherwise."""
    return row["attributes"] if attributes is not None and isinstance(row.get("attributes"), dict) else attributes


def complete(backend: Any, tokenizer: Any, template: str, rows: list[dict[str, Any]], sampling: SamplingParams,
             attributes: Optional[dict[str, int]], batch_size: int = 64,
             progress: bool = False) -> list[dict[str, Any]]:
    """One completion per row, as ``{prompt, completion, finish_reason, tokens, attributes}`` dicts plus the
    row's other fields (``id``, ``answer``, the ``reference`` of an SFT or prompt-completion row...; its
    ``messages`` aside)."""
    sampling = dataclasses.replace(sampling, stop_token_ids=tuple(stop_token_ids(tokenizer, template)),
                                   vocab_size=tokenizer.vocab_size)
    out: list[dict[str, Any]] = []
    bar = _progress(len(rows), progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [render_prompt(prompt_messages(r["prompt"]), tokenizer, template, _targets(r, attributes))
                   for r in chunk]
        seeds = [sampling.seed + start + i for i in range(len(chunk))]
        rollouts = backend.generate(prompts, sampling, seeds=seeds)
        for row, ids, reason in zip(chunk, rollouts.tokens, rollouts.finish_reasons, strict=True):
            text = tokenizer.decode(ids[:-1] if reason == "stop" else ids)
            kept = {k: v for k, v in row.items() if k != "messages"}  # id, answer...: to join results back
            targets = _targets(row, attributes)
            out.append({**kept, "prompt": row["prompt"], "completion": text, "finish_reason": reason,
                        "tokens": len(ids), **({"attributes": targets} if targets else {})})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from engine.progress import progress_bar

    return progress_bar(total=total, desc="generate", unit="prompt")


@dataclasses.dataclass
class Job:
    """A checked ``keel generate`` command: everything it needs short of the model."""

    config: Any
    checkpoint: str  # the resolved checkpoint directory
    tokenizer: Any
    template: str
    attributes: Optional[dict[str, int]]
    rows: list[dict[str, Any]]
    sampling: SamplingParams
    prompts_sha256: str

    def fingerprint(self) -> dict[str, Any]:
        """What the completions depend on, as JSON values (keys of :data:`FINGERPRINT`). Not ``--batch-size``
        or ``--tensor``: each row draws from its own seed, so a resumed run may change them."""
        s = self.sampling
        values = {"checkpoint": self.checkpoint, "prompts_sha256": self.prompts_sha256, "template": self.template,
                  "attributes": self.attributes, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                  "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed, "max_length": s.max_length}
        return dict(json.loads(json.dumps(values)))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_options(args: argparse.Namespace) -> None:
    """The options on their own (no file read yet)."""
    if args.template is not None and args.template not in TEMPLATE_NAMES:
        raise ConfigError(f"--template {args.template!r} is not a chat template; choose one of "
                          f"{', '.join(TEMPLATE_NAMES)}")
    for option, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                          ("--tensor", args.tensor)):
        if value < 1:
            raise ConfigError(f"{option} {value}: must be at least 1")
    unused = [f"{option} {value:g}" for option, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0))
              if value != off]
    from engine.parallel.layout import read_launch_env

    if args.temperature == 0 and unused and read_launch_env().rank == 0:  # greedy takes the argmax: no filter acts
        logger.warning("%s %s no effect with --temperature 0 (greedy, the default): give a --temperature above 0 "
                       "to sample", " and ".join(unused), "have" if len(unused) > 1 else "has")


def _check_inputs(args: argparse.Namespace) -> Job:
    """Everything that can be wrong with the command, found before the model loads."""
    from engine.data.tokenizers import load_tokenizer, warn_if_foreign
    from engine.generation.base import check_prompts
    from engine.models.presets import resolve_preset

    _check_options(args)
    placed = placed_prompts(args.prompts)
    rows = [row for _, row in placed]
    config, path = saved_config(args.checkpoint, args.tensor)
    template = args.template or config.data.chat_template
    attributes = parse_attributes(args.attributes) if template == "nemotron" else None
    if args.attributes and template != "nemotron":
        raise ConfigError(f"--attributes needs a SteerLM policy (nemotron template); this one uses {template!r}")
    preset = resolve_preset(config.model)
    context = preset.max_sequence_length
    if args.max_length > context:  # the backend would stop at the context anyway: say so rather than cap it
        raise ConfigError(f"--max-length {args.max_length} is beyond the model's context of {context} tokens "
                          f"({preset.name}); give at most {context}")
    # not the checkpoint's data.seq_length: that is how long its training rows were cut (a converted model's
    # says nothing of its context), and it cut completions short without a word
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                              max_length=args.max_length or context)
    tokenizer = load_tokenizer(config.data.tokenizer)
    warn_if_foreign(tokenizer, config.data.tokenizer, preset.name, preset.vocab_size)
    if attributes is not None:  # a SteerLM policy: each row's own targets unless --attributes sets them for all
        rows = [{**row, "attributes": row_attributes(row, where, attributes, bool(args.attributes))}
                for where, row in placed]
    rendered = [render_prompt(prompt_messages(r["prompt"]), tokenizer, template, _targets(r, attributes))
                for r in rows]
    names = [f"{where}: field 'prompt'" for where, _ in placed]
    check_prompts(rendered, sampling, context, names=names, option="--max-length")
    warn_of_cut_completions([len(prompt) for prompt in rendered], sampling, context)
    return Job(config, os.path.realpath(path), tokenizer, template, attributes, rows, sampling, _sha256(args.prompts))


def warn_of_cut_completions(prompt_lengths: list[int], sampling: SamplingParams, context: int) -> None:
    """One warning (rank 0) when prompt + ``--max-new-tokens`` passes ``--max-length`` for some prompts: those
    completions stop at the cap with finish_reason "length", however many new tokens were asked for."""
    from engine.parallel.layout import read_launch_env

    cap, wanted = sampling.max_length, sampling.max_new_tokens
    cut = sum(length + wanted > cap for length in prompt_lengths)
    if not cut or read_launch_env().rank != 0:
        return
    needed = max(prompt_lengths) + wanted
    if cap < context:
        limit, advice = f"--max-length {cap}", f"raise --max-length to {min(needed, context)} (at most the model's " \
            f"context of {context} tokens)"
    else:
        limit, advice = f"the model's context of {context} tokens", "lower --max-new-tokens or shorten the prompts"
    logger.warning("%d of %d completions may be cut short: prompt + --max-new-tokens %d is more than %s; %s",
                   cut, len(prompt_lengths), wanted, limit, advice)


def _resume_point(partial: PartialOutput, fingerprint: dict[str, Any]) -> list[Any]:
    """The completed rows of ``partial`` to keep; those of a run with other (or unknown) options are refused."""
    done = partial.records()
    if not done:
        return []  # nothing to mix in: start over
    saved = partial.recorded()
    if saved is None:
        raise ConfigError(f"{partial.path} holds {len(done)} completions of an earlier run whose options are unknown "
                          f"(no readable {partial.meta}); delete {partial.path} to start over")
    differ = [label if key == "prompts_sha256" else f"{label} {saved.get(key)!r} then, {fingerprint[key]!r} now"
              for key, label in FINGERPRINT.items() if saved.get(key) != fingerprint[key]]
    if differ:
        raise ConfigError(f"{partial.path} was written with other options ({'; '.join(differ)}): delete "
                          f"{partial.path} to start over, or rerun with the same options to resume it")
    return done


def _prepare_output(args: argparse.Namespace, job: Job) -> list[Any]:
    """Check a partial output against ``job`` and make the output's directory; returns the rows already done."""
    from engine.parallel.layout import read_launch_env

    done = _resume_point(PartialOutput(args.output), job.fingerprint())
    make_parent_dir(args.output)
    if done and read_launch_env().rank == 0:
        print(f"resuming: {len(done)} of {len(job.rows)} prompts already done ({args.output}.partial)", flush=True)
    return done


def cmd_generate(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    job = _check_inputs(args)
    done = _prepare_output(args, job)
    partial, rows = PartialOutput(args.output), job.rows
    backend, _, _ = load_backend(args.checkpoint, args.tensor, args.batch_size)
    writer = dist.get_rank() == 0
    if writer:
        partial.start(done, job.fingerprint())
    with StopSignals("will stop after the current batch, keeping every completion made") as signals:
        with partial.append() if writer else open(os.devnull, "w") as fh:
            made = _generate_rows(args, job, backend, len(done), fh, signals, writer)
    if writer and made == len(rows):
        partial.finish()
        print(f"wrote {len(rows)} completions to {args.output}", flush=True)
    elif writer:
        print(f"keel: stopped by {signals.received or 'a signal on another rank'} after {made} of {len(rows)} "
              f"prompts; they are kept in {partial.path}, and the same command resumes from them", file=sys.stderr,
              flush=True)
    backend.release()
    # Every rank leaves together and tears its process groups down: a rank that exits while gloo's
    # threads still run can abort at interpreter exit ("terminate called without an active exception").
    shutdown()
    return 0 if made == len(rows) or signals.received != "SIGINT" else 130


def _generate_rows(args: argparse.Namespace, job: Job, backend: Any, first: int, fh: Any, signals: StopSignals,
                   writer: bool) -> int:
    """Complete ``job.rows[first:]`` batch by batch into ``fh``; returns how many rows are done, fewer when a
    SIGTERM or Ctrl-C on any rank stopped it after a batch (each batch's rows are flushed before the next)."""
    from engine.parallel.collectives import any_rank

    rows = job.rows
    bar = _progress(len(rows), not args.quiet and writer)
    if bar is not None:
        bar.update(first)
    made = first
    for number, start in enumerate(range(first, len(rows), args.batch_size), 1):
        if any_rank(signals.requested):
            break
        chunk = rows[start: start + args.batch_size]
        step = dataclasses.replace(job.sampling, seed=job.sampling.seed + start)
        for row in complete(backend, job.tokenizer, job.template, chunk, step, job.attributes, args.batch_size):
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        made += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
        maybe_fail("generated", number)
    if bar is not None:
        bar.close()
    return made


def register(subparsers: Any) -> None:
    """Add ``keel generate``."""
    from engine.checkpoint import CHECKPOINT_FORMS

    parser = subparsers.add_parser(
        "generate", help="complete prompts with a policy checkpoint (SteerLM: target attributes)",
        description="Read prompts JSONL ({prompt}, TRL {prompt, completion} or SFT {messages} rows), write "
        "completions JSONL (an SFT row's last assistant reply, or a {prompt, completion} row's completion, is kept "
        "as 'reference', other fields as they are). Greedy by "
        "default; --temperature > 0 samples (with --top-p/--top-k). Native KV-cache backend; under torchrun "
        "--tensor G splits the model over G ranks and the replicas share the prompts. An interrupted run "
        "started again with the same options resumes from OUTPUT.partial (its options are recorded in "
        "OUTPUT.partial.meta; other options are refused).")
    parser.add_argument("checkpoint", help=f"the policy checkpoint: {CHECKPOINT_FORMS}")
    parser.add_argument("prompts", help="input JSONL")
    parser.add_argument("output", help="output JSONL (written atomically)")
    parser.add_argument("--attributes", default=None,
                        help="SteerLM targets NAME=0..4,... over helpfulness/correctness/coherence 4, "
                        "complexity/verbosity 2, for every row (default: each row's own 'attributes', else those)")
    parser.add_argument("--template", default=None,
                        help=f"chat template, one of {', '.join(TEMPLATE_NAMES)} (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="most new tokens per completion (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="draw from the likeliest tokens whose probabilities sum to P (nucleus); 1 = off "
                        "(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="draw from the k likeliest tokens; 0 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="row i of the prompts draws from seed + i (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="prompts decoded together per replica (default: %(default)s)")
    parser.add_argument("--tensor", type=int, default=1,
                        help="generation tensor-parallel size (torchrun ranks) (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=0,
                        help="prompt + completion cap, at most the model's context (default: the model's context; "
                             "a warning counts the completions it may cut short)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_generate)
