"""Offloading a trained model's optimizer state and freeing its grad buffers between phases (single process).

Each swapped run offloads and onloads twice per step: after the optimizer step (train →
generate → train, with a forward-only pass while offloaded) and right after ``zero_grad``
(so the grads the next backward accumulates into are the re-allocated ones). It must train
bitwise like a run that never swaps; two deliberately broken swaps show the comparison bites.
Expected bytes are computed here from megatron's own attributes, not from the swap code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from engine.algorithms.sft import SFTStep
from engine.config import TrainConfig, load_config
from engine.parallel import ddp
from tests.helpers import single_process_parallel

BASE = [
    "data.num_samples=16", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
    "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_interval=0", "checkpoint.resume=none",
    "run.eval_batches=1",
]
STEPS = 3
LAYOUTS = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]  # (dtype, distributed optimizer)
# where the optimizer keeps fp32 main params of its own (None: its params are the model's weights)
MAIN_PARAMS = {"FP32Optimizer": None, "Float16OptimizerWithFloat16Params": "fp32_from_float16_groups",
               "DistributedOptimizer": "shard_fp32_from_float16_groups"}


def _trainer(tmp_path: Path, parallel: Any, dtype: str) -> Any:
    from engine.trainer import Trainer

    config = load_config(TrainConfig, None, BASE + [f"run.output_dir={tmp_path}", f"precision.dtype={dtype}"])
    return Trainer(config, SFTStep(), parallel)


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def expected_bytes(runner: Any) -> dict[str, int]:
    """Sizes of what an offload should move, read off megatron's optimizer and DDP objects."""
    state, main = 0, 0
    for opt in runner.optimizer.chained_optimizers:
        for per_param in opt.optimizer.state.values():
            state += _nbytes(v for v in per_param.values() if torch.is_tensor(v))
        groups = getattr(opt, MAIN_PARAMS[type(opt).__name__] or "", [])
        main += _nbytes(p for group in groups for p in group)
    buffers = [b for chunk in runner.chunks for b in chunk.buffers + chunk.expert_parallel_buffers]
    return {"optimizer_state_bytes": state, "main_param_bytes": main,
            "grad_buffer_bytes": _nbytes(b.grad_data for b in buffers)}


def _swapped_storages(runner: Any) -> list[torch.Tensor]:
    """Every tensor whose storage an offload releases (optimizer state, own main params, grads)."""
    tensors: list[torch.Tensor] = []
    for opt in runner.optimizer.chained_optimizers:
        tensors += [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors += [p for g in getattr(opt, MAIN_PARAMS[type(opt).__name__] or "", []) for p in g]
    tensors += [b.grad_data for c in runner.chunks for b in c.buffers + c.expert_parallel_buffers]
    tensors += [p.main_grad for c in runner.chunks for p in c.parameters()]
    return tensors


def _swap(trainer: Any, log: list[dict[str, int]], after_onload: Optional[Callable[[Any], None]]) -> None:
    from engine.memory_swap import SwapError

    runner = trainer.model
    expected = expected_bytes(runner)
    stats = runner.offload()
    assert stats == expected
    assert all(t.untyped_storage().nbytes() == 0 for t in _swapped_storages(runner))
    assert runner.offloaded
    runner.set_training(False)
    with torch.no_grad():  # forward-only (generation's side) still runs on the weights
        records = runner.run_schedule([trainer.train_data.collate([0, 1])], trainer._forward_step, True)
    runner.set_training(True)
    assert torch.isfinite(records[0]["lm_loss"]).all()
    with pytest.raises(SwapError, match="offloaded; call onload"):
        trainer.train_step(0)  # refused before it touches the data
    assert runner.onload() == stats and not runner.offloaded
    for chunk in runner.chunks:
        for buffer in chunk.buffers:
            assert torch.count_nonzero(buffer.grad_data) == 0  # back, zeroed
            for param in buffer.params:  # main_grad still views the buffer
                assert param.main_grad.untyped_storage().data_ptr() == buffer.grad_data.untyped_storage().data_ptr()
    log.append(stats)
    if after_onload is not None:
        after_onload(runner)


def _run(tmp_path: Path, dtype: str, dist_opt: bool, swap: bool,
         after_onload: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
    """STEPS training steps; with ``swap``, offload/onload after zero_grad and after each step."""
    log: list[dict[str, int]] = []
    with single_process_parallel(distributed_optimizer=dist_opt) as parallel:
        trainer = _trainer(tmp_path, parallel, dtype)
        runner = trainer.model
        if swap:
            zero_grad = runner.zero_grad

            def zero_then_swap() -> None:
                zero_grad()
                _swap(trainer, log, after_onload)

            runner.zero_grad = zero_then_swap
        metrics = []
        for step in range(1, STEPS + 1):
            metrics.append(trainer.train_step(step))
            if swap:
                _swap(trainer, log, after_onload)
        state = [v.clone() for opt in runner.optimizer.chained_optimizers
                 for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {"losses": [m["lm_loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
                "weights": [p.detach().clone() for c in runner.chunks for p in c.parameters()],
                "state": state, "log": log, "optimizer": type(runner.optimizer.chained_optimizers[0]).__name__}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    tensors = all(torch.equal(x, y) for key in ("weights", "state") for x, y in zip(a[key], b[key], strict=True))
    return tensors and a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]


@pytest.mark.parametrize(("dtype", "dist_opt"), LAYOUTS)
def test_swapping_every_step_trains_bitwise_like_no_swap(tmp_path: Path, dtype: str, dist_opt: bool) -> None:
    plain = _run(tmp_path / "plain", dtype, dist_opt, swap=False)
    swapped = _run(tmp_path / "swapped", dtype, dist_opt, swap=True)
    assert swapped["optimizer"] == ("DistributedOptimizer" if dist_opt else
                                    "Float16OptimizerWithFloat16Params" if dtype == "bf16" else "FP32Optimizer")
    assert _same(plain, swapped), (plain["losses"], swapped["losses"])
    assert len(swapped["log"]) == 2 * STEPS
    first, last = swapped["log"][0], swapped["log"][-1]
    assert first["optimizer_state_bytes"] == 0  # before the first step AdamW has no state yet
    assert last["optimizer_state_bytes"] > 0 and last["grad_buffer_bytes"] > 0
    assert (last["main_param_bytes"] > 0) == (dtype == "bf16")  # fp32: the optimizer updates the weights in place


def _lose_state(runner: Any) -> None:
    for opt in runner.optimizer.chained_optimizers:
        for per_param in opt.optimizer.state.values():
            per_param["exp_avg"].zero_()


def _stale_grads(runner: Any) -> None:
    # Buffers back with old values, which the step then treats as gradient already accumulated (after
    # zero_grad the DDP copies each parameter's first gradient of a step over whatever the buffer holds).
    for chunk in runner.chunks:
        for buffer in chunk.buffers:
            buffer.grad_data.fill_(1e-3)
            for param in buffer.params:
                setattr(param, ddp.STALE, False)


@pytest.mark.parametrize("broken", [_lose_state, _stale_grads], ids=["state-lost", "grads-stale"])
def test_a_broken_swap_would_be_caught(tmp_path: Path, broken: Callable[[Any], None]) -> None:
    plain = _run(tmp_path / "plain", "fp32", False, swap=False)
    assert not _same(plain, _run(tmp_path / "broken", "fp32", False, swap=True, after_onload=broken))


def test_swap_out_of_order_and_guards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from engine.memory_swap import SwapError
    from engine.runner import ModelRunner

    with single_process_parallel() as parallel:
        trainer = _trainer(tmp_path, parallel, "fp32")
        runner = trainer.model
        with pytest.raises(SwapError, match="onload\\(\\) without offload"):
            runner.onload()
        with pytest.raises(ValueError, match="would move nothing"):
            runner.offload(optimizer_state=False, grad_buffers=False)
        trainer.train_step(1)
        with caplog.at_level(logging.INFO, logger="engine.memory_swap"):
            grads_only = runner.offload(optimizer_state=False)
        assert "freed grad buffers" in caplog.text
        assert grads_only["optimizer_state_bytes"] == 0 and grads_only["grad_buffer_bytes"] > 0
        with pytest.raises(SwapError, match="offload\\(\\) called twice"):
            runner.offload()
        with pytest.raises(SwapError, match="an optimizer step while"):
            runner.optimizer_step()
        with pytest.raises(SwapError, match="saving a checkpoint while"):
            runner.save(str(tmp_path / "ckpt"), 1, {}, 1, True)
        assert runner.onload() == grads_only
        with pytest.raises(SwapError, match="onload\\(\\) without offload"):
            runner.onload()
        caplog.clear()  # an online run swaps every iteration: after the first cycle, the lines are DEBUG
        with caplog.at_level(logging.INFO, logger="engine.memory_swap"):
            runner.offload()
            runner.onload()
        assert not caplog.records
        trainer.train_step(2)
        frozen = ModelRunner(runner.chunks, runner.preset, runner.transformer_config, parallel)
        with pytest.raises(SwapError, match="only a trained model"):
            frozen.offload()
