"""The checkpoints a run's frozen models read at every start, pinned to the step they named when it began.

A DPO reference, an online run's KL reference or reward model is given as a run or checkpoints directory more
often than as a step, and such a directory names its ``best`` (else newest) checkpoint *when it is read*. Read
again at a resume, after the SFT run behind it trained on or was restarted, it named another step: the resumed
run trained against another reference, its losses no longer those of the run it continued, and nothing said so.

So a fresh run replaces each such setting with the step directory it names (the saved ``config.yaml`` and every
checkpoint's config then show it), and a resumed run takes the step its checkpoint records: it warns when the
setting now names another step, and stops when the recorded step is gone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from engine.checkpoint.dist import CheckpointError, is_complete, is_step_dir, locate, read_meta

logger = logging.getLogger(__name__)


def frozen_settings(config: Any, unread: tuple[str, ...] = ()) -> list[str]:
    """The settings of ``config`` (dotted names) whose checkpoint a frozen model loads at every start: those its
    class lists in ``FROZEN`` that name a checkpoint, less the ``unread`` ones (a KL reference under
    ``grpo.kl=none``), and ``checkpoint.load`` where one of them is ``init`` (the policy's starting weights)."""
    listed = [name for name in getattr(type(config), "FROZEN", ()) if name not in unread]
    names = [name for name in listed if _get(config, name) not in (None, "init")]
    if config.checkpoint.load and any(_get(config, name) == "init" for name in listed):
        names.append("checkpoint.load")
    return names


def pin_frozen(config: Any, resumed: Optional[dict[str, Any]] = None,
               unread: tuple[str, ...] = ()) -> dict[str, Optional[str]]:
    """Set each of :func:`frozen_settings` to the step directory it names; when resuming (``resumed``: the keel.json
    of the checkpoint resumed), to the step the run began with. Returns ``{setting: checkpoint_id}`` of the steps,
    which the run's checkpoints record: a step written again at the same path (the SFT run restarted with
    ``checkpoint.resume=none`` saves its steps under the same names) is refused on resume."""
    saved_config, saved_ids = (resumed or {}).get("config") or {}, (resumed or {}).get("frozen_ids") or {}
    ids: dict[str, Optional[str]] = {}
    for name in frozen_settings(config, unread):
        value = _get(config, name)
        then = _saved(saved_config, name)
        if then is None or not is_step_dir(then):  # a fresh run, or one from before steps were pinned
            path = locate(value, name)
            ids[name] = read_meta(path).get("checkpoint_id")
        else:
            path = Path(then)
            ids[name] = _check_pinned_step(name, value, path, saved_ids.get(name))
        _set(config, name, str(path))
    return ids


def _check_pinned_step(name: str, value: str, then: Path, then_id: Optional[str]) -> Optional[str]:
    """The ``checkpoint_id`` of the step ``then`` a resumed run began with for ``name`` (now set to ``value``),
    refused unless it is still the same checkpoint; warned about when ``value`` now names another step."""
    if not is_complete(then):
        raise CheckpointError(f"{name}: this run began with {then}, which is gone: the run resumed would train "
                              f"against other weights than it began with; {_REMEDY}")
    now_id = read_meta(then).get("checkpoint_id")
    if then_id is not None and now_id != then_id:
        raise CheckpointError(f"{name}: {then} was written again since this run began (a run restarted over it; "
                              f"its earlier checkpoints were moved to a checkpoints.earlier-* directory beside it): "
                              f"the run resumed would train against other weights than it began with; {_REMEDY}")
    try:
        now: Optional[Path] = locate(value, name)
    except CheckpointError:
        now = None
    if now is None or now.resolve() != then.resolve():
        logger.warning("%s=%s now names %s; this run began with %s and keeps it, as a resumed run must", name, value,
                       now or "no complete checkpoint", then)
    return now_id


_REMEDY = "put that checkpoint back, or start a new run (another run.output_dir, or checkpoint.resume=none)"


def _get(config: Any, name: str) -> Any:
    for part in name.split("."):
        config = getattr(config, part)
    return config


def _set(config: Any, name: str, value: Any) -> None:
    *parents, last = name.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, last, value)


def _saved(saved: Optional[dict[str, Any]], name: str) -> Optional[str]:
    for part in name.split("."):
        if not isinstance(saved, dict):
            return None
        saved = saved.get(part)
    return saved if isinstance(saved, str) else None
