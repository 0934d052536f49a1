"""Benchmark Keel's reward model (training and scoring) against Hugging Face ``LlamaForSequenceClassification``.

CPU, fp32, TP1, the same number of torch threads for every side; by default each side runs alone
in its own process (``--mode processes``, see ``tools/bench/reward_processes.py``). Both sides
are a Llama of identical shape (default: the ``bench-34m`` preset: 8 layers, hidden 512,
8 heads, 4 KV heads, FFN 1536, vocab 8192, untied, RMSNorm eps 1e-5, rope theta 10000)
with a linear ``hidden -> 5`` regression head (the five HelpSteer attributes).

1. Training (tokens/s). The same batch for both: ``--batch`` x ``--seq-len`` random token
   ids in ``1..vocab-1``, each row with its own end index (uniform in ``[seq_len/4,
   seq_len-1]``), right-padded with ``pad_token_id`` (0) after it, and random integer
   labels 0..4 for the five attributes. Loss: mean squared error over the 5 x rows
   labels, AdamW (lr 3e-4 constant, betas 0.9/0.95, eps 1e-8, no weight decay) with
   global-norm gradient clipping at 1.0.

   * Keel: ``Trainer(config, RewardStep(config.rm), parallel).train_step(n)`` (``rm.type=
     regression``) in a 1-rank gloo world (``tests.helpers.single_process_parallel``):
     megatron ``GPTModel`` + ``reward_head``, megatron DDP, forward/backward schedule and
     optimizer. The trainer's data pull is replaced by the fixed batch ``{tokens,
     end_index, attributes}``. Keel uses no attention mask (causal attention; the end
     token sees no padding).
   * HF: ``LlamaForSequenceClassification(num_labels=5, problem_type="regression",
     pad_token_id=0, attn_implementation="sdpa").train()`` called with ``input_ids``,
     ``attention_mask`` and ``labels``: HF pools the rightmost non-pad token (== the end
     index here, checked) and computes ``MSELoss``; then ``clip_grad_norm_(1.0)`` and
     ``torch.optim.AdamW``.

   HF runs as two sides, measured in the same run: ``hf_default`` as above (torch's default
   per-tensor AdamW loop, the padding mask), and ``hf_best``: ``AdamW(fused=True)`` (the
   kernel Keel runs) and no attention mask, which the right padding after the pooled end
   token does not need under causal attention (so SDPA keeps its unmasked path).

2. Training on data (real tokens/s). Rows of the built-in synthetic HelpSteer data set
   (variable length; byte tokenizer, ``plain`` template, ``--seq-len``), ``--data-global-batch``
   rows per step in micro-batches of ``--data-micro-batch``; each timed step takes the next
   rows, the same rows for both sides. The unit is real (non-padding) tokens, the same
   count for both.

   * Keel: a second ``Trainer`` on that data, its own data path: ``data.group_by_length``
     (on by default) orders the step's rows by length into micro-batches and cuts each to
     its longest row; loss = MSE over all labels of the step.
   * ``hf_default``: the micro-batches in the sampler's order, each padded to its longest
     row with a mask (what HF's padding collators do; HF ``Trainer``'s ``group_by_length``
     is off by default), ``loss / micro-batches`` backward per micro-batch (equal sizes:
     the step's mean MSE), then clipping and AdamW.
   * ``hf_best``: the step's rows sorted by length before they are cut into micro-batches
     (``group_by_length``), no mask, fused AdamW.

3. Scoring ((prompt, response) pairs/s). ``--pairs`` random (prompt, response) text
   pairs, encoded by Keel's byte tokenizer (``plain`` template) to ``--seq-len``.

   * Keel: ``RewardScorer(chunks, step, tokenizer, parallel, seq_len, --score-micro-batch).score(rows)``
     on the trained Keel model (encoding, sorting rows by length, micro-batches cut to
     their longest row, megatron forward-only schedule, end selection, original order).
   * HF: the same rows encoded with the same ``scorer._encode`` (so identical token ids
     and end indices), stacked in the given order into micro-batches of the same size and
     padded to each micro-batch's longest row (what HF's padding collators do), forward
     under ``torch.no_grad()`` in eval mode with ``input_ids`` + ``attention_mask``, logits
     pooled by HF at the rightmost non-pad token (``hf_default``); ``hf_best`` sorts the
     rows by length first and passes no mask. Encoding is timed on every side.

Timing, within one process (``--mode one-process``, what each child of ``--mode processes`` runs
for its one side): HF is built first, before Keel's CPU layer patches ``torch.cuda`` process-wide.
Freed host memory is kept in the process for all sides from the start
(``engine/parallel/host_memory.py``, the setting Keel's CPU layer applies), so no side gains
or loses from glibc returning and re-faulting its buffers.
Each side runs ``--warmup`` untimed training steps, then ``--steps`` timed training steps
of each side alternately (A B, B A, A B, ...), so other load and drift hit both alike;
then each side's scoring is warmed up once and ``--score-repeats`` timed scoring calls
alternate the same way. Times are wall clock (``time.perf_counter``) of whole steps /
calls; process CPU time is recorded too. The 1-minute load average before and after
is recorded: on a busy machine absolute numbers are noisy, ratios less so.

    .venv/bin/python tools/bench/reward.py [--out tools/bench/results/reward.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import string
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import Timer, interleave, machine_info, versions, write_report  # noqa: E402

logger = logging.getLogger("bench.reward")
DEFAULT_OUT = REPO / "tools/bench/results/reward.json"
NUM_LABELS = 5
PAD_ID = 0
HF_SIDES = ("hf_default", "hf_best")
NAMES = [*HF_SIDES, "keel"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--preset", default="bench-34m", help="Keel model preset")
    parser.add_argument("--batch", type=int, default=8, help="training rows per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per side")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per side")
    parser.add_argument("--data-global-batch", type=int, default=32, help="rows per step, training on data")
    parser.add_argument("--data-micro-batch", type=int, default=8, help="rows per micro-batch, training on data")
    parser.add_argument("--pairs", type=int, default=64, help="(prompt, response) pairs scored per call")
    parser.add_argument("--score-micro-batch", type=int, default=16)
    parser.add_argument("--score-repeats", type=int, default=2, help="timed scoring calls per side")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mode", default="processes", choices=["processes", "one-process"],
                        help="processes: each side in its own fresh process, --rounds times, A B C, C B A order; "
                             "one-process: the sides of --sides in this process, their calls alternated")
    parser.add_argument("--rounds", type=int, default=2, help="--mode processes: processes per side")
    parser.add_argument("--sides", default=",".join(NAMES), help="sides to run, from " + ", ".join(NAMES))
    args = parser.parse_args(argv)
    args.sides = args.sides.split(",")
    unknown = sorted(set(args.sides) - set(NAMES))
    if unknown:
        parser.error(f"--sides: unknown {unknown} (use {', '.join(NAMES)})")
    args.sides = [name for name in NAMES if name in args.sides]
    return args


# ---------------------------------------------------------------------------- data


def training_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(1, vocab, (args.batch, args.seq_len), generator=gen)
    end_index = torch.randint(args.seq_len // 4, args.seq_len, (args.batch,), generator=gen)
    positions = torch.arange(args.seq_len).unsqueeze(0)
    tokens[positions > end_index.unsqueeze(1)] = PAD_ID
    labels = torch.randint(0, 5, (args.batch, NUM_LABELS), generator=gen).float()
    return {"tokens": tokens, "end_index": end_index, "attributes": labels}


def scoring_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    rng = random.Random(args.seed)
    alphabet = string.ascii_letters + string.digits + " .,?!"
    text = lambda lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [(text(16, args.seq_len // 3), text(16, args.seq_len // 2)) for _ in range(args.pairs)]


# ---------------------------------------------------------------------------- the two sides


def keel_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        f"model.preset={args.preset}", f"data.seq_length={args.seq_len}", f"data.micro_batch_size={args.batch}",
        f"data.global_batch_size={args.batch}", "data.num_samples=64", "data.validation_source=null",
        f"run.seed={args.seed}", f"run.train_steps={args.warmup + args.steps + 8}", f"run.output_dir={run_dir}",
        "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none",
        f"optimizer.lr={args.lr}", "optimizer.min_lr=0.0", "optimizer.weight_decay=0.0", "optimizer.beta1=0.9",
        "optimizer.beta2=0.95", "optimizer.eps=1.0e-8", "optimizer.clip_grad=1.0", "scheduler.type=constant",
        "scheduler.warmup_steps=0", "precision.dtype=fp32",
    ]


def data_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    rows = args.data_global_batch * (args.warmup + args.steps + 2)
    return keel_overrides(args, run_dir) + [
        f"data.micro_batch_size={args.data_micro_batch}", f"data.global_batch_size={args.data_global_batch}",
        f"data.num_samples={rows}", "data.overlong=drop",
    ]


def data_step_groups(args: argparse.Namespace, step: int, rows: int) -> list[list[int]]:
    """Row indices of training-on-data step ``step``, in micro-batches (sampler order)."""
    start = (step * args.data_global_batch) % (rows - args.data_global_batch + 1)
    ids = list(range(start, start + args.data_global_batch))
    return [ids[i: i + args.data_micro_batch] for i in range(0, len(ids), args.data_micro_batch)]


def padding_mask(end_index: torch.Tensor, length: int) -> torch.Tensor:
    return (torch.arange(length).unsqueeze(0) <= end_index.unsqueeze(1)).long()


def hf_data_train_step(model: Any, optimizer: Any, micro_batches: list[dict[str, torch.Tensor]], mask: bool) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        length = int(batch["end_index"].max()) + 1  # padded to the longest row of the micro-batch
        tokens = batch["tokens"][:, :length]
        attention = padding_mask(batch["end_index"], length) if mask else None
        out = model(input_ids=tokens, attention_mask=attention, labels=batch["attributes"])
        (out.loss / len(micro_batches)).backward()
        total += float(out.loss.detach()) / len(micro_batches)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total


def build_hf(args: argparse.Namespace, preset: Any, info: dict[str, Any], fused: bool) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, max_position_embeddings=preset.max_sequence_length,
        rms_norm_eps=preset.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(preset.rotary_base)},
        tie_word_embeddings=preset.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        use_cache=False, attn_implementation="sdpa", num_labels=NUM_LABELS, problem_type="regression",
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(args.seed)
    model = LlamaForSequenceClassification(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=fused or None)
    info["adamw_fused"] = fused
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["attn_implementation"] = model.config._attn_implementation
    info["model_class"] = type(model).__name__
    return model, optimizer


def hf_pool_index(input_ids: torch.Tensor) -> torch.Tensor:
    """The index HF's sequence-classification pooling picks: the rightmost non-pad token."""
    non_pad = (input_ids != PAD_ID).int()
    return (torch.arange(input_ids.shape[-1]) * non_pad).argmax(-1)


def hf_train_step(model: Any, optimizer: Any, batch: dict[str, torch.Tensor], mask: bool) -> float:
    optimizer.zero_grad(set_to_none=True)
    attention = padding_mask(batch["end_index"], batch["tokens"].shape[1]) if mask else None
    out = model(input_ids=batch["tokens"], attention_mask=attention, labels=batch["attributes"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(out.loss.detach())


@torch.no_grad()
def hf_score(model: Any, encode: Callable[[Any, str], dict[str, torch.Tensor]], rows: list[tuple[str, str]],
             micro_batch: int, best: bool) -> torch.Tensor:
    """HF default: the given order, each micro-batch padded to its longest row with an attention mask.
    HF best: rows sorted by length (little padding), no mask (right padding after the pooled token
    cannot reach it through causal attention), outputs put back in the given order."""
    items = [encode(prompt, response) for prompt, response in rows]
    order = sorted(range(len(items)), key=lambda i: int(items[i]["end_index"])) if best else list(range(len(items)))
    outputs = []
    for i in range(0, len(order), micro_batch):
        chunk = [items[j] for j in order[i: i + micro_batch]]
        end = torch.stack([item["end_index"] for item in chunk])
        tokens = torch.stack([item["tokens"] for item in chunk])[:, : int(end.max()) + 1]
        attention = None if best else padding_mask(end, tokens.shape[1])
        outputs.append(model(input_ids=tokens, attention_mask=attention).logits.float())
    result = torch.empty_like(torch.cat(outputs))
    result[torch.tensor(order)] = torch.cat(outputs)
    return result


def ratios(table: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Keel over each HF side: ``{"keel_over_hf_default": {key: ratio}, "keel_over_hf_best": ...}``
    (nothing unless every side is in ``table``)."""
    if any(name not in table for name in NAMES):
        return {}
    return {f"keel_over_{peer}": {key: round(table["keel"][key] / table[peer][key], 3) for key in keys}
            for peer in HF_SIDES}


def keel_parameter_info(trainer: Any) -> dict[str, Any]:
    named = [(n, p) for c in trainer.model.chunks for n, p in c.named_parameters()]
    return {
        "parameters": sum(p.numel() for _, p in named),
        "reward_head_parameters": sum(p.numel() for n, p in named if "reward_head" in n),
        "unused_lm_output_layer_parameters": sum(p.numel() for n, p in named if "output_layer" in n),
        "trainable_parameters": sum(p.numel() for _, p in named if p.requires_grad),
    }


def bench_fixed_shape(args: argparse.Namespace, names: list[str], trainer: Any, loss_name: str,
                      hf: dict[str, tuple[Any, Any]], batch: dict[str, torch.Tensor], threads: int) -> dict[str, Any]:
    """Section 1: the same fixed batch on every side; the ``training`` part of the report.

    ``hf_default`` passes the attention mask a padding collator makes; ``hf_best`` none (the pooled
    end token never sees the right padding through causal attention), like Keel."""
    trainer._next_micro_batches = lambda sampler, dataset: [batch]
    timers = {name: Timer() for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    counter = {"n": 0}

    def keel_train() -> float:
        counter["n"] += 1
        return float(trainer.train_step(counter["n"])[loss_name])

    train_fns: dict[str, Callable[[], float]] = {
        name: partial(hf_train_step, *hf[name], batch, name == "hf_default") for name in hf}
    train_fns["keel"] = keel_train

    def run_train(name: str, timed: bool = True) -> None:
        loss = timers[name].run(train_fns[name], timed)
        losses[name].append(round(loss, 4))
        logger.info("train %s%s: %.3f s, loss %.4f", name, "" if timed else " (warm-up)",
                    (timers[name].times if timed else timers[name].warmup_times)[-1], loss)

    for name in names:
        for _ in range(args.warmup):
            run_train(name, timed=False)
    interleave(names, args.steps, run_train)
    tokens_per_step = args.batch * args.seq_len
    training = {name: {**timers[name].summary(tokens_per_step, "tokens", threads), "losses": losses[name]}
                for name in names}
    return {
        "batch": {"rows": args.batch, "seq_length": args.seq_len, "tokens_per_step": tokens_per_step,
                  "end_index": batch["end_index"].tolist(),
                  "data": "random ids 1..vocab-1, right-padded with pad 0 after each row's end index; "
                          "labels random integers 0..4, 5 attributes; loss MSE (mean over 5 x rows)"},
        "optimizer": {"type": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                      "clip_grad": 1.0},
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        **training,
        **ratios(training, ("tokens_per_s", "tokens_per_s_best", "tokens_per_cpu_s")),
    }


def hf_best_groups(groups: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """HF at its best on data: the step's rows sorted by length, then cut into micro-batches of the same size
    (what HF Trainer's ``group_by_length`` does within a mega-batch)."""
    rows = sorted((i for g in groups for i in g), key=lambda i: lengths[i])
    size = len(groups[0])
    return [rows[i: i + size] for i in range(0, len(rows), size)]


def bench_on_data(args: argparse.Namespace, names: list[str], parallel: Any, run_dir: str,
                  hf: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Section 2: a second Keel trainer with its own data path; the ``training_on_data`` part."""
    from engine.algorithms.reward import RewardStep, RewardTrainConfig
    from engine.config import load_config
    from engine.trainer import Trainer

    config = load_config(RewardTrainConfig, None, data_overrides(args, run_dir + "/data"))
    config.validate(1)
    trainer = Trainer(config, RewardStep(config.rm), parallel)
    dataset = trainer.train_data
    real_tokens: list[int] = []
    positions: dict[str, list[int]] = {name: [] for name in names}
    lengths = [dataset.length(i) for i in range(len(dataset))]
    counter = {"n": 0}

    def train(name: str) -> float:
        groups = data_step_groups(args, counter["n"] // len(names), len(dataset))
        counter["n"] += 1
        if name == names[0]:  # the step's real tokens (a row's length is its end index + 1): the same for every side
            real_tokens.append(sum(lengths[i] for g in groups for i in g))
        if name == "keel":
            trainer.sampler.next_step = lambda: [list(g) for g in groups]
            built = trainer._next_micro_batches(trainer.sampler, dataset)
            positions["keel"].append(sum(int(b["tokens"].numel()) for b in built))
            trainer._next_micro_batches = lambda sampler, ds: built
            try:
                return float(trainer.train_step(counter["n"])[trainer.step.loss_name])
            finally:
                del trainer._next_micro_batches
        if name == "hf_best":
            groups = hf_best_groups(groups, lengths)
        micro = [dataset.collate(g) for g in groups]
        positions[name].append(sum(len(g) * (int(b["end_index"].max()) + 1) for b, g in zip(micro, groups, strict=True)))
        return hf_data_train_step(*hf[name], micro, mask=name == "hf_default")

    timers = {name: Timer() for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str, timed: bool = True) -> None:
        loss = timers[name].run(lambda: train(name), timed)
        losses[name].append(round(loss, 4))
        logger.info("train on data %s%s: %.3f s, loss %.4f", name, "" if timed else " (warm-up)",
                    (timers[name].times if timed else timers[name].warmup_times)[-1], loss)

    # Warm-up and timed calls come in (hf_default, hf_best, keel) triples on the same rows.
    for _ in range(args.warmup):
        for name in names:
            run(name, timed=False)
    interleave(names, args.steps, run)
    return on_data_section(args, names, timers, losses, real_tokens[args.warmup:],
                           {name: positions[name][args.warmup:] for name in names})


def on_data_section(args: argparse.Namespace, names: list[str], timers: dict[str, Timer],
                    losses: dict[str, list[float]], timed_tokens: list[int],
                    positions: dict[str, list[int]]) -> dict[str, Any]:
    sides = {name: {
        "real_tokens_per_s": round(sum(timed_tokens) / sum(timers[name].times), 2),
        "real_tokens_per_cpu_s": round(sum(timed_tokens) / sum(timers[name].cpu_times), 2),
        "positions_computed_per_step": positions[name],
        "times_s": [round(t, 4) for t in timers[name].times],
        "cpu_times_s": [round(t, 4) for t in timers[name].cpu_times],
        "warmup_times_s": [round(t, 4) for t in timers[name].warmup_times],
        "losses": losses[name],
    } for name in names}
    return {
        "data": "builtin:helpsteer rows (synthetic, variable length), byte tokenizer, plain template, "
                f"seq_length {args.seq_len}, over-long rows dropped",
        "global_batch_rows": args.data_global_batch, "micro_batch_rows": args.data_micro_batch,
        "real_tokens_per_step": timed_tokens,
        **sides,
        **ratios(sides, ("real_tokens_per_s", "real_tokens_per_cpu_s")),
        "note": "Keel groups the step's rows by length into micro-batches and cuts padding "
                "(data.group_by_length, default). hf_default pads each micro-batch, in sampler order, to its longest "
                "row and passes the attention mask; hf_best sorts the step's rows by length first (group_by_length) "
                "and passes no mask (right padding only follows the pooled token)",
    }


def bench_scoring(args: argparse.Namespace, names: list[str], trainer: Any, parallel: Any,
                  hf: dict[str, tuple[Any, Any]], checks: dict[str, Any], threads: int) -> dict[str, Any]:
    """Section 3: scoring the same rows; the ``scoring`` part of the report."""
    from engine.eval.scoring import RewardScorer

    rows = scoring_rows(args)
    scorer = RewardScorer(trainer.model.chunks, trainer.step, trainer.tokenizer, parallel, args.seq_len,
                          args.score_micro_batch, trainer.config.data.chat_template)
    for model, _ in hf.values():
        model.eval()
    encoded = [scorer._encode(p, r) for p, r in rows]
    ends = torch.stack([e["end_index"] for e in encoded])
    checks["hf_pool_index_equals_end_index_score"] = bool(
        (hf_pool_index(torch.stack([e["tokens"] for e in encoded])) == ends).all())
    checks["score_tokens_min_max_len"] = [int(ends.min()) + 1, int(ends.max()) + 1]
    score_fns: dict[str, Callable[[], torch.Tensor]] = {
        name: partial(hf_score, hf[name][0], scorer._encode, rows, args.score_micro_batch, name == "hf_best")
        for name in hf}
    score_fns["keel"] = lambda: scorer.score(rows)
    if "hf_best" in hf:  # sorted without a mask == given order with one, on the same model
        checks["hf_best_scores_equal_hf_default_max_abs_diff"] = float((score_fns["hf_best"]() - hf_score(
            hf["hf_best"][0], scorer._encode, rows, args.score_micro_batch, False)).abs().max())
    timers = {name: Timer() for name in names}
    shapes: dict[str, list[int]] = {}

    def run_score(name: str, timed: bool = True) -> None:
        out = timers[name].run(score_fns[name], timed)
        shapes[name] = list(out.shape)
        logger.info("score %s%s: %.3f s", name, "" if timed else " (warm-up)",
                    (timers[name].times if timed else timers[name].warmup_times)[-1])

    for name in names:
        run_score(name, timed=False)
    interleave(names, args.score_repeats, run_score)
    checks["score_output_shapes"] = shapes
    for chunk in trainer.model.chunks:
        chunk.train()
    scoring = {name: timers[name].summary(args.pairs, "pairs", threads) for name in names}
    return {
        "pairs": args.pairs, "micro_batch_size": args.score_micro_batch, "seq_length": args.seq_len,
        "tokenizer": type(trainer.tokenizer).__name__, "template": "plain",
        "unit": "pairs = (prompt, response) rows scored, one reward vector [5] each",
        "warmup_calls": 1, "timed_calls": args.score_repeats,
        **scoring,
        **ratios(scoring, ("pairs_per_s", "pairs_per_s_best", "pairs_per_cpu_s")),
        "note": "hf_default scores in the given order with an attention mask; hf_best sorts the rows by length "
                "and passes no mask (checks: hf_best_scores_equal_hf_default_max_abs_diff)",
    }


def shape_info(args: argparse.Namespace, preset: Any) -> dict[str, Any]:
    return {
        "preset": args.preset, "num_layers": preset.num_layers, "hidden_size": preset.hidden_size,
        "ffn_hidden_size": preset.ffn_hidden_size, "num_attention_heads": preset.num_attention_heads,
        "num_query_groups": preset.num_query_groups, "vocab_size": preset.vocab_size,
        "tie_embeddings": preset.tie_embeddings, "rms_norm_eps": preset.layernorm_epsilon,
        "rope_theta": preset.rotary_base, "num_labels": NUM_LABELS, "pad_token_id": PAD_ID,
    }


def assemble_report(args: argparse.Namespace, preset: Any, threads: int, hf_info: dict[str, Any],
                    keel_info: dict[str, Any], training: dict[str, Any], on_data: dict[str, Any],
                    scoring: dict[str, Any], checks: dict[str, Any], load_before: tuple[float, ...],
                    load_after: tuple[float, ...], wall: float) -> dict[str, Any]:
    """The JSON report (``load_*``: :func:`os.getloadavg` before and after the run)."""
    return {
        "benchmark": "reward", "machine": machine_info(), "versions": versions(), "torch_threads": threads,
        "dtype": "float32", "device": "cpu", "layout": "TP1 PP1 DP1 (1 process, gloo)",
        "shape": shape_info(args, preset),
        "parameters": {
            "hf": next((info["parameters"] for info in hf_info.values()), None), "keel": keel_info["parameters"],
            "keel_reward_head": keel_info["reward_head_parameters"],
            "keel_unused_lm_output_layer": keel_info["unused_lm_output_layer_parameters"],
            "keel_trainable": keel_info["trainable_parameters"],
            "note": "Keel's RewardGPTModel keeps GPTModel's LM output layer (frozen, not used in the forward) so "
                    "SFT checkpoints load; HF's score head has no bias, Keel's reward_head has one",
        },
        "hf_info": hf_info,
        "training": training, "training_on_data": on_data, "scoring": scoring,
        "checks": checks, "timing_method": TIMING_METHOD,
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "load_average_5m": {"before": round(load_before[1], 2), "after": round(load_after[1], 2)},
        "machine_busy": max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5,
        "run_wall_s": round(wall, 1),
    }


TIMING_METHOD = (
    "one process, HF built first (before Keel's CPU layer), then Keel's Trainer; warm-up steps per side, "
    "then timed training steps alternate A B, B A, ... (wall clock per whole step: zero-grad, forward, "
    "loss, backward, clip, AdamW); then one warm-up scoring call per side and timed scoring calls "
    "alternating the same way (encoding + forward of all pairs). rate = units x calls / sum of times; "
    "cpu_utilisation = process CPU time / wall / threads (well below 1 = the machine was busy). Freed host "
    "memory is kept in the process for every side from the start (engine/parallel/host_memory.py, what Keel's "
    "CPU layer sets), so glibc's trimming helps or hurts no side"
)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("engine", "megatron", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.mode == "processes":
        from tools.bench.reward_processes import main_processes

        return main_processes(args)
    return run_one_process(args)


def run_one_process(args: argparse.Namespace) -> int:
    """The sides of ``--sides`` in this process, their calls alternated; writes ``--out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from engine.config import ModelConfig
    from engine.models.presets import resolve_preset

    preset = resolve_preset(ModelConfig(preset=args.preset))
    batch = training_batch(args, preset.vocab_size)
    names = args.sides
    hf_info: dict[str, Any] = {name: {} for name in HF_SIDES if name in names}
    checks: dict[str, Any] = {"hf_pool_index_equals_end_index_train":
                              bool((hf_pool_index(batch["tokens"]) == batch["end_index"]).all())}
    load_before = os.getloadavg()
    began = time.perf_counter()

    # One process, so one allocator for every side: the settings Keel's CPU layer would apply anyway, from the start.
    from engine.parallel.host_memory import retain_freed_memory

    checks["host_memory_retained_all_sides"] = retain_freed_memory()
    # HF first: before Keel's CPU layer patches torch.cuda process-wide.
    hf = {name: build_hf(args, preset, hf_info[name], fused=name == "hf_best") for name in hf_info}

    import megatron.core.pipeline_parallel  # noqa: F401

    from engine.algorithms.reward import RewardStep, RewardTrainConfig
    from engine.config import load_config
    from engine.parallel import cpu
    from engine.trainer import Trainer
    from tests.helpers import single_process_parallel

    with tempfile.TemporaryDirectory(prefix="keel-rm-bench-") as run_dir:
        config = load_config(RewardTrainConfig, None, keel_overrides(args, run_dir))
        config.validate(1)
        with single_process_parallel(seed=args.seed) as parallel:
            step = RewardStep(config.rm)
            trainer = Trainer(config, step, parallel)
            keel_info = keel_parameter_info(trainer)
            training = bench_fixed_shape(args, names, trainer, step.loss_name, hf, batch, threads)
            on_data = bench_on_data(args, names, parallel, run_dir, hf)
            scoring = bench_scoring(args, names, trainer, parallel, hf, checks, threads)
        cpu.deactivate()

    wall = time.perf_counter() - began
    load_after = os.getloadavg()
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch threads changed from {threads} to {torch.get_num_threads()} during the run")
    report = assemble_report(args, preset, threads, hf_info, keel_info, training, on_data, scoring, checks,
                             load_before, load_after, wall)
    report.update(mode="one-process", sides=names)
    write_report(args.out, report)
    for peer in (HF_SIDES if names == NAMES else ()):
        logger.info("keel over %s: training tokens/s %.3f, on data real tokens/s %.3f, scoring pairs/s %.3f", peer,
                    training[f"keel_over_{peer}"]["tokens_per_s"], on_data[f"keel_over_{peer}"]["real_tokens_per_s"],
                    scoring[f"keel_over_{peer}"]["pairs_per_s"])
    logger.info("-> %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
