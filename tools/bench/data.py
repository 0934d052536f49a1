"""Benchmark the data pipeline: validation + tokenisation throughput, padding waste.

1. Throughput: ``--rows`` (default 100k) synthetic rows are written to a temporary
   JSONL file, then :func:`engine.data.validate.validate_file` streams it once — read,
   JSON-parse, schema-check, render with the chat template, tokenise, length statistics
   — in this single process. Reported per data set and tokenizer: wall seconds, rows/s
   and tokens/s. Writing the file is not timed. The built-in sentencepiece model is
   trained/cached before timing.
2. Padding: the fraction of padding positions per micro-batch without packing
   (``SFTDataset``, one document per row) and with packing (``PackedSFTDataset``), over
   every micro-batch of one epoch in sampler order; mean, max and overall.

    python tools/bench/data.py [--out tools/bench/results/data.json] [--rows 100000]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.data.convert import attributes_to_steerlm
from engine.data.loaders import write_jsonl
from engine.data.packing import PackedSFTDataset
from engine.data.sampler import GlobalBatchSampler
from engine.data.sft import SFTDataset
from engine.data.synthetic import builtin_format, builtin_rows
from engine.data.tokenizers import load_tokenizer
from engine.data.validate import validate_file
from tools.bench.common import write_report  # noqa: E402

logger = logging.getLogger("bench.data")
DEFAULT_OUT = Path("tools/bench/results/data.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per throughput measurement")
    parser.add_argument("--padding-rows", type=int, default=4096, help="rows for the padding measurement")
    parser.add_argument("--seq-length", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--micro-batch-size", type=int, default=4)
    return parser.parse_args(argv)


def measure_throughput(name: str, tokenizer: str, rows: int, template: str, seq_length: int) -> dict[str, Any]:
    fmt = builtin_format(name)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "rows.jsonl")
        write_jsonl(builtin_rows(name, rows, seed=0), path)
        start = time.perf_counter()
        summary = validate_file(path, fmt, tokenizer, seq_length, template=template)
        seconds = time.perf_counter() - start
    assert summary["valid"] == rows, summary["problems"]
    result = {"data": name, "format": fmt, "tokenizer": tokenizer, "template": template, "rows": rows,
              "tokens": summary["tokens"], "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds),
              "tokens_per_s": round(summary["tokens"] / seconds)}
    logger.info("%s", result)
    return result


def _batch_padding(dataset: Any, micro_batch_size: int) -> dict[str, float]:
    sampler = GlobalBatchSampler(len(dataset), micro_batch_size, micro_batch_size, 0, 1, seed=0)
    fractions = []
    for _ in range(len(dataset) // micro_batch_size):
        batch = dataset.collate(sampler.next_step()[0])
        real = (batch["segment_ids"] >= 0) if "segment_ids" in batch else _real_positions(batch, dataset)
        fractions.append(1.0 - real.float().mean().item())
    stats = dataset.padding_stats()
    return {"samples": stats["samples"], "documents": stats["documents"],
            "overall_padding_fraction": round(stats["padding_fraction"], 4),
            "mean_batch_padding_fraction": round(sum(fractions) / len(fractions), 4),
            "max_batch_padding_fraction": round(max(fractions), 4)}


def _real_positions(batch: dict[str, torch.Tensor], dataset: SFTDataset) -> torch.Tensor:
    lengths = torch.tensor([len(dataset.samples[i][0]) - 1 for i in batch["indices"].tolist()])
    return torch.arange(dataset.seq_length).unsqueeze(0) < lengths.unsqueeze(1)


class _IndexedSFT(SFTDataset):
    """SFTDataset whose collate also returns the indices (to count real tokens)."""

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = super().collate(indices)
        batch["indices"] = torch.tensor(indices)
        return batch


def measure_padding(label: str, rows: list[dict[str, Any]], seq_length: int, micro_batch_size: int,
                    template: str) -> dict[str, Any]:
    tok = load_tokenizer("builtin-sp")
    plain = _IndexedSFT(rows, tok, seq_length, template=template)
    packed = PackedSFTDataset(rows, tok, seq_length, template=template)
    result = {"data": label, "tokenizer": "builtin-sp", "template": template, "seq_length": seq_length,
              "micro_batch_size": micro_batch_size, "unpacked": _batch_padding(plain, micro_batch_size),
              "packed": _batch_padding(packed, micro_batch_size)}
    logger.info("%s", result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    load_tokenizer("builtin-sp")  # train/cache outside the timed region
    throughput = [
        measure_throughput("builtin:sft", "byte", args.rows, "plain", 512),
        measure_throughput("builtin:sft", "builtin-sp", args.rows, "llama3", 512),
        measure_throughput("builtin:helpsteer", "builtin-sp", args.rows, "plain", 512),
    ]
    steer_rows, _ = attributes_to_steerlm(builtin_rows("builtin:helpsteer", args.padding_rows, seed=1))
    padding = []
    for seq_length in args.seq_length:
        padding.append(measure_padding("builtin:sft", builtin_rows("builtin:sft", args.padding_rows, seed=1),
                                       seq_length, args.micro_batch_size, "llama3"))
        padding.append(measure_padding("steerlm(builtin:helpsteer)", steer_rows, seq_length,
                                       args.micro_batch_size, "nemotron"))
    report = {"benchmark": "data", "python": platform.python_version(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_1m_at_end": round(os.getloadavg()[0], 2),
              "throughput": throughput, "padding": padding}
    write_report(args.out, report)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
