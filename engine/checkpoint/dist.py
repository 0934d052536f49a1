"""Reshardable, atomic checkpoints on megatron ``dist_checkpointing``.

Layout of ``<checkpoint.dir>``::

    step_0000010/          one complete checkpoint
        keel.json          step, layout, model shape, scheduler, sampler, resolved config
        ...                dist_checkpointing shards (model, optimizer, per-rank RNG)
    step_0000020.tmp/      a save in progress (ignored by resume; removed by the next save)
    latest                 name of the newest complete checkpoint, replaced atomically

A save writes everything into ``step_N.tmp``, then rank 0 renames it to ``step_N`` and
only then rewrites ``latest``: a crash at any point leaves the previous checkpoint and
pointer intact. Loading goes through ``dist_checkpointing`` so a checkpoint written at
one TP×PP×DP layout loads at another; RNG states are restored only at the same layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.checkpoint import CHECKPOINT_FORMS
from engine.faults import maybe_fail
from engine.files import write_text_atomic
from engine.run_lock import LOCK_NAME
from engine.runtime import EVERY_RANK

logger = logging.getLogger(__name__)

META = "keel.json"
LATEST = "latest"
BEST = "best"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# The distributed optimizer's state as megatron's canonical per-parameter tensors (gathered over the data-parallel
# group to save, sliced to load), so it loads at any layout as the plain optimizer's does. megatron-core 0.16's
# default format ('fully_sharded_model_space', deprecated) refuses to save: "flattened_range is not supported".
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the current model."""


def step_dir(root: str, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def is_step_dir(path: str | Path) -> bool:
    """Whether ``path`` is named as a checkpoint's step directory (``step_<n>``), whether or not it exists."""
    return _STEP_DIR.match(Path(path).name) is not None


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file() and (path / "metadata.json").is_file()


_TOLD_INCOMPLETE: set[tuple[Path, Path]] = set()  # (pointer, what it named) already said, once per process


def find_latest(root: str) -> Optional[Path]:
    """Newest complete checkpoint under ``root``: the ``latest`` pointer, else a directory scan. A pointer that names
    an incomplete checkpoint is said once, however often the directory is read (a start-up reads it twice)."""
    base = Path(root)
    pointer = base / LATEST
    if pointer.is_file():
        candidate = base / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
        if (pointer, candidate) not in _TOLD_INCOMPLETE:
            _TOLD_INCOMPLETE.add((pointer, candidate))
            logger.warning("checkpoint pointer %s names %s, which is incomplete; scanning", pointer, candidate)
    steps = sorted(
        (int(m.group(1)), p) for p in base.glob("step_*") if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    )
    return steps[-1][1] if steps else None


def resolve(path: str | Path) -> Path:
    """The checkpoint a user names: a step directory; a ``latest``/``best`` pointer file; a checkpoints
    directory (its ``best``, else ``latest``, else its newest complete step); or a run directory (the
    checkpoints directory of its ``config.yaml``, else ``<run>/checkpoints``, read the same way).
    Anything else comes back as given, for the caller's own error."""
    path = Path(path)
    if path.is_file() and path.name in (LATEST, BEST):
        return path.parent / path.read_text().strip()
    if not path.is_dir() or (path / META).exists():
        return path
    for pointer in (BEST, LATEST):
        if (path / pointer).is_file():
            return path / (path / pointer).read_text().strip()
    newest = find_latest(str(path))
    if newest is not None:
        return newest
    checkpoints = checkpoints_of_run(path)
    return resolve(checkpoints) if checkpoints is not None else path


def checkpoints_of_run(run: Path) -> Optional[Path]:
    """The checkpoints directory of run directory ``run`` (``checkpoint.dir`` of its config.yaml, else
    ``<run>/checkpoints``), or None when ``run`` is no run directory."""
    import yaml

    config = run / "config.yaml"
    try:
        saved = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        saved = None
    named = (saved.get("checkpoint") or {}).get("dir") if isinstance(saved, dict) else None
    for candidate in (Path(named) if isinstance(named, str) else None, run / "checkpoints"):
        if candidate is not None and candidate.is_dir() and candidate.resolve() != run.resolve():
            return candidate
    return None


def locate(checkpoint: str | Path, setting: str = "checkpoint") -> Path:
    """The complete checkpoint ``checkpoint`` names (:func:`resolve`); else a one-line :class:`CheckpointError`
    that names ``setting`` (the option the user set) and lists :data:`CHECKPOINT_FORMS`."""
    path = Path(checkpoint)
    if path.name in (BEST, LATEST) and not path.exists() and path.parent.is_dir():
        checkpoints = checkpoints_of_run(path.parent)
        if checkpoints is not None and (checkpoints / path.name).is_file():
            return locate(checkpoints / path.name, setting)  # <run>/best: the pointer of the run's checkpoints
        unmarked = " (a run marks its best checkpoint only when it evaluates)" if path.name == BEST else ""
        raise CheckpointError(f"{setting} {checkpoint}: {(checkpoints or path.parent).resolve()} has no {path.name!r} pointer"
                              f"{unmarked}; give {CHECKPOINT_FORMS}")
    found = resolve(path)
    if not is_complete(found):
        problem = "is no complete checkpoint" if found.exists() else "does not exist"
        raise CheckpointError(f"{setting} {checkpoint}: {found} {problem}; give {CHECKPOINT_FORMS}")
    return found


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {META}: {exc}") from None


SCORERS = {"rm": "reward model", "critic": "PPO critic"}


def scorer_kind(meta: dict[str, Any]) -> Optional[str]:
    """'reward model' / 'PPO critic' when the checkpoint of ``meta`` scores responses (a value head, no LM head)."""
    return SCORERS.get(str(meta.get("algorithm")))


def refuse_scorer(path: Path, meta: dict[str, Any], use: str, named_by: str = "") -> None:
    """A policy (``use``: what it is loaded for; ``named_by``: the ``setting=value`` that named it, if any) cannot
    start from a reward model's or critic's weights: their output layer is a value head, so the language-model head
    would be left at random initialisation."""
    kind = scorer_kind(meta)
    if kind is not None:
        named = f"{named_by}: " if named_by else ""
        raise CheckpointError(f"{named}{path} is a {kind} checkpoint: it scores responses and has no language-model "
                              f"head, so it cannot be {use}; use a policy checkpoint (SFT, DPO, converted)")


def refuse_scorer_policy(value: Optional[str], setting: str) -> None:
    """A checkpoint that ``setting`` names as a policy (a reference, a prior) and that is a reward model's or a
    critic's is refused before any model is built, naming ``setting`` (``init`` names no checkpoint)."""
    if not value or value == "init":
        return
    path = locate(value, setting)
    refuse_scorer(path, read_meta(path), f"{setting}, which names a policy", named_by=f"{setting}={value}")


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def unwrap(chunk: Any) -> Any:
    """The GPT module inside a DDP wrapper (checkpoint keys must not depend on the wrapper)."""
    return getattr(chunk, "module", chunk)


def _chunk_key(index: int, num_chunks: int) -> str:
    """State-dict entry of a model chunk: "model", or "model<i>" per virtual-pipeline chunk."""
    return "model" if num_chunks == 1 else f"model{index}"


def model_sharded_state_dict(chunks: list[Any]) -> dict[str, Any]:
    """One entry per virtual-pipeline chunk; keys inside carry global layer numbers."""
    return {_chunk_key(i, len(chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _rng_sharded(parallel: Any) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = parallel.layout
    return ShardedObject(
        "rng_state",
        _rng_state(),
        (layout.pipeline, layout.tensor, layout.data),
        (parallel.pp_rank, parallel.tp_rank, parallel.dp_rank),
        replica_id=0,
    )


# what the weights were trained to work with but does not stop them loading: a change is warned about
# (a context extension raises the RoPE base on purpose); checkpoints written before they were recorded lack them
ENCODING_KEYS = ("rotary_base", "rope_scaling_factor", "layernorm_epsilon")


def model_signature(preset: Any) -> dict[str, Any]:
    """The shape fields that must match for weights to load, and the :data:`ENCODING_KEYS`."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "normalization", "activation", "tie_embeddings", "add_bias_linear", *ENCODING_KEYS)
    return {k: getattr(preset, k) for k in keys}


def _in_process_write_results() -> None:
    """Give dist_checkpointing an in-process results queue instead of a Manager server process.

    megatron creates ``multiprocessing.Manager().Queue()`` on first save so results can cross
    from asynchronous writer processes. Keel saves synchronously: results are put and read in
    the saving process itself, so a plain ``queue.Queue`` serves, and no server process is left
    behind when a rank is killed (such orphans kept test and CI pipes open).
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save(
    root: str,
    step: int,
    chunks: list[Any],
    optimizer: Any,
    parallel: Any,
    extra: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically; ``extra`` (JSON-able) goes into keel.json."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if parallel.is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_FORMAT)
    state["rng_state"] = _rng_sharded(parallel)
    _in_process_write_results()
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    maybe_fail("in-save", step)
    if parallel.is_main:
        # checkpoint_id tells this save from another written later at the same path (a run restarted over it)
        meta = dict(extra, step=step, layout=asdict(parallel.layout), has_optimizer=optimizer is not None,
                    checkpoint_id=uuid.uuid4().hex)
        write_text_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(Path(root) / LATEST, final.name)
        _prune(Path(root), keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    maybe_fail("saved", step)
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints; the one ``best`` names is kept."""
    if keep_last <= 0:
        return
    best = (root / BEST).read_text().strip() if (root / BEST).is_file() else None
    complete = sorted(int(m.group(1)) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)))
    for old in complete[:-keep_last]:
        if step_dir(str(root), old).name != best:
            shutil.rmtree(step_dir(str(root), old), ignore_errors=True)


def set_aside(root: str, load: Optional[str], parallel: Any) -> Optional[Path]:
    """Move an earlier run's checkpoint directory out of a fresh run's way (``checkpoint.resume=none``).

    Left in place, the earlier checkpoints would mix with the new run's: ``keep_last`` keeps the highest
    steps, so it could delete the new run's own checkpoint, and ``best`` and a later ``resume=auto`` would
    name the earlier run's weights. ``<root>`` becomes ``<root>.earlier-<date-time>`` (nothing is deleted);
    a ``checkpoint.load`` inside it is refused, since the move would take it away."""
    base = Path(root)
    earlier = base.is_dir() and any(p.name in (LATEST, BEST) or p.name.startswith("step_") for p in base.iterdir())
    if earlier and load and Path(load).resolve().is_relative_to(base.resolve()):
        raise CheckpointError(f"checkpoint.load={load} lies in checkpoint.dir={root}, which a fresh run "
                              "(checkpoint.resume=none) moves aside: give this run another run.output_dir")
    dist.barrier()  # every rank has looked before rank 0 moves anything
    if not earlier:
        return None
    target = base.with_name(f"{base.name}.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
    if parallel.is_main:
        os.replace(base, target)
        held = target / LOCK_NAME  # this run's lock of a checkpoint.dir outside its run directory stays with it
        if held.exists():
            base.mkdir()
            os.replace(held, base / LOCK_NAME)
        logger.warning("checkpoint.resume=none: moved the earlier run's checkpoints %s to %s", base, target)
    dist.barrier()
    return target


def mark_best(root: str, step: int, parallel: Any) -> None:
    """Point ``<root>/best`` at checkpoint ``step`` (written atomically by rank 0)."""
    if parallel.is_main:
        write_text_atomic(Path(root) / BEST, step_dir(root, step).name)
    dist.barrier()


def weights_alone(path: Path) -> str:
    """The remedy for a checkpoint a run cannot resume: a new run that loads its weights (and a run directory
    of its own, since a fresh run moves the earlier checkpoints aside, :func:`set_aside`)."""
    return (f"start a new run from its weights alone: checkpoint.load={path} checkpoint.resume=none, in a "
            "run.output_dir other than the checkpoint's")


def check_compatible(path: Path, meta: dict[str, Any], signature: dict[str, Any]) -> None:
    saved = meta.get("model_signature")
    if saved is None:
        raise CheckpointError(f"{path}: {META} has no model_signature; not a Keel checkpoint")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs model {v!r}" for k, v in signature.items()
             if k not in ENCODING_KEYS and saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{path} was written for a different model shape ({'; '.join(diffs)}); "
            "use a checkpoint of this model or change model.* to match"
        )
    changed = [f"model.{k} {saved[k]!r} -> {signature[k]!r}" for k in ENCODING_KEYS
               if k in saved and k in signature and saved[k] != signature[k]]
    if changed:
        logger.warning("%s: its model was trained with other position or norm settings than this run builds (%s); "
                       "it loads, but computes another function unless that is meant (a context extension)",
                       path, "; ".join(changed))


def _check_optimizer_kind(path: Path, meta: dict[str, Any], distributed: bool) -> None:
    """The distributed optimizer's state and the plain one's are stored differently: resuming with the other
    failed deep in megatron (a KeyError on 'pre_wd_mult')."""
    saved = bool((meta.get("layout") or {}).get("distributed_optimizer", False))
    if saved != distributed:
        raise CheckpointError(
            f"{path} holds the optimizer state of parallel.distributed_optimizer={str(saved).lower()}: resume with "
            f"that setting, or {weights_alone(path)}")


def _prepare_distributed_load(optimizer: Any) -> None:
    """Make megatron 0.16's distributed optimizer loadable with torch's AdamW (its tested path is apex's / TE's).

    * megatron builds the state dict to load into from the inner optimizer's state and asserts that it has
      one 'step'; apex's and TE's Adam allocate that state up front, torch's only at its first step. Zero
      state is allocated here, and the load overwrites it.
    * The fully reshardable load then copies each parameter's loaded tensors into every entry of its state,
      'step' included, which torch keeps there but the loaded tensors lack (megatron restores it from the
      param groups first): the parameter's own step is passed along, a copy onto itself. megatron gave every
      parameter the same step tensor, which torch's AdamW then advanced once per parameter at each step (the
      bias correction went wrong from the first step after a resume): each gets its own copy here.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(part, DistributedOptimizer):
            continue
        inner = part.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}
        if "_set_main_param_and_optimizer_states" not in vars(part):  # once per optimizer
            part._set_main_param_and_optimizer_states = partial(_with_step, part, part._set_main_param_and_optimizer_states)


def _with_step(part: Any, set_states: Any, model_param: Any, tensors: dict[str, torch.Tensor]) -> None:
    group_index, group_order = part.model_param_group_index_map[model_param]
    state = part.optimizer.state[part.optimizer.param_groups[group_index]["params"][group_order]]
    if "step" in state and "step" not in tensors:
        state["step"] = state["step"].clone()
        tensors = {**tensors, "step": state["step"]}
    set_states(model_param, tensors)


def load(
    path: Path,
    chunks: list[Any],
    optimizer: Any,
    parallel: Any,
    signature: dict[str, Any],
    load_optimizer: bool = True,
) -> dict[str, Any]:
    """Load model (+ optimizer, + RNG at the same layout) from ``path``; returns keel.json."""
    from megatron.core import dist_checkpointing

    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {META} or metadata.json)")
    meta = read_meta(path)
    check_compatible(path, meta, signature)
    state = model_sharded_state_dict(chunks)
    _refuse_other_shapes(path, state)
    want_optimizer = load_optimizer and optimizer is not None and meta.get("has_optimizer", False)
    if want_optimizer:
        _check_optimizer_kind(path, meta, parallel.layout.distributed_optimizer)
        _prepare_distributed_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_FORMAT)
    same_layout = meta.get("layout") == asdict(parallel.layout)
    if same_layout:
        state["rng_state"] = _rng_sharded(parallel)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_chunk_key(i, len(chunks))])
    if want_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    logger.info("loaded checkpoint %s (step %s%s)", path, meta.get("step"), "" if same_layout else ", resharded")
    return meta


def _refuse_other_shapes(path: Path, state: dict[str, Any]) -> None:
    """A tensor the checkpoint holds with another shape than this model's (a reward head of other
    ``rm.attributes``, a critic's head) is a one-line error before loading, not megatron's exception."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    available = dist_checkpointing.load_tensors_metadata(str(path))
    for tensor in nested_values(state):
        saved = available.get(tensor.key) if isinstance(tensor, ShardedTensor) else None
        if saved is not None and tuple(saved.global_shape) != tuple(tensor.global_shape):
            raise CheckpointError(
                f"{path} holds {tensor.key} with shape {list(saved.global_shape)}, and this model's is "
                f"{list(tensor.global_shape)}: the checkpoint was written with other settings (for a reward or "
                "value head, rm.type and rm.attributes set its shape); resume with the checkpoint's settings, or "
                f"{weights_alone(path)}")


def _filter_to_checkpoint(state: Any, available: dict[str, Any], skipped: list[str]) -> Any:
    """Drop tensors the checkpoint lacks or holds with another global shape (recorded in ``skipped``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(state, dict):
        kept = {}
        for key, value in state.items():
            filtered = _filter_to_checkpoint(value, available, skipped)
            if filtered is not None:
                kept[key] = filtered
        return kept
    if isinstance(state, (ShardedTensor, ShardedTensorFactory)):
        meta = available.get(state.key)
        shape_ok = not isinstance(state, ShardedTensor) or (meta is not None and tuple(meta.global_shape) == tuple(state.global_shape))
        if meta is None or not shape_ok:
            skipped.append(state.key)
            return None
    return state


def load_weights(path: Path, chunks: list[Any], parallel: Any, signature: dict[str, Any]) -> list[str]:
    """Initialise model weights from ``path`` (any layout); returns the keys left at initialisation.

    Tensors the checkpoint does not have, or has with another shape (e.g. a reward head on an
    SFT checkpoint, or a 5-attribute head loaded into a 1-output model), keep their initial values.
    """
    from megatron.core import dist_checkpointing

    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {META} or metadata.json)")
    meta = read_meta(path)
    check_compatible(path, meta, signature)
    if not any(hasattr(unwrap(chunk), "num_outputs") for chunk in chunks):  # a policy, not a scorer
        refuse_scorer(path, meta, "a policy's weights")
    available = dist_checkpointing.load_tensors_metadata(str(path))
    skipped: list[str] = []
    state = _filter_to_checkpoint(model_sharded_state_dict(chunks), available, skipped)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded.get(_chunk_key(i, len(chunks)), {}), strict=False)
    if skipped and getattr(parallel, "tp_rank", 0) == 0 and getattr(parallel, "dp_rank", 0) == 0:  # once a stage
        logger.warning("initialised from %s; kept fresh weights for %s", path, ", ".join(sorted(set(skipped))),
                       extra=EVERY_RANK)  # the head lives on the last pipeline stage only
    return sorted(set(skipped))
