"""Keel: 3D-parallel alignment training on megatron-core.

Importing ``engine`` is cheap: torch, megatron-core and every optional GPU package
(Transformer Engine, apex, TensorRT-LLM) are imported only by the code that needs them.
"""

__version__ = "0.1.0"

from engine import eager_imports as _eager_imports

_eager_imports.install()  # megatron's import-time torch.compile calls are skipped without CUDA
