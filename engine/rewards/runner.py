"""Score a batch of rollouts with every configured reward function and combine them with weights.

``total[row] = sum(weight_f * value_f[row])`` over the functions, plus any external
component the caller adds (:meth:`RewardResult.add_component`, e.g. a reward model's scores
as ``"rm"``). Every component is kept, so the trainer can log each one's mean.

A call that raises, runs past its ``timeout_seconds`` or returns NaN/inf/a non-number is
logged with its row and function and handled by the function's ``on_error``: ``zero``
scores the component 0.0, ``skip`` marks the row to be dropped (``keep[row]`` False, its
total 0.0), ``raise`` raises :class:`RewardError` once the batch is done. Totals are never
NaN. Calls run in a pool of worker processes kept between batches (:mod:`engine.rewards.pool`);
``workers=0`` runs them in this process instead (no timeouts: trusted, cheap functions only).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from engine.errors import ConfigError
from engine.rewards.config import RewardFunctionConfig, parse_reward_configs
from engine.rewards.pool import Failure, WorkerPool, failures_of
from engine.rewards.registry import resolve_reward
from engine.rewards.worker import Evaluator, FunctionSpec, RewardError, Row, Task, Value

logger = logging.getLogger(__name__)

MAX_LOGGED_PER_FUNCTION = 5  # failure lines per function and batch; the rest are counted


@dataclass(frozen=True)
class RowFailure:
    """One row whose ``component`` failed: ``kind`` is ``error``, ``timeout`` or ``invalid``."""

    row: int
    component: str
    kind: str
    message: str


@dataclass
class RewardResult:
    """Rewards of one batch.

    ``totals[row]``: weighted sum of the components (0.0 for rows not kept; never NaN).
    ``keep[row]``: False when a function with ``on_error: skip`` failed on the row.
    ``components[name][row]``: each function's value (0.0 where it failed) and each external
    component; ``weights[name]`` its weight. ``subscores["<name>/<key>"][row]``: the parts of a
    function that returns a dict (NaN where absent or failed). ``errors`` / ``timeouts``: rows
    per function whose call failed / timed out; ``failures`` lists them all.
    """

    totals: list[float]
    keep: list[bool]
    components: dict[str, list[float]]
    weights: dict[str, float]
    subscores: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    failures: list[RowFailure] = field(default_factory=list)

    def add_component(self, name: str, values: Sequence[float], weight: float = 1.0) -> None:
        """Add an external component (e.g. ``"rm"``: reward-model scores) with ``weight`` to the totals."""
        if name in self.components:
            raise ValueError(f"reward component {name!r} already exists; pick another name")
        if len(values) != len(self.totals):
            raise ValueError(f"reward component {name!r} has {len(values)} values for {len(self.totals)} rows")
        column = [float(value) for value in values]
        bad = [row for row, value in enumerate(column) if not math.isfinite(value)]
        if bad or not math.isfinite(weight):
            raise ValueError(f"reward component {name!r}: weight {weight} and values must be finite; "
                             f"rows {bad[:10]} are not")
        self.components[name] = column
        self.weights[name] = float(weight)
        self.totals = [total + weight * value if kept else total
                       for total, value, kept in zip(self.totals, column, self.keep, strict=True)]

    def means(self) -> dict[str, float]:
        """Mean over kept rows of ``total``, every component and every subscore (0.0 with no kept row)."""
        kept = [row for row, keep in enumerate(self.keep) if keep]

        def mean(column: Sequence[float]) -> float:
            present = [column[row] for row in kept if not math.isnan(column[row])]
            return sum(present) / len(present) if present else 0.0

        columns = {"total": self.totals, **self.components, **self.subscores}
        return {name: mean(column) for name, column in columns.items()}

    def metrics(self, prefix: str = "rewards") -> dict[str, float]:
        """Flat metrics for the trainer's log: means, error and timeout counts, and skipped rows."""
        out = {f"{prefix}/{name}": value for name, value in self.means().items()}
        out.update({f"{prefix}/errors/{name}": float(count) for name, count in self.errors.items()})
        out.update({f"{prefix}/timeouts/{name}": float(count) for name, count in self.timeouts.items()})
        out[f"{prefix}/skipped_rows"] = float(len(self.keep) - sum(self.keep))
        return out


ConfigLike = Union[RewardFunctionConfig, Mapping[str, Any]]


def _spec(config: RewardFunctionConfig, in_process: bool) -> FunctionSpec:
    function = resolve_reward(config.name)
    function.validate_kwargs(config.kwargs)
    spec = FunctionSpec(config.component, function.fn, dict(config.kwargs), function.batched, config.timeout_seconds)
    if in_process:
        return spec
    if function.fn.__module__ == "__main__":
        raise ConfigError(f"reward function {config.name!r} is defined in the script run as __main__; worker "
                          "processes cannot import it: move it to a module and name it 'package.module:function'")
    try:
        pickle.dumps(spec)
    except Exception as exc:
        raise ConfigError(f"reward function {config.name!r} cannot be sent to a worker process ({exc}); define "
                          "it at module level and keep its kwargs plain data") from None
    return spec


class RewardRunner:
    """Scores batches with the configured reward functions; the worker pool lives until :meth:`close`.

    Every function is resolved and its kwargs checked here, before any work (:class:`ConfigError`).
    """

    def __init__(self, configs: Sequence[ConfigLike], workers: int = 2):
        if workers < 0:
            raise ConfigError(f"reward workers={workers} must be >= 0 (0 = run in this process, no timeouts)")
        self.configs = parse_reward_configs(list(configs), "reward functions")
        self.specs = [_spec(config, in_process=workers == 0) for config in self.configs]
        self.workers = workers
        self._pool = WorkerPool(self.specs, workers) if workers and self.specs else None

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`score` starts new ones)."""
        if self._pool is not None:
            self._pool.close()

    @property
    def replaced_workers(self) -> int:
        """Workers killed (hung) or found dead and replaced so far."""
        return self._pool.replaced if self._pool is not None else 0

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              metadata: Optional[Sequence[Mapping[str, Any]]] = None) -> RewardResult:
        """Rewards of rollouts ``(prompts[i], responses[i], metadata[i])`` (see :class:`RewardResult`).

        ``prompts`` are strings (:attr:`engine.data.prompts.PromptRow.text`); ``metadata`` defaults to
        empty dicts (:meth:`engine.data.prompts.PromptRow.reward_metadata` gives the row's).
        """
        metadata = metadata if metadata is not None else [{}] * len(prompts)
        if not len(prompts) == len(responses) == len(metadata):
            raise ValueError(f"score() got {len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(metadata)} metadata dicts; give one of each per rollout")
        for name, column in (("prompt", prompts), ("response", responses)):
            wrong = next((row for row, item in enumerate(column) if not isinstance(item, str)), None)
            if wrong is not None:
                raise TypeError(f"score(): {name} {wrong} is a {type(column[wrong]).__name__}, not a string")
        return self.score_rows(list(zip(prompts, responses, (dict(item) for item in metadata), strict=True)))

    def score_rows(self, rows: Sequence[Row]) -> RewardResult:
        """Rewards of ``(prompt, response, metadata)`` rows."""
        if not rows or not self.specs:
            values: list[list[Optional[Value]]] = [[None] * len(rows) for _ in self.specs]
            return self._assemble(len(rows), values, [])
        if self._pool is None:
            task = Task(0, 0, list(rows))
            result = Evaluator(self.specs).run(task)
            return self._assemble(len(rows), result.values, failures_of(task, result.problems))
        return self._assemble(len(rows), *self._pool.run(rows))

    def _assemble(self, size: int, values: list[list[Optional[Value]]], failures: list[Failure]) -> RewardResult:
        components: dict[str, list[float]] = {}
        subscores: dict[str, list[float]] = {}
        for config, column in zip(self.configs, values, strict=True):
            components[config.component] = [_scalar(value) for value in column]
            for row, value in enumerate(column):
                for key, part in (value.items() if isinstance(value, dict) else ()):
                    subscores.setdefault(f"{config.component}/{key}", [math.nan] * size)[row] = part
        result = RewardResult([0.0] * size, [True] * size, components,
                              {config.component: config.weight for config in self.configs}, subscores,
                              {config.component: 0 for config in self.configs},
                              {config.component: 0 for config in self.configs})
        raised = self._apply_failures(result, failures)
        result.totals = self._totals(result)
        if raised is not None:
            raise RewardError(f"reward function {raised.component!r} failed on row {raised.row} ({raised.kind}): "
                              f"{raised.message}. Fix the function, or set its on_error to 'zero' or 'skip' "
                              "to carry on past such rows")
        self._refuse_broken(result, size)
        return result

    def _refuse_broken(self, result: RewardResult, size: int) -> None:
        """A function with ``on_error: zero`` that failed on every row of a batch of several is broken (an
        import, a signature, a missing field), not unlucky: scored 0 everywhere, a run trained on nothing
        from it and exited 0. Timeouts are not counted here: a slow machine is no broken function."""
        for config in self.configs:
            if config.on_error != "zero" or size < 2 or result.errors[config.component] < size:
                continue
            first = next(f for f in result.failures if f.component == config.component and f.kind != "timeout")
            raise RewardError(f"reward function {config.component!r} failed on every one of the {size} rows scored "
                              f"together (row {first.row}, {first.kind}: {first.message}); with on_error=zero it "
                              "would score them all 0, a reward that teaches nothing. Fix the function: a response "
                              "it means to score 0 returns 0")

    def _apply_failures(self, result: RewardResult, failures: list[Failure]) -> Optional[RowFailure]:
        """Count, log and apply each failure per its function's on_error; the first ``raise`` one is returned."""
        logged: dict[str, int] = defaultdict(int)
        raised: Optional[RowFailure] = None
        for failure in failures:
            config = self.configs[failure.function]
            name = config.component
            counts = result.timeouts if failure.kind == "timeout" else result.errors
            counts[name] += len(failure.rows)
            rows = failure.rows
            result.failures += [RowFailure(row, name, failure.kind, failure.message) for row in rows]
            if logged[name] < MAX_LOGGED_PER_FUNCTION:
                place = f"row {rows[0]}" if len(rows) == 1 else f"rows {rows[0]}-{rows[-1]} (one batched call)"
                logger.warning("reward function %r: %s on %s: %s (on_error=%s)", name, failure.kind, place,
                               failure.message, config.on_error)
            logged[name] += 1
            if config.on_error == "skip":
                for row in rows:
                    result.keep[row] = False
            elif config.on_error == "raise" and raised is None:
                raised = result.failures[-len(rows)]
        for name, count in logged.items():
            if count > MAX_LOGGED_PER_FUNCTION:
                logger.warning("reward function %r: %d more failed calls in this batch not shown",
                               name, count - MAX_LOGGED_PER_FUNCTION)
        return raised

    def _totals(self, result: RewardResult) -> list[float]:
        totals = []
        for row in range(len(result.keep)):
            total = sum(config.weight * result.components[config.component][row] for config in self.configs)
            if not math.isfinite(total):  # finite values whose weighted sum overflows
                logger.warning("reward total of row %d is %s; the row is skipped", row, total)
                result.keep[row] = False
            totals.append(total if result.keep[row] else 0.0)
        return totals


def _scalar(value: Optional[Value]) -> float:
    if value is None:
        return 0.0
    return sum(value.values()) if isinstance(value, dict) else value
