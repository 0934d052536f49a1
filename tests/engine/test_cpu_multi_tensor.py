"""megatron's fallback multi-tensor norm and scale on torch's ``_foreach`` ops
(``engine/parallel/cpu_multi_tensor.py``): bitwise equal to megatron's own loops, megatron's loop for
copies between different tensors, and installed by the CPU layer in place of the fallbacks."""

from __future__ import annotations

import torch

from engine.parallel import cpu, cpu_multi_tensor


def _tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4096, 512), (1536, 512), (512,), (7,), (3, 5, 11), (100_003,)]
    scales = [1e-3, 3.0, 1.0, 1e4, 1e-6, 0.5]
    return [torch.randn(*shape, generator=generator) * scale for shape, scale in zip(shapes, scales, strict=True)]


def test_norm_and_scale_are_bitwise_megatrons() -> None:
    from megatron.core import utils

    assert cpu.activate()  # megatron's own norm puts its result on device "cuda"
    tensors = _tensors(1)
    ours, _ = cpu_multi_tensor.foreach_l2_norm(0, None, [tensors], False)
    theirs, _ = utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    assert ours.shape == theirs.shape == (1,) and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert torch.equal(cpu_multi_tensor.foreach_l2_norm(0, None, [[]], False)[0], torch.zeros(1))

    scale = cpu_multi_tensor.make_scale(utils.local_multi_tensor_scale)
    mine, reference = [t.clone() for t in tensors], [t.clone() for t in tensors]
    scale(0, None, [mine, mine], 0.3183)  # gradient clipping: each tensor scaled in place
    utils.local_multi_tensor_scale(0, None, [reference, reference], 0.3183)
    assert all(torch.equal(a, b) for a, b in zip(mine, reference, strict=True))
    assert not torch.equal(mine[0], tensors[0])


def test_copy_between_tensors_goes_to_the_original() -> None:
    calls: list[float] = []

    def original(chunk_size: int, noop_flag: object, tensor_lists: list[list[torch.Tensor]], scale: float) -> None:
        calls.append(scale)
        for src, dst in zip(*tensor_lists, strict=True):
            dst.copy_(src * scale)

    sources = _tensors(2)
    destinations = [torch.zeros_like(t, dtype=torch.float64) for t in sources]
    cpu_multi_tensor.make_scale(original)(0, None, [sources, destinations], 1.0)
    assert calls == [1.0]
    assert all(torch.equal(d, s.double()) for s, d in zip(sources, destinations, strict=True))


def test_cpu_layer_installs_them_in_megatrons_clipping() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    assert cpu.activate()
    assert clip_grads.l2_norm_impl is cpu_multi_tensor.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is not utils.local_multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is not utils.local_multi_tensor_scale
    assert (clip_grads, "multi_tensor_scale_impl") in cpu.PATCHED and (clip_grads, "l2_norm_impl") in cpu.PATCHED
