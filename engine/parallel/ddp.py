"""megatron's ``DistributedDataParallel`` without a full pass to zero the gradient buffer.

megatron zeroes every gradient buffer at the start of a step (``zero_grad_buffer``), and the
backward hook of each parameter then adds the parameter's gradient to its slice of the buffer
(``main_grad.add_(grad)``). On a CPU both are passes over memory, which is what bounds them:
on a 49M-parameter model the zeroing alone takes 11-12 ms of a ~2.1 s step.

:func:`ddp_class` returns a subclass that, where nothing but the hooks writes into ``main_grad``
(no gradient-accumulation fusion, no CUDA graphs), marks the buffer stale instead of zeroing it. The first
gradient of each parameter in a step is then copied into its slice (``0 + g`` is ``g``), later
micro-batches add as before, and a parameter that received no gradient at all is zeroed before
the gradients are reduced (:meth:`finish_grad_sync`). Parameters, optimizer state and gradient
norms are bitwise the same; the only difference in the buffer is that a gradient of ``-0.0``
stays ``-0.0`` (``0.0 + -0.0`` is ``0.0``), which no later step can tell apart. Buffer padding
never receives a gradient and keeps the zeros it was allocated (or onloaded) with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

STALE = "keel_main_grad_stale"  # attribute set on a parameter whose buffer slice holds an old step's gradient


@functools.cache
def ddp_class() -> type:
    """megatron's ``DistributedDataParallel`` with lazy zeroing (see the module docstring)."""
    from megatron.core.distributed import DistributedDataParallel

    class LazyZeroDDP(DistributedDataParallel):  # type: ignore[misc]
        def _lazy(self) -> bool:
            # A fused kernel that adds into main_grad, or a replayed CUDA graph, needs a zeroed buffer.
            return not getattr(self.config, "gradient_accumulation_fusion", False) and \
                getattr(self.config, "cuda_graph_impl", "none") == "none"

        def _make_backward_post_hook(self, param: Any) -> Callable[..., None]:
            megatron_hook = super()._make_backward_post_hook(param)

            def hook(*unused: Any) -> None:
                if getattr(param, STALE, False):
                    setattr(param, STALE, False)
                    if param.grad is not None:
                        param.main_grad.copy_(param.grad.data)
                        param.grad = None  # megatron's hook then has nothing left to add
                    else:
                        param.main_grad.zero_()
                megatron_hook(*unused)

            return hook

        def zero_grad_buffer(self) -> None:
            if not self._lazy():
                super().zero_grad_buffer()
                return
            # megatron's zero_grad_buffer, with the buffers marked stale instead of zeroed.
            for param in self.params_with_grad:
                param.grad_added_to_main_grad = False
                setattr(param, STALE, True)
            for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
                bucket_group.reset()

        def finish_grad_sync(self, force_all_reduce: Optional[bool] = False) -> None:
            for param in self.params_with_grad:
                if getattr(param, STALE, False):  # no gradient reached it in this step
                    setattr(param, STALE, False)
                    param.main_grad.zero_()
            super().finish_grad_sync(force_all_reduce=force_all_reduce)

    return LazyZeroDDP
