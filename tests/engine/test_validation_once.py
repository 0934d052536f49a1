"""A validation set smaller than ``run.eval_batches`` global batches is read exactly once.

The read wrapped around it: with 3 pairs and 2 batches of 4, pairs 0 and 1 counted three times and pair 2
twice (accuracies of 0.3125 and 0.34375 on 3 pairs). Now the last global batch is filled with rows whose
``keep`` is 0, which every offline loss leaves out of its sums and counts. The reference reads the same
rows one per global batch (batch 1, ``run.eval_batches`` = the set's size): no filler, no wrap.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import load_config
from engine.data.synthetic import builtin_rows
from tests.helpers import single_process_parallel

COMMON = ["data.seq_length=256", "data.num_samples=16", "logging.progress=false", "logging.tensorboard=false",
          "checkpoint.save_interval=0", "checkpoint.resume=none"]
# (algorithm, overrides, built-in rows for the validation file, how many)
CASES = {
    "sft": ("sft", [], "builtin:sft", 5),
    "dpo": ("dpo", [], "builtin:helpsteer:validation", 10),
    "rm-regression": ("reward", [], "builtin:helpsteer:validation", 12),
    "rm-bt": ("reward", ["rm.type=bt", "data.format=pairs", "data.source=builtin:pairs"], "builtin:pairs:validation", 5),
}


def _evaluate(tmp_path: Path, algorithm: str, overrides: list[str], wrap: bool = False) -> tuple[dict[str, float], int]:
    from engine.trainer import Trainer

    module = importlib.import_module(f"engine.algorithms.{algorithm}")
    config = load_config(module.CONFIG, None, [*COMMON, f"run.output_dir={tmp_path}", *overrides])
    step = module.create(config)
    step.reads_keep = not wrap  # wrap: the read as it was, around the set
    with single_process_parallel(seed=config.run.seed) as parallel:
        trainer = Trainer(config, step, parallel)
        # the same nudge in both runs: the policy moves off DPO's reference (else every pair ties at 0.5)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, weight in sorted(trainer.model.chunks[0].named_parameters()):
                weight.add_(0.02 * torch.randn(weight.shape, generator=generator))
        return trainer.evaluate(), len(trainer.valid_data)


@pytest.mark.parametrize("case", CASES)
def test_a_small_validation_set_counts_every_row_once(case: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    algorithm, overrides, rows, count = CASES[case]
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(row) + "\n" for row in builtin_rows(rows, count, 7)))
    overrides = [*overrides, f"data.validation_source={valid}"]
    batches_of_4 = [*overrides, "data.global_batch_size=4", "data.micro_batch_size=2", "run.eval_batches=3"]
    with caplog.at_level(logging.INFO, logger="engine.trainer"):
        batched, items = _evaluate(tmp_path / "batched", algorithm, batches_of_4)
    assert 0 < items < 12 and items % 4, items  # a set that the old read wrapped around, with a filled last batch
    batches = -(-items // 4)
    assert f"each validation reads all {items} validation rows once, in {batches} global batch" in caplog.text
    single, _ = _evaluate(tmp_path / "single", algorithm, [*overrides, "data.global_batch_size=1",
                                                           "data.micro_batch_size=1", f"run.eval_batches={items}"])
    assert batched.keys() == single.keys() and len(batched) >= 1
    wrapped, _ = _evaluate(tmp_path / "wrapped", algorithm, batches_of_4, wrap=True)
    assert wrapped[next(iter(single))] != single[next(iter(single))]  # the wrapped read weighed some rows twice
    for name, value in single.items():
        assert math.isfinite(value) and math.isclose(batched[name], value, rel_tol=1e-5, abs_tol=1e-6), \
            (name, batched, single)


def test_the_filler_rows_count_nothing_in_any_loss() -> None:
    """``keep`` 0 removes a row from the sums and the counts of each loss (checked on SFT's directly)."""
    from engine.algorithms.sft import SFTStep

    output = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    batch: Any = {"loss_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    total, count, _ = SFTStep().loss(batch, output)
    assert (float(total), int(count)) == (59.0, 5)
    total, count, _ = SFTStep().loss({**batch, "keep": torch.tensor([1.0, 0.0])}, output)
    assert (float(total), int(count)) == (3.0, 2)
