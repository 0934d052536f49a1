"""``keel generate``: completions from a policy checkpoint on the native generation backend.

The checkpoint is loaded at the generation layout's tensor-parallel size and resharded into
the backend (:mod:`engine.generation.native`: the megatron model with a KV cache), the same
path online RL takes every iteration. Prompts of mixed lengths are batched; greedy
(``--temperature 0``) or sampled (temperature, top-p, top-k) decoding; each row stops at the
template's end-of-turn or EOS; row ``i`` draws from ``--seed + i``. Under torchrun,
``--tensor G`` splits the model over ``G`` ranks and the world's ``world / G`` replicas share
the prompts. SteerLM policies (``nemotron`` template) take target attributes:
``--attributes helpfulness=4,verbosity=1`` over the defaults of HelpSteer2-era models
(helpfulness, correctness, coherence 4; complexity, verbosity 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

from engine.config import ConfigError
from engine.data.chat import prompt_messages, render_prompt, stop_token_ids
from engine.data.loaders import parsed_records
from engine.data.schemas import ATTRIBUTES
from engine.generation.base import SamplingParams
from engine.runtime import shutdown

STEERLM_DEFAULTS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


def parse_attributes(text: Optional[str]) -> dict[str, int]:
    """``"verbosity=4,complexity=1"`` over :data:`STEERLM_DEFAULTS`; names and 0..4 values checked."""
    attributes = dict(STEERLM_DEFAULTS)
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in ATTRIBUTES or not value.strip().isdigit() or not 0 <= int(value) <= 4:
            raise ConfigError(f"--attributes: {item!r} is not NAME=0..4 with NAME one of {', '.join(ATTRIBUTES)}")
        attributes[name] = int(value)
    return attributes


def saved_config(checkpoint: str, tensor: int = 1) -> tuple[Any, str]:
    """(the checkpoint run's shared config at TP ``tensor``/PP1, resolved checkpoint path)."""
    from engine.checkpoint import dist as ckpt
    from engine.config import TrainConfig, from_dict

    path = ckpt.resolve(checkpoint)
    meta = ckpt.read_meta(path)
    if meta.get("algorithm") in ("rm", "critic"):
        raise ConfigError(f"{path} is a {'reward model' if meta['algorithm'] == 'rm' else 'PPO critic'}: it scores "
                          "responses; generate from a policy checkpoint")
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
    GenerationLayout.for_world(tensor, env.world_size).check_model(resolve_preset(config.model))
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                        seed=config.run.seed)
    runner = ModelRunner.frozen(config, parallel, (GPTModel, {}))
    runner.load(Path(path))
    backend = NativeBackend(config, GenerationParallelState.initialize(tensor), max_batch_size)
    Resharder(runner.chunks, backend).reshard()
    del runner
    return backend, load_tokenizer(config.data.tokenizer), config


def read_prompts(path: str) -> list[dict[str, Any]]:
    """``{"prompt": str | messages}`` rows (SFT ``messages`` rows give their turns before the last reply)."""
    rows = []
    for where, row in parsed_records(path):
        if "prompt" not in row and "messages" in row:
            messages = row["messages"]
            row = {**row, "prompt": messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages}
        if "prompt" not in row:
            raise ConfigError(f"{where}: field 'prompt': expected a string or messages, got none")
        rows.append(row)
    return rows


def complete(backend: Any, tokenizer: Any, template: str, rows: list[dict[str, Any]], sampling: SamplingParams,
             attributes: Optional[dict[str, int]], batch_size: int = 64,
             progress: bool = False) -> list[dict[str, Any]]:
    """One completion per row, as ``{prompt, completion, finish_reason, tokens, attributes}`` dicts."""
    sampling = dataclasses.replace(sampling, stop_token_ids=tuple(stop_token_ids(tokenizer, template)),
                                   vocab_size=tokenizer.vocab_size)
    out: list[dict[str, Any]] = []
    bar = _progress(len(rows), progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [render_prompt(prompt_messages(r["prompt"]), tokenizer, template, attributes) for r in chunk]
        seeds = [sampling.seed + start + i for i in range(len(chunk))]
        rollouts = backend.generate(prompts, sampling, seeds=seeds)
        for row, ids, reason in zip(chunk, rollouts.tokens, rollouts.finish_reasons, strict=True):
            text = tokenizer.decode(ids[:-1] if reason == "stop" else ids)
            out.append({"prompt": row["prompt"], "completion": text, "finish_reason": reason, "tokens": len(ids),
                        **({"attributes": attributes} if attributes else {})})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", dynamic_ncols=True)


def _done_rows(partial: str) -> list[str]:
    """Completed lines of an interrupted run's partial output (a torn last line is dropped)."""
    if not os.path.exists(partial):
        return []
    with open(partial) as fh:
        lines = fh.read().split("\n")
    return [line for line in lines[:-1] if line.strip()]


def _check_inputs(args: argparse.Namespace) -> tuple[Any, Any, str, Optional[dict[str, int]], list[dict[str, Any]], SamplingParams]:
    """Everything that can be wrong with the command, found before the model loads."""
    from engine.data.tokenizers import load_tokenizer, warn_if_foreign
    from engine.generation.base import check_prompts
    from engine.models.presets import resolve_preset

    config, _ = saved_config(args.checkpoint, args.tensor)
    template = args.template or config.data.chat_template
    attributes = parse_attributes(args.attributes) if template == "nemotron" else None
    if args.attributes and template != "nemotron":
        raise ConfigError(f"--attributes needs a SteerLM policy (nemotron template); this one uses {template!r}")
    max_length = args.max_length or config.data.seq_length
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                              max_length=max_length)
    tokenizer = load_tokenizer(config.data.tokenizer)
    preset = resolve_preset(config.model)
    warn_if_foreign(tokenizer, config.data.tokenizer, preset.name, preset.vocab_size)
    rows = read_prompts(args.prompts)
    rendered = [render_prompt(prompt_messages(r["prompt"]), tokenizer, template, attributes) for r in rows]
    context = preset.max_sequence_length
    check_prompts(rendered, sampling, context, names=[f"{where}: field 'prompt'" for where, _ in parsed_records(args.prompts)])
    return config, tokenizer, template, attributes, rows, sampling


def cmd_generate(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    config, tokenizer, template, attributes, rows, sampling = _check_inputs(args)
    partial = f"{args.output}.partial"
    done = _done_rows(partial)
    backend, _, _ = load_backend(args.checkpoint, args.tensor, args.batch_size)
    writer = dist.get_rank() == 0
    if writer and done:  # drop a torn last line before appending
        with open(f"{partial}.tmp", "w") as fh:
            fh.writelines(line + "\n" for line in done)
        os.replace(f"{partial}.tmp", partial)
    with open(partial, "a") if writer else open(os.devnull, "w") as fh:
        bar = _progress(len(rows), not args.quiet and writer)
        if bar is not None:
            bar.update(len(done))
        for start in range(len(done), len(rows), args.batch_size):
            chunk = rows[start: start + args.batch_size]
            step = dataclasses.replace(sampling, seed=sampling.seed + start)
            for row in complete(backend, tokenizer, template, chunk, step, attributes, args.batch_size):
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    if writer:
        os.replace(partial, args.output)
        print(f"wrote {len(rows)} completions to {args.output}", flush=True)
    backend.release()
    # Every rank leaves together and tears its process groups down: a rank that exits while gloo's
    # threads still run can abort at interpreter exit ("terminate called without an active exception").
    shutdown()
    return 0


def register(subparsers: Any) -> None:
    """Add ``keel generate``."""
    parser = subparsers.add_parser(
        "generate", help="complete prompts with a policy checkpoint (SteerLM: target attributes)",
        description="Read prompts JSONL ({prompt} or SFT {messages} rows), write completions JSONL. Greedy by "
        "default; --temperature > 0 samples (with --top-p/--top-k). Native KV-cache backend; under torchrun "
        "--tensor G splits the model over G ranks and the replicas share the prompts. An interrupted run "
        "resumes from OUTPUT.partial.")
    parser.add_argument("checkpoint", help="policy checkpoint (run dir/checkpoints, step dir, or 'best')")
    parser.add_argument("prompts", help="input JSONL")
    parser.add_argument("output", help="output JSONL (written atomically)")
    parser.add_argument("--attributes", default=None,
                        help="SteerLM targets NAME=0..4,... over helpfulness/correctness/coherence 4, "
                        "complexity/verbosity 2")
    parser.add_argument("--template", default=None, help="chat template (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts decoded together per replica")
    parser.add_argument("--tensor", type=int, default=1, help="generation tensor-parallel size (torchrun ranks)")
    parser.add_argument("--max-length", type=int, default=0,
                        help="prompt + completion cap (default: the checkpoint's data.seq_length)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_generate)
