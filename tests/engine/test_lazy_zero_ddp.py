"""megatron's DistributedDataParallel with the gradient buffer marked stale instead of zeroed
(``engine/parallel/ddp.py``): the reduced gradients equal megatron's own DDP, step after step, with
several micro-batches and a parameter that receives a gradient in one step and none in the next."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from engine.parallel.ddp import ddp_class
from tests.helpers import single_process_parallel


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(6, 5)
        self.second = torch.nn.Linear(5, 3, bias=False)
        self.spare = torch.nn.Parameter(torch.randn(4))  # used only in some steps

    def forward(self, x: torch.Tensor, use_spare: bool) -> torch.Tensor:
        out = self.second(torch.tanh(self.first(x))).sum()
        return out + self.spare.square().sum() if use_spare else out


def _wrap(cls: type, module: torch.nn.Module, **after_validation: object) -> Any:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, gradient_accumulation_fusion=False)
    for name, value in after_validation.items():  # validation needs apex or CUDA for these
        setattr(config, name, value)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    return cls(config=config, ddp_config=ddp_config, module=copy.deepcopy(module))


def _step(ddp: Any, inputs: list[torch.Tensor], use_spare: bool) -> dict[str, torch.Tensor]:
    ddp.zero_grad_buffer()
    for x in inputs:  # micro-batches: the first one copies, later ones add
        ddp(x, use_spare).backward()
    ddp.finish_grad_sync()
    return {name: p.main_grad.clone() for name, p in ddp.module.named_parameters()}


def test_gradients_equal_megatrons_ddp() -> None:
    from megatron.core.distributed import DistributedDataParallel

    generator = torch.Generator().manual_seed(5)
    with single_process_parallel(seed=3):
        torch.manual_seed(0)
        module = _Tiny()
        reference, lazy = _wrap(DistributedDataParallel, module), _wrap(ddp_class(), module)
        for step, use_spare in enumerate([True, False, True, False]):
            inputs = [torch.randn(7, 6, generator=generator) for _ in range(1 + step % 3)]
            expected, got = _step(reference, inputs, use_spare), _step(lazy, inputs, use_spare)
            for name, grad in expected.items():
                assert torch.equal(got[name], grad), f"step {step}: {name}"
            assert torch.count_nonzero(got["spare"]) == (4 if use_spare else 0)

        # The buffer is not zeroed at the start of a step: the last step's gradients are still there.
        before = lazy.module.first.weight.main_grad.clone()
        lazy.zero_grad_buffer()
        assert torch.equal(lazy.module.first.weight.main_grad, before) and torch.count_nonzero(before) > 0


@pytest.mark.parametrize("setting", [{"gradient_accumulation_fusion": True}, {"cuda_graph_impl": "local"}],
                         ids=["fusion", "cuda-graphs"])
def test_with_fusion_or_cuda_graphs_the_buffer_is_zeroed(setting: dict[str, object]) -> None:
    with single_process_parallel(seed=3):
        torch.manual_seed(0)
        lazy = _wrap(ddp_class(), _Tiny(), **setting)
        _step(lazy, [torch.randn(2, 6)], use_spare=True)
        lazy.zero_grad_buffer()  # a fused kernel adds into main_grad itself, a graph replays: both need zeros
        assert all(torch.count_nonzero(p.main_grad) == 0 for p in lazy.module.parameters())
