"""Benchmark Keel's native generation backend against Hugging Face ``generate`` on the same weights.

CPU, fp32, greedy, the same number of torch threads on both sides (``--threads``, default 2).
Default shape: the ``bench-34m`` preset, a batch of 8 random prompts of 128 tokens, 128 new
tokens per row, no stop token (every row generates exactly ``--new-tokens``).

The same weights on both sides:

1. **Keel** (one child process, a 1-rank gloo world via ``single_process_parallel``): the
   training model is built by ``engine.runner.build_model`` with ``model.init=layout_invariant``
   (TP1/PP1, local layer spec); its state is exported with ``engine.convert.llama.megatron_to_hf``
   and written as a transformers directory (``config.json`` from ``hf_config_for`` +
   ``model.safetensors``, what ``keel convert keel-to-hf`` writes). The generation layout is
   ``GenerationParallelState.initialize(1)``; ``NativeBackend(config, state, max_batch_size=batch)``
   gets its weights from ``Resharder(training chunks, backend).reshard()``; the training model is
   then dropped. Timed: ``backend.generate(prompts, SamplingParams(max_new_tokens=N))`` (greedy;
   it also computes each token's log-probability, which rollouts need). Each call reorders the
   weights into oneDNN's layout once (``packed_weight_bytes``; ``engine/generation/decoder.py``),
   inside the timed call.
2. **HF** (a second child process, after the first has exited, so Keel's CPU layer never patches
   torch under HF): ``LlamaForCausalLM.from_pretrained(that directory, attn_implementation="sdpa")``,
   EOS disabled, ``model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N)``
   under ``torch.inference_mode()``, with its default dynamic cache and with
   ``cache_implementation="static"``. On CPU transformers does not auto-compile the static-cache
   forward (it does so only on cuda/xpu/neuron/tpu), so both run eagerly. HF's process keeps freed
   host memory as Keel's CPU layer does (``engine/parallel/host_memory.py``). "HF best" is the faster
   of the two. The two HF modes alternate (A B, B A, ...) so drift hits both alike.

Each side: ``--warmup`` untimed calls, then ``--runs`` timed calls; a call's rate is
batch x new tokens / its wall time (``time.perf_counter`` around the whole call: prefill and
decode), and the median call is reported (``new_tokens_per_s_median``). The greedy tokens of the
last call are compared position by position: ``token_agreement`` is the fraction of identical
tokens, ``prefix_agreement`` the mean fraction of each row before the first difference (after a
difference the rows continue from different text, so later tokens differ for that reason alone).
The 1-minute load average before and after each child is recorded; a result is trustworthy only
when nothing else ran (``machine_busy`` false).

    python tools/bench/generate.py [--out tools/bench/results/generate.json]
    python tools/bench/generate.py --quick     # smoke test: 2 layers, 16 + 16 tokens, 1 run
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import (  # noqa: E402
    Timer,
    interleave,
    machine_busy,
    machine_info,
    print_result,
    run_child,
    trim_memory,
    versions,
    write_report,
)

logger = logging.getLogger("bench.generate")
DEFAULT_OUT = REPO / "tools/bench/results/generate.json"
QUICK_OUT = REPO / "tools/bench/results/generate_quick.json"
TARGET_KEEL_OVER_HF_BEST = 1.5
HF_MODES = ("dynamic", "static")
FULL = {"prompt_len": 128, "new_tokens": 128, "runs": 3, "warmup": 1, "model_override": []}
QUICK = {"prompt_len": 16, "new_tokens": 16, "runs": 1, "warmup": 1, "model_override": ["num_layers=2"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}, "
                        f"with --quick {QUICK_OUT.relative_to(REPO)})")
    parser.add_argument("--preset", default="bench-34m", help="Keel model preset")
    parser.add_argument("--model-override", action="append", default=None, metavar="KEY=VALUE",
                        help="model.* shape overrides (repeatable)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call (one batch)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128)")
    parser.add_argument("--runs", type=int, default=None, help="timed generate calls per side (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per side first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for both sides")
    parser.add_argument("--seed", type=int, default=1234, help="weights and prompts")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, 16 + 16 tokens, 1 timed run")
    parser.add_argument("--child", choices=["keel", "hf"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if min(args.batch, args.prompt_len, args.new_tokens, args.runs, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --prompt-len, --new-tokens, --runs and --threads must be >= 1, --warmup >= 0")
    return args


def child_argv(args: argparse.Namespace, side: str, weights_dir: str) -> list[str]:
    """The command line of one side's child process (the parent's options, made explicit)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--weights-dir", weights_dir,
            "--preset", args.preset, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
            "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--seed", str(args.seed)]
    for override in args.model_override:
        argv += ["--model-override", override]
    return argv


def random_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` uniform random token ids (the same on both sides)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, vocab_size, (args.batch, args.prompt_len), generator=generator).tolist()


def keel_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [f"model.preset={args.preset}", *[f"model.{o}" for o in args.model_override],
            "model.init=layout_invariant", "model.layer_spec=local", "precision.dtype=fp32",
            f"run.seed={args.seed}", f"run.output_dir={run_dir}", "logging.tensorboard=false",
            "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none"]


# ---------------------------------------------------------------------------- the two sides (child processes)


def keel_backend(args: argparse.Namespace, config: Any, parallel: Any) -> tuple[Any, dict[str, Any]]:
    """Build the training model, export it for HF, reshard it into a TP1 native backend; drop the training model."""
    from engine.convert.hf import write_hf_state
    from engine.convert.llama import megatron_to_hf
    from engine.generation.native import NativeBackend
    from engine.generation.reshard import Resharder
    from engine.parallel.generation_layout import GenerationParallelState
    from engine.runner import build_model

    chunks, preset, _ = build_model(config, parallel, wrap_ddp=False)
    write_hf_state(args.weights_dir, preset, megatron_to_hf(dict(chunks[0].state_dict()), preset))
    backend = NativeBackend(config, GenerationParallelState.initialize(1), max_batch_size=args.batch)
    reshard = Resharder(chunks, backend).reshard()
    info = {"parameters": sum(p.numel() for c in chunks for p in c.parameters()),
            "preset_parameter_count": preset.parameter_count(),
            "reshard_seconds": round(reshard["seconds"], 4), "vocab_size": preset.vocab_size}
    del chunks
    trim_memory()
    return backend, info


def run_keel(args: argparse.Namespace) -> dict[str, Any]:
    from engine.config import TrainConfig, load_config
    from engine.generation.base import SamplingParams
    from engine.parallel.layout import single_process_parallel

    with tempfile.TemporaryDirectory(prefix="keel-gen-bench-") as run_dir, \
            single_process_parallel(seed=args.seed) as parallel:
        config = load_config(TrainConfig, None, keel_overrides(args, run_dir))
        backend, info = keel_backend(args, config, parallel)
        prompts = random_prompts(args, info["vocab_size"])
        params = SamplingParams(max_new_tokens=args.new_tokens)
        timer = Timer()
        for _ in range(args.warmup):
            timer.run(lambda: backend.generate(prompts, params), timed=False)
        for _ in range(args.runs):
            rollouts = timer.run(lambda: backend.generate(prompts, params))
        if any(n != args.new_tokens for n in rollouts.lengths):
            raise RuntimeError(f"Keel generated {rollouts.lengths} tokens per row, expected {args.new_tokens}")
        return {**timer.summary(args.batch * args.new_tokens, "new_tokens", torch.get_num_threads()),
                "tokens": rollouts.tokens, "kv_cache_bytes": backend.stats.get("kv_cache_bytes"),
                "packed_weight_bytes": backend.stats.get("packed_weight_bytes"), **info}


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from engine.parallel.host_memory import retain_freed_memory

    retained = retain_freed_memory()  # the allocator settings Keel's CPU layer gives its own side
    model = LlamaForCausalLM.from_pretrained(str(args.weights_dir), dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # no stop token: every row generates max_new_tokens, as on Keel's side
    model.generation_config.pad_token_id = 0
    input_ids = torch.tensor(random_prompts(args, model.config.vocab_size))
    attention_mask = torch.ones_like(input_ids)
    timers = {mode: Timer() for mode in HF_MODES}
    outputs: dict[str, torch.Tensor] = {}

    def call(mode: str, timed: bool = True) -> None:
        extra = {"cache_implementation": "static"} if mode == "static" else {}
        with torch.inference_mode():
            outputs[mode] = timers[mode].run(lambda: model.generate(
                input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=args.new_tokens,
                **extra), timed)

    for mode in HF_MODES:
        for _ in range(args.warmup):
            call(mode, timed=False)
    interleave(list(HF_MODES), args.runs, call)
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                              "attn_implementation": model.config._attn_implementation,
                              "host_memory_retained": retained}
    for mode in HF_MODES:
        if outputs[mode].shape[1] != args.prompt_len + args.new_tokens:
            raise RuntimeError(f"HF ({mode} cache) returned {outputs[mode].shape[1]} positions per row, expected "
                               f"{args.prompt_len + args.new_tokens}")
        result[mode] = {**timers[mode].summary(args.batch * args.new_tokens, "new_tokens", torch.get_num_threads()),
                        "tokens": outputs[mode][:, args.prompt_len:].tolist()}
    return result


def child(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    result = run_keel(args) if args.child == "keel" else run_hf(args)
    result["torch_threads"] = torch.get_num_threads()
    print_result(result)
    return 0


# ---------------------------------------------------------------------------- the report (parent process)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Fraction of identical tokens, of rows identical throughout, and mean fraction of each row before the first difference."""
    same = total = whole = 0
    prefix = 0.0
    for row_a, row_b in zip(a, b, strict=True):
        matches = [x == y for x, y in zip(row_a, row_b, strict=True)]
        same += sum(matches)
        total += len(matches)
        first = matches.index(False) if False in matches else len(matches)
        prefix += first / len(matches)
        whole += first == len(matches)
    return {"token_agreement": round(same / total, 4), "rows_identical": round(whole / len(a), 4),
            "prefix_agreement": round(prefix / len(a), 4)}


def side_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "tokens"}


def build_report(args: argparse.Namespace, keel: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    rate = "new_tokens_per_s_median"
    best = max(HF_MODES, key=lambda mode: hf[mode][rate])
    ratio = keel[rate] / hf[best][rate]
    hf_info = {k: v for k, v in hf.items() if k not in HF_MODES}
    return {
        "benchmark": "generate", "quick": args.quick, "machine": machine_info(), "versions": versions(),
        "torch_threads": {"keel": keel["torch_threads"], "hf": hf["torch_threads"]},
        "dtype": "float32", "device": "cpu",
        "shape": {"preset": args.preset, "model_overrides": args.model_override, "parameters": keel["parameters"],
                  "batch": args.batch, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                  "prompts": "uniform random token ids, the same for both", "sampling": "greedy, no stop token"},
        "warmup_calls": args.warmup, "timed_calls": args.runs,
        "method": ("one child process per side, Keel first (it exports the weights HF loads); rate = batch x new "
                   "tokens / wall time of one whole generate call; the median call is reported. HF dynamic and "
                   "static alternate A B, B A, ...; HF is not compiled (transformers auto-compiles the static "
                   "cache only on accelerators)"),
        "keel": side_summary(keel),
        "hf_dynamic_cache": side_summary(hf["dynamic"]),
        "hf_static_cache": side_summary(hf["static"]),
        "hf_info": hf_info,
        "hf_best": best,
        "keel_over_hf_best_new_tokens_per_s": round(ratio, 3),
        "keel_over_hf_dynamic_new_tokens_per_s": round(keel[rate] / hf["dynamic"][rate], 3),
        "keel_over_hf_static_new_tokens_per_s": round(keel[rate] / hf["static"][rate], 3),
        "target_keel_over_hf_best": TARGET_KEEL_OVER_HF_BEST,
        "meets_target": ratio >= TARGET_KEEL_OVER_HF_BEST,
        "greedy_agreement": {"keel_vs_hf_dynamic": agreement(keel["tokens"], hf["dynamic"]["tokens"]),
                             "keel_vs_hf_static": agreement(keel["tokens"], hf["static"]["tokens"]),
                             "hf_dynamic_vs_static": agreement(hf["dynamic"]["tokens"], hf["static"]["tokens"])},
        "load_average": {"keel": {"before": keel["load_before"], "after": keel["load_after"]},
                         "hf": {"before": hf["load_before"], "after": hf["load_after"]}},
        "machine_busy": machine_busy(keel["load_before"], keel["load_after"], hf["load_before"], hf["load_after"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory(prefix="keel-gen-bench-weights-") as weights_dir:
        keel = run_child(child_argv(args, "keel", weights_dir), "keel generate", REPO, env)
        hf = run_child(child_argv(args, "hf", weights_dir), "HF generate", REPO, env)
    if keel["parameters"] != hf["parameters"]:
        raise SystemExit(f"parameter counts differ: keel {keel['parameters']}, hf {hf['parameters']}")
    report = build_report(args, keel, hf)
    write_report(args.out, report)
    rate = "new_tokens_per_s_median"
    print(f"new tokens/s (median of {args.runs}): keel {keel[rate]:.1f}, HF dynamic {hf['dynamic'][rate]:.1f}, "
          f"HF static {hf['static'][rate]:.1f}; keel / HF best ({report['hf_best']}) "
          f"{report['keel_over_hf_best_new_tokens_per_s']:.3f} (target {TARGET_KEEL_OVER_HF_BEST}); greedy token "
          f"agreement with HF {report['greedy_agreement']['keel_vs_hf_dynamic']['token_agreement']:.3f}; "
          f"machine busy: {report['machine_busy']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
