"""Benchmark Keel's DPO step against TRL's ``DPOTrainer`` on the same model shape, pairs and batch.

One process per measurement (CPU, fp32, TP1), sides run one after the other, never at once:

* **Keel**: ``Trainer(config, DPOStep)`` on the ``bench-34m`` preset, pairs from the
  built-in HelpSteer-style rows (higher helpfulness chosen) tokenised by ``builtin-sp``,
  ``--batch`` pairs per step in one micro-batch (chosen and rejected in one forward), rows
  grouped by length and cut to the longest. ``live``: the frozen reference model runs
  forward each step; ``stored``: reference log-probs precomputed once
  (``keel data ref-logprobs``), no reference model.
* **TRL**: ``DPOTrainer`` on ``LlamaForCausalLM`` of the same shape (SDPA attention), fed
  *exactly Keel's token ids* (its dataset preparation is replaced by Keel's prompt/response
  ids), the same batch, β, LR, betas, clipping. ``default``: TRL's defaults (``adamw_torch``,
  live reference model, padded batches); ``best``: ``adamw_torch_fused`` (the kernel Keel
  uses) and ``precompute_ref_log_probs=True`` (no reference forward per step). TRL 1.16's
  ``padding_free`` is disabled since its DPO refactor (it warns and pads; ``--trl-padding-free``
  tries it anyway), and ``DPOTrainer`` has no length grouping of its own, so padding to the
  longest row of the batch is TRL's best here, as it is Keel's.

Each run does ``--warmup`` untimed steps then ``--steps`` timed ones; pairs/s = pairs per
step × timed steps / their wall time. Reference precomputation is outside the timed steps
on both sides. Peak memory (``ru_maxrss`` of the child process, via ``wait4``) is
recorded for every run, so Keel with the live reference and with stored log-probs are
compared directly. The 1-minute load average before and after each run is recorded: a
result is only valid when nothing else ran (``machine_quiet``).

    python tools/bench/dpo.py [--out tools/bench/results/dpo.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import machine_info, print_result, run_child, versions, write_report  # noqa: E402

DEFAULT_OUT = REPO / "tools/bench/results/dpo.json"
LR, BETA = 5e-6, 0.1


def keel_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        "model.preset=bench-34m", "data.source=builtin:helpsteer", "data.validation_source=builtin:helpsteer",
        "data.format=attributes", "data.tokenizer=builtin-sp", f"data.seq_length={args.seq_len}",
        f"data.num_samples={args.rows}", f"data.micro_batch_size={args.batch}", f"data.global_batch_size={args.batch}",
        f"run.train_steps={args.warmup + args.steps}", f"run.output_dir={run_dir}", "logging.tensorboard=false",
        "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none", f"dpo.beta={BETA}",
        f"optimizer.lr={LR}", "optimizer.weight_decay=0.0", "optimizer.clip_grad=1.0", "scheduler.type=constant",
        "scheduler.warmup_steps=0", "precision.dtype=fp32", "dpo.reference=init",
    ]


def keel_pairs(args: argparse.Namespace) -> Any:
    """Keel's train pairs (the ids both sides train on)."""
    from engine.algorithms.dpo import DPOTrainConfig
    from engine.config import load_config
    from engine.data.dpo import DPOPairs
    from engine.data.tokenizers import load_tokenizer

    config = load_config(DPOTrainConfig, None, keel_overrides(args, "/tmp/unused"))
    return DPOPairs.from_config(config, load_tokenizer(config.data.tokenizer))[0], config


def run_keel(args: argparse.Namespace) -> dict[str, Any]:
    from engine.algorithms.dpo import DPOStep, DPOTrainConfig
    from engine.algorithms.dpo_reference import precompute
    from engine.config import load_config
    from engine.trainer import Trainer
    from tests.helpers import single_process_parallel

    with tempfile.TemporaryDirectory(prefix="keel-dpo-bench-") as run_dir, \
            single_process_parallel(seed=1234) as parallel:
        overrides = keel_overrides(args, run_dir)
        if args.variant == "stored":
            stored = Path(run_dir) / "reference.jsonl"
            began = time.perf_counter()
            precompute(load_config(DPOTrainConfig, None, overrides), parallel, stored, progress_bar=False)
            precompute_s = time.perf_counter() - began
            overrides += ["dpo.reference=null", f"dpo.reference_logprobs={stored}"]
        config = load_config(DPOTrainConfig, None, overrides)
        trainer = Trainer(config, DPOStep(config.dpo), parallel)
        times, tokens = [], 0.0
        for n in range(1, args.warmup + args.steps + 1):
            began = time.perf_counter()
            metrics = trainer.train_step(n)
            if n > args.warmup:
                times.append(time.perf_counter() - began)
                tokens += metrics["tokens"]
        result = {"step_times_s": times, "padded_tokens_per_step": tokens / len(times)}
        if args.variant == "stored":
            result["reference_precompute_s"] = precompute_s
        return result


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from engine.models.presets import PRESETS

    pairs, _ = keel_pairs(args)
    rows = [{"prompt_ids": c[:cp], "chosen_ids": c[cp:], "rejected_ids": r[rp:]}
            for (c, cp), (r, rp), _ in pairs.pairs]
    preset = PRESETS["bench-34m"]
    vocab = {f"t{i}": i for i in range(preset.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t2", bos_token="t1")
    config = LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, max_position_embeddings=preset.max_sequence_length,
        rms_norm_eps=preset.layernorm_epsilon, tie_word_embeddings=preset.tie_embeddings, attention_bias=False,
        mlp_bias=False, hidden_act="silu", use_cache=False, attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": float(preset.rotary_base)},
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).float()
    best = args.variant == "best"
    times: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, state_args: Any, state: Any, *a: Any, **k: Any) -> None:
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.began)

    class PretokenisedDPO(DPOTrainer):  # type: ignore[misc]
        def _prepare_dataset(self, dataset: Any, *a: Any, **k: Any) -> Any:
            return dataset  # already Keel's prompt/chosen/rejected ids

    with tempfile.TemporaryDirectory(prefix="trl-dpo-bench-") as out:
        dpo_args = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=LR, beta=BETA, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, max_length=args.seq_len, logging_steps=1000, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=1234, disable_tqdm=True,
            optim="adamw_torch_fused" if best else "adamw_torch", precompute_ref_log_probs=best,
            padding_free=best and args.trl_padding_free,
        )
        trainer = PretokenisedDPO(model=model, ref_model=copy.deepcopy(model).eval(), args=dpo_args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
        trainer.train()
    return {"step_times_s": times, "optim": dpo_args.optim, "precompute_ref_log_probs": best,
            "padding_free": dpo_args.padding_free}


def child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = run_keel(args) if args.side == "keel" else run_trl(args)
    pairs, _ = keel_pairs(args)
    lengths = [len(c) + len(r) for (c, _), (r, _), _ in pairs.pairs]
    result.update(pairs_per_step=args.batch, mean_pair_tokens=sum(lengths) / len(lengths))
    result["pairs_per_s"] = args.batch * len(result["step_times_s"]) / sum(result["step_times_s"])
    print_result(result)
    return 0


def measure(side: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--side", side, "--variant", variant, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
           "--rows", str(args.rows), "--threads", str(args.threads)] + (["--trl-padding-free"] if args.trl_padding_free else [])
    result = run_child(cmd, f"{side}/{variant}", REPO, env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    load_before = result["load_1m_before"] = result["load_before"]["1m"]
    result["load_1m_after"] = result["load_after"]["1m"]
    print(f"{side:5s} {variant:8s} {result['pairs_per_s']:.2f} pairs/s, peak RSS {result['peak_rss_mib']:.0f} MiB "
          f"(load {load_before:.1f} -> {result['load_1m_after']:.1f})", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1024, help="built-in HelpSteer rows to pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-padding-free", action="store_true", help="try TRL's padding_free in 'best'")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="keel", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="stored", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs = {f"{side}_{variant}": measure(side, variant, args)
            for side, variant in (("trl", "default"), ("trl", "best"), ("keel", "live"), ("keel", "stored"))}
    best_keel = max(runs["keel_live"]["pairs_per_s"], runs["keel_stored"]["pairs_per_s"])
    report = {
        "benchmark": "dpo", "shape": "bench-34m", "batch_pairs": args.batch, "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "machine": machine_info(), "versions": versions(),
        "runs": runs,
        "keel_best_over_trl_best": best_keel / runs["trl_best"]["pairs_per_s"],
        "keel_best_over_trl_default": best_keel / runs["trl_default"]["pairs_per_s"],
        "keel_stored_over_live_peak_rss": runs["keel_stored"]["peak_rss_mib"] / runs["keel_live"]["peak_rss_mib"],
        "machine_quiet": all(r["load_1m_before"] < 2.5 and r["load_1m_after"] < 3.5 for r in runs.values()),
    }
    write_report(Path(args.out), report)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("keel_") or k == "machine_quiet"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
