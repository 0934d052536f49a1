"""Benchmark fused token log-probabilities against ``log_softmax + gather``.

On CUDA it times the Triton kernel, the chunked torch path and the naive
``log_softmax(logits.float()).gather(...)`` at 8 x 2048 tokens for vocabularies 32000
and 128256 (bf16 logits), forward and forward+backward, and records the peak memory
allocated above the inputs (``torch.cuda.max_memory_allocated``). On CPU it runs the
chunked torch path against the naive one at a smaller size, without memory figures
(torch keeps no CPU allocator statistics), and says so in the JSON.

    python tools/bench/logprob.py [--out tools/bench/results/logprob.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from keel_kernels._dispatch import Backend
from keel_kernels.logprob import token_logprobs
from tools.bench.common import write_report  # noqa: E402

logger = logging.getLogger("bench.logprob")
DEFAULT_OUT = Path("tools/bench/results/logprob.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 on CUDA, 256 on CPU")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--entropy", action="store_true", help="also compute (and back-propagate) entropy")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 CUDA, 3 CPU)")
    return parser.parse_args(argv)


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool) -> list[torch.Tensor]:
    """What the fused kernel replaces: the full fp32 log-softmax, then a gather."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    out = [log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)]
    if entropy:
        out.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    return out


def fused_logprobs(
    backend: Backend, chunk_size: int
) -> Callable[[torch.Tensor, torch.Tensor, bool], list[torch.Tensor]]:
    def run(logits: torch.Tensor, targets: torch.Tensor, entropy: bool) -> list[torch.Tensor]:
        out = token_logprobs(logits, targets, chunk_size=chunk_size, return_entropy=entropy, backend=backend)
        return list(out) if isinstance(out, tuple) else [out]

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(step: Callable[[], Any], device: torch.device, iters: int) -> float:
    step()  # warm-up (Triton compiles here)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0 / iters


def _peak_extra_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _sync(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - baseline)


def measure(
    method: Callable[..., list[torch.Tensor]],
    logits: torch.Tensor,
    targets: torch.Tensor,
    entropy: bool,
    iters: int,
) -> dict[str, Any]:
    """Forward time, forward+backward time and peak extra memory of one method."""
    leaf = logits.detach().requires_grad_()

    def forward() -> None:
        with torch.no_grad():
            method(leaf, targets, entropy)

    def forward_backward() -> None:
        leaf.grad = None
        outputs = method(leaf, targets, entropy)
        torch.stack([out.sum() for out in outputs]).sum().backward()

    result = {
        "forward_ms": round(_time_ms(forward, logits.device, iters), 3),
        "forward_backward_ms": round(_time_ms(forward_backward, logits.device, iters), 3),
        "forward_backward_peak_extra_bytes": _peak_extra_bytes(forward_backward, logits.device),
    }
    leaf.grad = None
    return result


def max_difference(
    method: Callable[..., list[torch.Tensor]], logits: torch.Tensor, targets: torch.Tensor, entropy: bool
) -> float:
    """Largest absolute difference of the method's outputs from the naive ones."""
    with torch.no_grad():
        got, want = method(logits, targets, entropy), naive_logprobs(logits, targets, entropy)
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def run_vocab(
    vocab: int, args: argparse.Namespace, device: torch.device, methods: dict[str, Any]
) -> list[dict[str, Any]]:
    batch, seq_len, iters = args.batch, args.seq_len, args.iters
    logits = torch.randn(batch, seq_len, vocab, device=device, dtype=getattr(torch, args.dtype))
    targets = torch.randint(0, vocab, (batch, seq_len), device=device)
    rows = []
    for name, method in methods.items():
        row: dict[str, Any] = {"vocab": vocab, "method": name}
        try:
            row.update(measure(method, logits, targets, args.entropy, iters))
            row["max_abs_diff_vs_naive"] = max_difference(method, logits, targets, args.entropy)
        except torch.OutOfMemoryError as error:
            row["error"] = f"out of memory: {error}".splitlines()[0]
        logger.info("%s", row)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    args.batch = args.batch or (8 if on_cuda else 2)
    args.seq_len = args.seq_len or (2048 if on_cuda else 256)
    args.iters = args.iters or (10 if on_cuda else 3)
    methods: dict[str, Any] = {
        "chunked_torch": fused_logprobs("torch", args.chunk_size),
        "naive": naive_logprobs,
    }
    if on_cuda:
        methods = {"triton": fused_logprobs("triton", args.chunk_size), **methods}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "note": "CUDA run: Triton kernel vs chunked torch vs naive"
        if on_cuda
        else "CPU run: no CUDA device, so only the chunked torch path vs naive, at a smaller size; "
        "peak memory is not measured on CPU",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "tokens": [args.batch, args.seq_len],
        "entropy": args.entropy,
        "chunk_size": args.chunk_size,
        "iters": args.iters,
        "results": [row for vocab in args.vocab for row in run_vocab(vocab, args, device, methods)],
    }
    write_report(args.out, report)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
