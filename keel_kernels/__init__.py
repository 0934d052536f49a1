"""Fused training kernels with plain-torch references.

Each kernel has a public function that picks its implementation per call (see
:mod:`keel_kernels._dispatch`): Triton on CUDA, a memory-frugal torch path on CPU, and a
``*_reference`` function written the obvious way for tests. Importing this package
never imports Triton.
"""

from keel_kernels.logprob import IGNORE_INDEX, token_logprobs, token_logprobs_reference
from keel_kernels.swiglu import swiglu, swiglu_reference

__all__ = ["IGNORE_INDEX", "swiglu", "swiglu_reference", "token_logprobs", "token_logprobs_reference"]
