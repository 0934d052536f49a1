"""Bradley-Terry reward models on a user's own pairs file: variant choice, over-long rows, validation
from the user's source, weights of diverging pairs, and steps that have nothing to train on."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine.algorithms.reward import RewardStep, RewardTrainConfig
from engine.config import load_config
from engine.data.errors import DataError
from engine.data.sources import paired_rows
from tests.helpers import single_process_parallel

BASE = ["rm.type=bt", "data.format=pairs", "data.seq_length=64", "data.micro_batch_size=2",
        "data.global_batch_size=8", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.save_interval=0", "checkpoint.resume=none", "scheduler.warmup_steps=0"]


def _pairs(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"prompt": f"question {i}", "chosen": f"A careful answer {i}.", "rejected": f"no {i}", **extra}
            for i in range(count)]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _trainer(tmp_path: Path, parallel: Any, source: str, *extra: str) -> Any:
    from engine.trainer import Trainer

    config = load_config(RewardTrainConfig, None, BASE + [f"data.source={source}", f"run.output_dir={tmp_path / 'run'}",
                                                         *extra])
    return Trainer(config, RewardStep(config.rm), parallel)


def test_pairs_without_strengths_train_regular_bt_and_validate_on_their_own_source(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = _pairs(46)
    rows.insert(3, {"prompt": "Please read all of this. " * 8 + "Now answer.", "chosen": "Yes.", "rejected": "No."})
    rows.insert(5, {"prompt": "q", "chosen": "far too long " * 8, "rejected": "no"})  # response alone > 64
    source = _write(tmp_path / "pairs.jsonl", rows)
    caplog.set_level(logging.INFO)
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, source, "run.train_steps=10", "data.validation_fraction=0.25",
                           "optimizer.lr=1e-3")
        assert trainer.step.variant == "regular"
        assert "rm.bt_variant=auto" in caplog.text and "training regular Bradley-Terry" in caplog.text
        # the over-long counts of the file are logged; responses are never cut
        assert f"{source}: 1 of " in caplog.text and "dropped 1 whose response alone does not fit" in caplog.text
        # validation is held out from the user's file (whole prompts), not the built-in default
        assert len(trainer.valid_data) in (11, 12)
        assert len(trainer.train_data) + len(trainer.valid_data) == 47
        result = trainer.fit()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[0] > 0.5 and max(losses[-3:]) < 0.25, losses  # ln 2 at the start: it learns


def test_user_source_holds_out_validation_from_itself(tmp_path: Path) -> None:
    source = _write(tmp_path / "pairs.jsonl", _pairs(40) + _pairs(40))  # every prompt twice
    config = load_config(RewardTrainConfig, None, BASE + [f"data.source={source}", "data.validation_fraction=0.25"])
    assert config.data.validation_source is None
    train, valid = paired_rows(config.data, 7)
    assert len(valid) == 20 and len(train) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}  # whole prompts held out


def test_explicit_strength_variant_is_refused_on_pairs_without_strengths(tmp_path: Path) -> None:
    rows = _pairs(1, margin=2.0) + _pairs(3)
    source = _write(tmp_path / "pairs.jsonl", rows)
    for variant in ("scaled", "margin"):
        with single_process_parallel() as parallel, pytest.raises(DataError) as error:
            _trainer(tmp_path, parallel, source, f"rm.bt_variant={variant}")
        assert f"{source}, line 2: field 'margin'" in str(error.value)
        assert f"rm.bt_variant={variant}" in str(error.value)


def test_steps_whose_pairs_all_weigh_zero_stop_the_run(tmp_path: Path) -> None:
    from engine.trainer import TrainingError

    split = _write(tmp_path / "split.jsonl", _pairs(16, annotator_strengths=[2, -1]))
    ties = _write(tmp_path / "ties.jsonl", _pairs(16, margin=0))
    for source, extra in ((split, "rm.diverging=drop"), (ties, "rm.bt_variant=scaled")):
        with single_process_parallel() as parallel:
            trainer = _trainer(tmp_path, parallel, source, extra, "data.validation_fraction=0")
            with pytest.raises(TrainingError, match="no item of the global batch carries rm_loss"):
                trainer.train_step(1)


def _reference_loss(trainer: Any, weights: list[float]) -> tuple[float, list[float]]:
    """sum(w * -log sigmoid(r_c - r_r)) / pairs of weight > 0, from a direct forward of every pair."""
    data = trainer.train_data
    batch = data.collate(list(range(len(data))))
    with torch.no_grad():
        rewards = trainer.step.forward(trainer.model.chunks[0], batch)[:, 0].view(-1, 2).float()
    losses = F.softplus(-(rewards[:, 0] - rewards[:, 1]))
    prompts = [int(data.tokenizer.decode(data.pairs[i][0][0]).split("question ")[1].split("\n")[0])
               for i in range(len(data))]
    w = torch.tensor([weights[p] for p in prompts])
    return float((w * losses).sum() / (w > 0).sum()), prompts


@pytest.mark.parametrize("mode", ["drop", "downweight"])
def test_diverging_pairs_are_dropped_or_down_weighted_in_training(tmp_path: Path, mode: str) -> None:
    # pairs 0-3 unanimous, 4-5 split on the direction, 6 spread 2 (= threshold: not above), 7 spread 3 (above)
    votes = [[2, 3], [1], [3, 3], [2, 1], [1, -1], [-2, 2], [3, 1], [3, 0]]
    rows = [dict(row, annotator_strengths=v) for row, v in zip(_pairs(8), votes, strict=True)]
    source = _write(tmp_path / "votes.jsonl", rows)
    weight = 0.0 if mode == "drop" else 0.25
    weights = [1.0, 1.0, 1.0, 1.0, weight, weight, 1.0, weight]
    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, source, f"rm.diverging={mode}", "rm.diverging_weight=0.25",
                           "rm.spread_threshold=2", "data.validation_fraction=0")
        expected, _ = _reference_loss(trainer, weights)
        before = trainer.model.chunks[0].module.reward_head.weight.detach().clone()
        metrics = trainer.train_step(1)
        after = trainer.model.chunks[0].module.reward_head.weight.detach()
    assert math.isclose(metrics["rm_loss"], expected, rel_tol=1e-5)
    assert not torch.equal(before, after)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["drop", "downweight"])
def test_pair_weights_follow_a_batch_on_the_gpu(mode: str) -> None:
    """The weights were built on the CPU and indexed with the batch's mask, which on a GPU lives there
    (skipped without CUDA at collection, tests/conftest.py)."""
    config = load_config(RewardTrainConfig, None, BASE + [f"rm.diverging={mode}", "rm.diverging_weight=0.25"])
    diverging = torch.tensor([1, 0, 1, 0], device="cuda")
    weights = RewardStep(config.rm)._pair_weights({"diverging": diverging, "annotator_spread": torch.zeros(4, device="cuda")})
    expected = [0.0, 1.0, 0.0, 1.0] if mode == "drop" else [0.25, 1.0, 0.25, 1.0]
    assert weights.device.type == "cuda" and weights.tolist() == expected


def test_pairs_given_to_a_regression_model_name_the_type_that_trains_on_them(tmp_path: Path) -> None:
    """`keel train rm data.source=pairs.jsonl` (the default rm.type is regression) said the rows have the
    fields of data.format=pairs, which the run does not train on, without naming rm.type=bt."""
    from engine.trainer import Trainer

    source = _write(tmp_path / "pairs.jsonl", _pairs(8))
    config = load_config(RewardTrainConfig, None, [*BASE[2:], f"data.source={source}",
                                                   f"run.output_dir={tmp_path / 'run'}"])
    with single_process_parallel() as parallel, pytest.raises(DataError) as error:
        Trainer(config, RewardStep(config.rm), parallel)
    assert str(error.value).endswith("(the row has the fields of data.format=pairs: preference pairs train a "
                                     "Bradley-Terry reward model; set rm.type=bt data.format=pairs)"), error.value
