"""Checkpoint conversion between Keel (megatron dist_checkpointing) and Hugging Face / GGUF.

* :mod:`engine.convert.llama` — pure tensor mapping between transformers' Llama / Nemotron names
  and megatron-core GPTModel names (fused QKV per query group, fused gate/up, Nemotron's
  gamma-1 LayerNorm), no I/O;
* :mod:`engine.convert.hf` — ``hf-to-keel`` / ``keel-to-hf``: read or write
  ``config.json`` + ``*.safetensors``, write or read a Keel checkpoint. Keel checkpoints
  are reshardable, so a converted checkpoint loads at any tensor × pipeline layout
  (``checkpoint.load=<dir>``);
* :mod:`engine.convert.hf_tokenizer` — the tokenizer that goes with the weights: ``keel-to-hf`` writes it
  (and its special ids) for transformers, ``hf-to-keel`` records it as an absolute path.

``register(subparsers)`` adds the sub-commands (mounted as ``keel convert``).
"""

from engine.convert.cli import register

__all__ = ["register"]
