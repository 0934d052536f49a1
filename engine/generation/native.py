"""The native generation backend: the megatron model with a KV cache (Keel's lean decoder for the
local layer spec, ``decoder.py``; megatron's modules with its static cache otherwise).

Why megatron's cache and Keel's own loop, rather than megatron-core's inference stack
(``megatron.core.inference``: engines, text-generation controllers, model wrappers):

* the dynamic engine needs flash-attn and CUDA; the static engine's controller moves
  tensors with ``torch.cuda`` calls, brings its own tokenizer protocol and returns
  detokenised text, none of which the CPU path or rollouts need;
* the part that matters, the KV cache, lives in megatron's ``Attention``: given a
  ``StaticInferenceContext`` it stores keys and values per layer and returns the whole
  cache to the core attention. Keel's SDPA core attention serves it on any device, and
  the TE spec's fused attention on GPU, with no change to the model;
* the decode loop (mixed prompt lengths, sampling, stop tokens, per-row seeds, log-probs
  from the same kernel as the trainer) is ~150 lines Keel can test against a full
  recompute, and it runs under the generation layout's own tensor-parallel group.

Mixed prompt lengths: the batch is prefilled up to its shortest prompt, then advances one
position per step; a row still inside its prompt is fed its next prompt token, a row past
it its sampled token. Every row's positions start at 0 and the cache never holds padding,
so each row sees exactly what a full recompute of that row sees. Rows are sorted by
length before batching, which keeps those catch-up steps few.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.errors import ConfigError
from engine.generation.base import Rollouts, SamplingParams, check_prompts

logger = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set of tokens reaching ``top_p``) on ``[rows, vocab]``."""
    scaled = logits.float() / params.temperature
    if params.top_k > 0:
        kth = scaled.topk(min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = scaled.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


def pick_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row of ``logits [rows, vocab]``: argmax when greedy, else a draw from each row's generator
    (a generator of the logits' device)."""
    if 0 < params.vocab_size < logits.shape[-1]:
        logits = logits[:, : params.vocab_size]
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``tokens`` under the unfiltered softmax of ``logits [rows, vocab]``: the trainer's kernel."""
    from engine.algorithms.logprobs import per_token_logprobs

    ones = torch.ones(tokens.shape[0], 1, device=logits.device)
    return per_token_logprobs(logits.unsqueeze(1), tokens.unsqueeze(1), ones, None).squeeze(1).float()


class NativeBackend:
    """Generation on the megatron model of a generation layout (see the module docstring).

    ``config`` is the run's config (model preset, precision); ``state`` the
    :class:`~engine.parallel.generation_layout.GenerationParallelState` whose replica this rank
    belongs to. ``max_batch_size`` rows decode together per replica.
    """

    name = "native"

    def __init__(self, config: Any, state: Any, max_batch_size: int = 64, decoder: str = "auto"):
        from engine.models.builder import build_gpt_chunks, transformer_config, use_transformer_engine
        from engine.models.presets import resolve_preset

        self.preset = resolve_preset(config.model)
        state.layout.check_model(self.preset)
        self.state = state
        self.max_batch_size = max_batch_size
        use_te = use_transformer_engine(config.model.layer_spec)
        tconfig = transformer_config(self.preset, state.layout, config.precision, use_te)
        tconfig.perform_initialization = False
        # megatron's fused bias-dropout-add is torch.compile'd: every new decoding shape recompiled it on
        # the H200 until dynamo's limit of 8 (with warnings); without dropout it is a plain residual add
        tconfig.bias_dropout_fusion = False
        model = build_gpt_chunks(self.preset, tconfig, use_te, None, process_groups=state.process_groups())[0]
        if torch.cuda.is_available():
            model = model.cuda(torch.cuda.current_device())
        self.model = model.eval()
        self.params = dict(self.model.named_parameters())
        self.decoder = self._pick_decoder(decoder)
        self.loaded: set[str] = set()
        self.stats: dict[str, float] = {}

    def _pick_decoder(self, choice: str) -> Any:
        """:class:`~engine.generation.decoder.CachedDecoder` where it applies ("auto"/"cached"), else None:
        megatron's modules with its static cache ("megatron", and the TE spec)."""
        from engine.generation.decoder import CachedDecoder, supports

        if choice not in ("auto", "cached", "megatron"):
            raise ConfigError(f"decoder={choice!r}: expected auto, cached or megatron")
        why_not = supports(self.model)
        if choice == "cached" and why_not:
            raise ConfigError(f"the cached decoder cannot run this model: {why_not}")
        if choice == "megatron" or why_not:
            return None
        return CachedDecoder(self.model, self.state.tp_group, self.state.layout.tensor)

    # -- weights -------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (name, this rank's generation-layout slice) pairs into the model (a parameter given as
        itself, written in place through :meth:`weights_in_place`, is only marked as loaded)."""
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self.params.get(name)
                if param is None:
                    raise KeyError(f"generation model has no parameter {name!r}")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: slice of shape {tuple(tensor.shape)} for a parameter of {tuple(param.shape)}")
                if tensor.data_ptr() != param.data_ptr():
                    param.copy_(tensor)
                self.loaded.add(name)

    def weights_in_place(self) -> dict[str, torch.Tensor]:
        """The model's parameters by name, for a resharder that writes them directly (no staging copy)."""
        return {name: param.data for name, param in self.params.items()}

    def bind_weights(self, views: dict[str, torch.Tensor]) -> None:
        """Rebind every parameter to the tensor of the same name and shape (host-shared weights,
        :mod:`engine.generation.host_shared`); what the parameters held is dropped."""
        if set(views) != set(self.params):
            raise KeyError(f"bind_weights: names differ from the model's ({sorted(set(views) ^ set(self.params))[:5]})")
        for name, param in self.params.items():
            if views[name].shape != param.shape or views[name].dtype != param.dtype:
                raise ValueError(f"bind_weights: {name} is {tuple(views[name].shape)} {views[name].dtype}, "
                                 f"the parameter {tuple(param.shape)} {param.dtype}")
            param.data = views[name]

    def missing_weights(self) -> list[str]:
        return sorted(set(self.params) - self.loaded)

    def release(self) -> None:
        """Free what generation holds beyond the weights: the KV cache, and on GPU the allocator's cache."""
        if self.decoder is not None:
            self.decoder.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation ----------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: Optional[list[int]] = None) -> Rollouts:
        """Complete every prompt. Every rank of the world calls it with the same prompts; each replica
        decodes every ``replicas``-th prompt and all ranks return the whole result."""
        check_prompts(prompts, params, self.preset.max_sequence_length)
        if self.missing_weights():
            raise ConfigError(f"generation weights not loaded: {', '.join(self.missing_weights()[:5])} ...")
        seeds = seeds if seeds is not None else [params.seed + i for i in range(len(prompts))]
        start = time.perf_counter()
        replicas, replica = self.state.layout.replicas, self.state.replica
        mine = sorted(range(replica, len(prompts), replicas), key=lambda i: (len(prompts[i]), i))
        results: dict[int, tuple[list[int], list[float], str]] = {}
        for first in range(0, len(mine), self.max_batch_size):
            rows = mine[first: first + self.max_batch_size]
            decoded = self._decode([prompts[i] for i in rows], params, [seeds[i] for i in rows])
            results.update(zip(rows, decoded, strict=True))
        results = self._gather(results)
        order = range(len(prompts))
        rollouts = Rollouts(list(map(list, prompts)), [results[i][0] for i in order],
                            [results[i][1] for i in order], [results[i][2] for i in order])
        seconds = time.perf_counter() - start
        rollouts.stats = {"generate_seconds": seconds, "new_tokens": float(sum(rollouts.lengths)),
                          "tokens_per_second": sum(rollouts.lengths) / max(seconds, 1e-9)}
        return rollouts

    def _gather(self, local: dict[int, tuple[list[int], list[float], str]]) -> dict[int, Any]:
        """Every replica's rows on every rank (the first TP rank of each replica speaks for it)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local if self.state.tp_rank == 0 else {})
        merged: dict[int, Any] = {}
        for part in everyone:
            merged.update(part)
        return merged

    def _batch_forward(self, rows: int, length: int) -> Any:
        """``forward(tokens [rows, n], start) -> fp32 logits [rows, vocab]`` at the last position, with a fresh
        KV cache for ``rows`` rows of up to ``length`` positions."""
        if self.decoder is not None:
            self.decoder.allocate(rows, length)
            self.stats["kv_cache_bytes"] = float(self.decoder.cache_bytes())
            self.stats["packed_weight_bytes"] = float(self.decoder.packed_bytes())
            return self.decoder.forward
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(rows, length)

        def forward(tokens: torch.Tensor, start: int) -> torch.Tensor:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
            logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(tokens.shape[1])
            return logits[:, -1].float()

        return forward

    def _decode(self, prompts: list[list[int]], params: SamplingParams,
                seeds: list[int]) -> list[tuple[list[int], list[float], str]]:
        """One batch: (new tokens, their log-probs, finish reason) per prompt."""
        limit = min(params.max_length or self.preset.max_sequence_length, self.preset.max_sequence_length)
        lengths = [len(p) for p in prompts]
        total = min(max(lengths) + params.max_new_tokens, limit)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.tensor(prompt)
        forward = self._batch_forward(len(prompts), total)
        # one generator per row, on the device the logits live on (torch.multinomial needs the two to match)
        generators = [torch.Generator(device=tokens.device).manual_seed(seed) for seed in seeds]
        stops = set(params.stop_token_ids)
        new: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]
        finish: list[Optional[str]] = [None] * len(prompts)
        position = min(lengths)
        logits = forward(tokens[:, :position], 0)
        while True:
            # rows that draw now: not finished and past their prompt (a row's generator is used only for its own draws)
            active = [i for i in range(len(prompts)) if finish[i] is None and position >= lengths[i]]
            if active:
                rows = torch.tensor(active, device=logits.device)
                picked = pick_tokens(logits[rows], params, [generators[i] for i in active])
                picked_logps = raw_logprobs(logits[rows], picked).tolist()
                for i, token, logp in zip(active, picked.tolist(), picked_logps, strict=True):
                    new[i].append(token)
                    logps[i].append(logp)
                    tokens[i, position] = token
                    if token in stops:
                        finish[i] = "stop"
                    elif len(new[i]) == params.max_new_tokens or position + 1 >= total:
                        finish[i] = "length"
            if all(f is not None for f in finish):
                break
            logits = forward(tokens[:, position: position + 1], position)
            position += 1
        return [(n, lp, str(f)) for n, lp, f in zip(new, logps, finish, strict=True)]
