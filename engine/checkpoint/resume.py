"""What a resumed run must share with the checkpoint it resumes, checked before a tensor is read.

A resume restores weights, optimizer moments, the schedule and the data order, so the checkpoint must
come from the same kind of run. Without these checks an SFT checkpoint resumed by ``keel train dpo``
trained on as if it were a DPO run; one written at another ``precision.dtype`` or head shape failed
deep in megatron with a KeyError or a CheckpointingException. Each refusal here is one line that says
how to go on: resume with the checkpoint's setting, or start from its weights alone
(``checkpoint.load``) where that is possible. What may change on resume (data settings, a checkpoint
without optimizer state) is warned about instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from engine.checkpoint.dist import CheckpointError, scorer_kind, weights_alone
from engine.errors import ConfigError

logger = logging.getLogger(__name__)

# data settings a resumed run may change, each warned about: the same rows under another name or form train on
DATA_SETTINGS = ("source", "format", "loss_on", "pack", "chat_template", "overlong", "global_batch_size",
                 "seq_length")


def check_resume(path: Path, meta: dict[str, Any], config: Any, algorithm: str) -> None:
    """Refuse to resume ``path`` (keel.json ``meta``) into a run of ``algorithm`` with ``config`` when the
    two cannot continue one another; warn about what changes."""
    _check_algorithm(path, meta, algorithm)
    saved = meta.get("config") or {}
    _check_precision(path, meta, saved, config)
    _check_tokenizer(path, saved, config)
    if not meta.get("has_optimizer", True):
        logger.warning("%s holds no optimizer state (it was saved with checkpoint.save_optimizer=false): Adam's "
                       "moments restart from zero at step %s, so the steps after it differ from an uninterrupted "
                       "run's", path, meta.get("step"))


def _check_algorithm(path: Path, meta: dict[str, Any], algorithm: str) -> None:
    saved = meta.get("algorithm")
    if saved is None or saved == algorithm:
        return
    what = {"critic": "a PPO critic's", "convert": "a `keel convert` output's"}.get(saved, f"a `keel train {saved}` run's")
    remedy = {"critic": "resume the PPO run it belongs to", "convert": "a conversion is no run to resume"}.get(
        saved, f"resume it with `keel train {saved}`")
    if algorithm == "rm" or scorer_kind(meta) is None:  # a reward model starts from any trunk, a policy from a policy
        remedy += f", or {weights_alone(path)}"
    else:
        remedy += f"; a {scorer_kind(meta)} has no language-model head to start a policy from"
    raise CheckpointError(f"checkpoint.resume: {path} is {what} checkpoint, and this is `keel train {algorithm}`: "
                          f"a run resumes only its own algorithm's checkpoints; {remedy}")


def _check_precision(path: Path, meta: dict[str, Any], saved: dict[str, Any], config: Any) -> None:
    """bf16 keeps fp32 master weights in the optimizer and fp32 does not: their optimizer states differ."""
    dtype = (saved.get("precision") or {}).get("dtype")
    if dtype is None or dtype == config.precision.dtype or not meta.get("has_optimizer", True):
        return
    raise CheckpointError(f"checkpoint.resume: {path} holds the optimizer state of a precision.dtype={dtype} run, "
                          f"and this one is precision.dtype={config.precision.dtype}: resume with "
                          f"precision.dtype={dtype}, or {weights_alone(path)}")


def _check_tokenizer(path: Path, saved: dict[str, Any], config: Any) -> None:
    from engine.checkpoint.inherit import refuse_other_tokenizer

    theirs = (saved.get("data") or {}).get("tokenizer")
    try:
        refuse_other_tokenizer(str(path), config.data.tokenizer, theirs, setting="checkpoint.resume")
    except ConfigError as exc:  # raised alike on every rank: each says it, as checkpoint errors are
        raise CheckpointError(str(exc)) from None


def changed_data_settings(meta: dict[str, Any], config: Any) -> list[str]:
    """``data.<key>: old -> new`` for each of :data:`DATA_SETTINGS` this run sets otherwise than the checkpoint's."""
    old = (meta.get("config") or {}).get("data") or {}
    return [f"data.{key}: {old[key]} -> {getattr(config.data, key)}" for key in DATA_SETTINGS
            if key in old and hasattr(config.data, key) and not _same(old[key], getattr(config.data, key))]


def _same(old: Any, new: Any) -> bool:
    """Equal settings, or two names of one file (``sft.jsonl`` and its absolute path)."""
    if old == new:
        return True
    try:
        return isinstance(old, str) and isinstance(new, str) and os.path.samefile(old, new)
    except OSError:
        return False


def carried_best(path: Path, meta: dict[str, Any], checkpoint_dir: str) -> Optional[tuple[int, float]]:
    """The checkpoint's best validation (step, loss), when ``path`` is one of this run's checkpoints: another
    run's best names a step of that run, which this run's ``best`` pointer does not hold."""
    best = meta.get("best_validation")
    if not best:
        return None
    if Path(path).resolve().parent != Path(checkpoint_dir).resolve():
        logger.info("resumed from another run's checkpoint: its best validation (step %s) is not carried over, "
                    "and this run marks its own best", best[0])
        return None
    return int(best[0]), float(best[1])
