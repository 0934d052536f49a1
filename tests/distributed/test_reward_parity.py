"""Reward-model parity: 5 steps of regression and scaled-BT training give the single-process
losses (1e-5 relative) at TP2, TP2+SP, PP2 and DP2 (2 ranks) and TP2×PP2 (4 ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import run_worker

STEPS = 5
BASE = [
    "run.train_steps=5", "data.num_samples=64", "data.seq_length=96", "data.micro_batch_size=2",
    "data.global_batch_size=8", "data.validation_source=null", "logging.tensorboard=false",
    "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none", "optimizer.lr=0.003",
]
KINDS = {
    "regression": ["rm.type=regression"],
    "scaled_bt": ["rm.type=bt", "rm.bt_variant=scaled", "data.source=builtin:helpsteer2_preference",
                  "data.format=helpsteer2_preference"],
}
TWO_RANKS = {
    "tp2": ["parallel.tensor=2"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "dp2": [],
}
FOUR_RANKS = {"tp2pp2": ["parallel.tensor=2", "parallel.pipeline=2"]}


def _cases(layouts: dict[str, list[str]]) -> dict[str, list[str]]:
    return {f"{kind}/{name}": [*kind_overrides, *overrides]
            for kind, kind_overrides in KINDS.items() for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[float]]]:
    tmp: Path = tmp_path_factory.mktemp("rm-parity")
    out: dict[str, dict[str, list[float]]] = {}
    for nproc, layouts in ((1, {"reference": []}), (2, TWO_RANKS), (4, FOUR_RANKS)):
        payload = {"algo": "rm", "base": BASE, "cases": _cases(layouts), "steps": STEPS}
        out.update(run_worker(nproc, "tests/distributed/parity_worker.py", payload, tmp / f"r{nproc}.json"))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", list(TWO_RANKS) + list(FOUR_RANKS))
def test_reward_losses_match_single_process(results: dict[str, dict[str, list[float]]], kind: str, layout: str) -> None:
    reference = results[f"{kind}/reference"]["loss"]
    got = results[f"{kind}/{layout}"]["loss"]
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, reference, strict=True), start=1):
        assert math.isfinite(a)
        assert abs(a - b) / abs(b) <= 1e-5, f"{kind} {layout} step {step}: {a!r} vs single-process {b!r}"
    # one validation after the steps, over a set smaller than its 2 global batches: read once at every layout
    valid, single = results[f"{kind}/{layout}"], results[f"{kind}/reference"]
    assert valid["valid_rows"] == single["valid_rows"] and single["valid_rows"][0] % 8, single["valid_rows"]
    assert abs(valid["valid"][0] - single["valid"][0]) / abs(single["valid"][0]) <= 1e-5, (valid, single)


def test_regression_training_reduces_loss(results: dict[str, dict[str, list[float]]]) -> None:
    # (5 small batches are too noisy for a strictly monotone check; regression starts far off)
    losses = results["regression/reference"]["loss"]
    assert max(losses[1:]) < losses[0] and min(losses[3:]) < 0.75 * losses[0], losses


def test_the_last_pipeline_stage_says_which_weights_it_kept_fresh(tmp_path: Path) -> None:
    """A reward model from an SFT checkpoint keeps its new head at initialisation, and the head lives on the last
    pipeline stage: its rank says so, once, while ranks other than 0 are otherwise quiet."""
    from tests.helpers import keel_train

    sft = tmp_path / "sft"
    keel_train(1, [*BASE, "run.train_steps=1", "data.num_samples=16", f"run.output_dir={sft}"])
    proc = keel_train(2, [*BASE, *KINDS["regression"], "parallel.pipeline=2", "run.train_steps=1",
                          f"checkpoint.load={sft}", f"run.output_dir={tmp_path / 'rm'}"], algo="rm")
    said = [line for line in proc.stderr.splitlines() if "kept fresh weights for" in line]
    assert len(said) == 1 and "head" in said[0] and "embedding" not in said[0], proc.stderr[-3000:]
