"""GPU benchmark: Keel's native generation backend against Hugging Face ``generate`` on the same shape.

Default: ``bench-1b`` (1.26B), a batch of 64 random prompts of 128 tokens, 256 new tokens per row,
greedy, no stop token (every row generates exactly ``--new-tokens``): the generation rows of the peer
table in ``../shared/gpu/README.md``. Random weights on both sides (speed only: nothing compares their
tokens). Each side runs alone in a fresh process:

* ``keel``: ``NativeBackend`` at generation TP1 on the TE spec in bf16 (megatron's modules with its
  static KV cache), weights drawn in place (normal, std 0.02); ``generate(prompts, SamplingParams(
  max_new_tokens=N))``, which also computes every token's log-prob, as rollouts need.
* ``hf_dynamic`` / ``hf_static``: ``LlamaForCausalLM`` (SDPA, bf16), ``generate(do_sample=False,
  min_new_tokens=N, max_new_tokens=N)`` with the default dynamic cache, and with
  ``cache_implementation="static"``, whose decode transformers compiles on CUDA (the peer at its best).

``--warmup`` untimed calls (compilation), then ``--runs`` timed calls, synchronised; reported: the
median call's new tokens/s and peak ``max_memory_allocated``. It has not run on a GPU yet;
``--allow-cpu`` smoke-tests the code path (local spec, fp32; numbers mean nothing).

    python tools/bench/gpu_generate.py [--sides keel,hf_dynamic,hf_static] [--out FILE]
    python tools/bench/gpu_generate.py --allow-cpu --preset tiny-llama --batch 2 --prompt 8 --new-tokens 8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.gpu_common import bench_parser, drive, hf_llama, on_gpu, preset_of, summary, timed  # noqa: E402

DEFAULT_OUT = REPO / "tools" / "bench" / "results" / "gpu_generate.json"
SIDES = ("keel", "hf_dynamic", "hf_static")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, DEFAULT_OUT, SIDES)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args(argv)


def _prompts(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(args.seed))


def keel_call(args: argparse.Namespace, info: dict[str, Any]) -> Callable[[], None]:
    from engine.config import TrainConfig, load_config
    from engine.generation.base import SamplingParams
    from engine.generation.native import NativeBackend
    from engine.parallel.generation_layout import GenerationParallelState
    from engine.parallel.layout import ParallelLayout, ParallelState

    overrides = [f"model.preset={args.preset}"] + (["model.layer_spec=te", "precision.dtype=bf16"] if on_gpu()
                                                   else ["model.layer_spec=local"])
    config = load_config(TrainConfig, None, overrides)
    ParallelState.initialize(ParallelLayout.from_config(config.parallel, 1), seed=args.seed)
    backend = NativeBackend(config, GenerationParallelState.initialize(1), max_batch_size=args.batch)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        for name, param in backend.params.items():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    backend.update_weights(backend.params.items())  # in place: marks every weight as loaded
    prompts = _prompts(args, backend.preset.vocab_size).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens)
    info.update(config_overrides=overrides, decoder="cached" if backend.decoder is not None else "megatron")

    def call() -> None:
        rollouts = backend.generate(prompts, params)
        assert sum(rollouts.lengths) == args.batch * args.new_tokens, rollouts.finish_reasons[:4]

    return call


def hf_call(args: argparse.Namespace, static: bool, info: dict[str, Any]) -> Callable[[], None]:
    preset = preset_of(args.preset)
    torch.manual_seed(args.seed)
    model = hf_llama(preset, use_cache=True).eval()
    prompts = _prompts(args, preset.vocab_size).to(model.device)
    mask = torch.ones_like(prompts)
    options: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    info.update(dtype=str(model.dtype), cache="static" if static else "dynamic")

    def call() -> None:
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0, **options)
        assert out.shape == (args.batch, args.prompt + args.new_tokens), out.shape

    return call


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"side": args.side}
    makers = {"keel": lambda: keel_call(args, info), "hf_dynamic": lambda: hf_call(args, False, info),
              "hf_static": lambda: hf_call(args, True, info)}
    call = makers[args.side]()
    _, times = timed(lambda n: call(), args.warmup, args.runs)
    info.update(summary(times))
    info.update(new_tokens_per_s=round(args.batch * args.new_tokens / info["seconds_median"], 1))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"shape": {"preset": args.preset, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens},
              "warmup_calls": args.warmup, "timed_calls": args.runs}
    return drive("gpu_generate", args, run_side, __file__, ("new_tokens_per_s",), report)


if __name__ == "__main__":
    sys.exit(main())
