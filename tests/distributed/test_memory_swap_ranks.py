"""Memory swap on 2 gloo ranks (one launch): sharded optimizer state, tensor and pipeline split.

Swapping after every step trains bitwise like not swapping, and each rank reports exactly
its own share, read off megatron's objects in the worker.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_worker

BASE = [
    "data.num_samples=32", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
    "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none",
]
CASES = {
    "dp2_distopt_bf16": ["parallel.distributed_optimizer=true", "precision.dtype=bf16"],
    "tp2_fp32": ["parallel.tensor=2"],
    "pp2_bf16": ["parallel.pipeline=2", "precision.dtype=bf16"],
}


def test_swap_on_two_ranks(tmp_path: Path) -> None:
    ranks = run_worker(2, "tests/distributed/swap_worker.py", {"base": BASE, "cases": CASES, "steps": 3},
                       tmp_path / "out.json")
    for rank, cases in enumerate(ranks):
        for name, seen in cases.items():
            assert seen["same"], (rank, name)
            assert seen["reported"] == seen["expected"], (rank, name)
            assert seen["reported"]["optimizer_state_bytes"] > 0 and seen["reported"]["grad_buffer_bytes"] > 0
            assert (seen["reported"]["main_param_bytes"] > 0) == name.endswith("bf16")
    # the distributed optimizer shards the state: each rank holds about half of it
    full = ranks[0]["dp2_distopt_bf16"]["expected"]["grad_buffer_bytes"] * 2  # exp_avg + exp_avg_sq, fp32
    shares = [r["dp2_distopt_bf16"]["reported"]["optimizer_state_bytes"] for r in ranks]
    assert all(0.4 * full < s < 0.6 * full for s in shares), (shares, full)
