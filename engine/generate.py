"""``keel generate``: completions from a policy checkpoint by repeated forward passes.

Each new token re-runs the model over the whole batch (no KV cache): prompts of mixed
lengths are right-padded and each row's next-token logits are read at its own last
position, which causal attention keeps independent of the padding after it. Greedy
(``temperature=0``) or sampled (temperature, top-p, top-k) decoding, per-row stop at the
template's end-of-turn or EOS, a seed per call. SteerLM policies (``nemotron`` template)
take target attributes: ``--attributes helpfulness=4,verbosity=1`` over the defaults of
HelpSteer2-era models (helpfulness, correctness, coherence 4; complexity, verbosity 2).

This decoder is the simple, exact reference; the KV-cache generation backend replaces it
for rollouts. It runs on one process (tensor parallelism comes with that backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.algorithms.logprobs import lm_forward
from engine.config import ConfigError
from engine.data.chat import prompt_messages, render_prompt, stop_token_ids
from engine.data.loaders import parsed_records
from engine.data.schemas import ATTRIBUTES

logger = logging.getLogger(__name__)

STEERLM_DEFAULTS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


@dataclass
class Sampling:
    """How tokens are drawn: ``temperature`` 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


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


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from ``logits [rows, vocab]``."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = scaled.topk(min(sampling.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scaled.sort(-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= sampling.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], stop_ids: list[int], sampling: Sampling,
             pad_id: int, max_length: int) -> list[list[int]]:
    """New token ids per prompt (stop token included when reached), at most ``max_length`` positions in all."""
    generator = torch.Generator().manual_seed(sampling.seed)
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    new: list[list[int]] = [[] for _ in rows]
    for _ in range(sampling.max_new_tokens):
        active = [i for i, d in enumerate(done) if not d and len(rows[i]) < max_length]
        if not active:
            break
        width = max(len(rows[i]) for i in active)
        tokens = torch.full((len(active), width), pad_id, dtype=torch.long)
        for j, i in enumerate(active):
            tokens[j, : len(rows[i])] = torch.tensor(rows[i])
        logits = lm_forward(model, {"tokens": tokens})
        last = torch.tensor([len(rows[i]) - 1 for i in active])
        chosen = _pick(logits[torch.arange(len(active)), last], sampling, generator)
        for j, i in enumerate(active):
            token = int(chosen[j])
            rows[i].append(token)
            new[i].append(token)
            done[i] = token in stop_ids
    return new


def load_policy(checkpoint: str) -> tuple[Any, Any, Any]:
    """(GPT model on this single process, tokenizer, the saved run's config) of a policy checkpoint."""
    import dataclasses

    from engine.checkpoint import dist as ckpt
    from engine.config import TrainConfig, from_dict
    from engine.data.tokenizers import load_tokenizer
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    from engine.runner import ModelRunner

    path = ckpt.resolve(checkpoint)
    saved = ckpt.read_meta(path)["config"]
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {key: value for key, value in saved.items() if key in shared}  # drop the algorithm's own section
    saved["parallel"] = {"tensor": 1, "pipeline": 1}
    config = from_dict(TrainConfig, saved, f"{path}/{ckpt.META}")
    env = read_launch_env()
    if env.world_size != 1:
        raise ConfigError("keel generate runs on one process; start it without torchrun")
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, 1), env, seed=config.run.seed)
    from megatron.core.models.gpt import GPTModel

    runner = ModelRunner.frozen(config, parallel, (GPTModel, {}))
    runner.load(path)
    return runner.chunks[0], load_tokenizer(config.data.tokenizer), config


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


def complete(model: Any, tokenizer: Any, template: str, rows: list[dict[str, Any]], sampling: Sampling,
             attributes: Optional[dict[str, int]], max_length: int, batch_size: int = 8,
             progress: bool = False) -> list[dict[str, Any]]:
    """One completion per row, as ``{prompt, completion, finish_reason, attributes}`` dicts."""
    stop = stop_token_ids(tokenizer, template)
    out: list[dict[str, Any]] = []
    bar = _progress(len(rows), progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [render_prompt(prompt_messages(r["prompt"]), tokenizer, template, attributes) for r in chunk]
        step = dataclasses.replace(sampling, seed=sampling.seed + start)
        for row, ids in zip(chunk, generate(model, prompts, stop, step, tokenizer.pad_id, max_length), strict=True):
            finished = bool(ids) and ids[-1] in stop
            out.append({"prompt": row["prompt"], "completion": tokenizer.decode(ids[:-1] if finished else ids),
                        "finish_reason": "stop" if finished else "length", "tokens": len(ids),
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


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, config = load_policy(args.checkpoint)
    template = args.template or config.data.chat_template
    attributes = parse_attributes(args.attributes) if template == "nemotron" else None
    if args.attributes and template != "nemotron":
        raise ConfigError(f"--attributes needs a SteerLM policy (nemotron template); this one uses {template!r}")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    rows = complete(model, tokenizer, template, read_prompts(args.prompts), sampling, attributes,
                    config.data.seq_length, args.batch_size, progress=not args.quiet)
    tmp = f"{args.output}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, args.output)
    print(f"wrote {len(rows)} completions to {args.output}", flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add ``keel generate``."""
    parser = subparsers.add_parser(
        "generate", help="complete prompts with a policy checkpoint (SteerLM: target attributes)",
        description="Read prompts JSONL ({prompt} or SFT {messages} rows), write completions JSONL. Greedy by "
        "default; --temperature > 0 samples (with --top-p/--top-k). One process, repeated forward passes.")
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_generate)
