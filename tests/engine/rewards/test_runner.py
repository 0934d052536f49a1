"""RewardRunner: weights and components, batched functions, and failures that never stall the batch."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import ConfigError
from engine.rewards import RewardError, RewardFunctionConfig, RewardRunner

SAMPLE = "tests.engine.rewards.sample_rewards"
BAD_ROW = 2
PROMPTS = ["What is 1 + 2?", "What is 2 + 2?", "What is 3 + 2?", "What is 4 + 2?", "What is 5 + 2?"]
RESPONSES = ["3", "It is 5", "5", "6", "please, the answer is 7"]


def metadata(bad: bool = True) -> list[dict[str, Any]]:
    return [{"answer": int(p.split()[2]) + 2, "misbehave": bad and row == BAD_ROW} for row, p in enumerate(PROMPTS)]


def score(configs: list[RewardFunctionConfig], workers: int = 1, bad: bool = True) -> Any:
    with RewardRunner(configs, workers=workers) as runner:
        return runner.score(PROMPTS, RESPONSES, metadata(bad))


@pytest.mark.parametrize("workers", [0, 1])
def test_weights_components_and_external(workers: int) -> None:
    configs = [RewardFunctionConfig("synthetic_check"), RewardFunctionConfig("math_answer", weight=2.0),
               RewardFunctionConfig(f"{SAMPLE}:brevity", weight=-0.5, kwargs={"limit": 1})]
    result = score(configs, workers)
    assert result.components == {"synthetic_check": [1.0, 0.0, 1.0, 1.0, 1.0],
                                 "math_answer": [1.0, 0.0, 1.0, 1.0, 1.0],
                                 f"{SAMPLE}:brevity": [1.0, 0.0, 1.0, 1.0, 0.0]}
    assert result.totals == [2.5, 0.0, 2.5, 2.5, 3.0] and all(result.keep)
    result.add_component("rm", [0.5, 1.0, -1.0, 0.0, 2.0], weight=0.5)
    assert result.totals == [2.75, 0.5, 2.0, 2.5, 4.0] and result.weights["rm"] == 0.5
    means = result.metrics()
    assert means["rewards/total"] == pytest.approx(sum(result.totals) / 5) and means["rewards/rm"] == 0.5
    assert means["rewards/errors/math_answer"] == 0.0 and means["rewards/skipped_rows"] == 0.0
    with pytest.raises(ValueError, match="'rm' already exists"):
        result.add_component("rm", [0.0] * 5)
    with pytest.raises(ValueError, match="rows \\[1\\] are not"):
        result.add_component("rm2", [0.0, math.nan, 0.0, 0.0, 0.0])


def test_dict_returns_are_summed_and_reported_as_subscores() -> None:
    result = score([RewardFunctionConfig(f"{SAMPLE}:parts", label="style", weight=2.0)], workers=0)
    assert result.subscores["style/short"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert result.subscores["style/polite"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert result.components["style"] == [1.0, 0.0, 1.0, 1.0, 1.0] and result.totals[4] == 2.0


def test_batched_functions_get_lists() -> None:
    configs = [RewardFunctionConfig(f"{SAMPLE}:lengths", label="length"),
               RewardFunctionConfig("sample_batched_parity", kwargs={"odd": 3.0})]
    result = score(configs, workers=2, bad=False)
    assert result.components["length"] == [float(len(r)) for r in RESPONSES]
    assert result.components["sample_batched_parity"] == [3.0 if len(r) % 2 else 0.0 for r in RESPONSES]


def test_a_batched_call_of_the_wrong_length_fails_its_rows() -> None:
    result = score([RewardFunctionConfig(f"{SAMPLE}:lengths", label="length", on_error="skip")], workers=1)
    assert not any(result.keep) and result.errors["length"] == 5
    assert "returned 1 values for 5 rows" in result.failures[0].message


@pytest.mark.parametrize("function, kind, text", [
    ("raises", "error", "ZeroDivisionError: this row is bad"),
    ("returns_nan", "invalid", "returned nan"),
    ("returns_text", "invalid", "returned str 'high', not a number"),
    ("sleeps", "timeout", "took longer than 0.3 s"),
])
@pytest.mark.parametrize("on_error", ["zero", "skip"])
def test_a_bad_row_is_reported_and_handled(function: str, kind: str, text: str, on_error: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    configs = [RewardFunctionConfig(f"{SAMPLE}:{function}", label="bad", timeout_seconds=0.3, on_error=on_error),
               RewardFunctionConfig("synthetic_check")]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="engine.rewards"):
        result = score(configs, workers=1)
    assert time.monotonic() - started < 10  # 60 s sleeps: the batch did not wait for them
    assert [(f.row, f.component, f.kind) for f in result.failures] == [(BAD_ROW, "bad", kind)]
    assert text in result.failures[0].message
    assert f"reward function 'bad': {kind} on row {BAD_ROW}" in caplog.text
    counts = result.timeouts if kind == "timeout" else result.errors
    assert counts["bad"] == 1 and (result.errors if kind == "timeout" else result.timeouts)["bad"] == 0
    assert result.components["bad"] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert result.keep == [row != BAD_ROW or on_error == "zero" for row in range(5)]
    assert result.totals[BAD_ROW] == (1.0 if on_error == "zero" else 0.0)
    assert all(math.isfinite(t) for t in result.totals)


def test_on_error_raise_names_function_and_row() -> None:
    configs = [RewardFunctionConfig(f"{SAMPLE}:returns_nan", on_error="raise")]
    with pytest.raises(RewardError, match=rf"'{SAMPLE}:returns_nan' failed on row {BAD_ROW} \(invalid\): returned nan"):
        score(configs, workers=1)


@pytest.fixture
def one_worker() -> Iterator[RewardRunner]:
    configs = [RewardFunctionConfig(f"{SAMPLE}:ignores_interrupt", label="stuck", timeout_seconds=0.3),
               RewardFunctionConfig(f"{SAMPLE}:exits", label="exits", on_error="skip"),
               RewardFunctionConfig("sample_pid")]
    with RewardRunner(configs, workers=1) as runner:
        yield runner


def test_hung_and_dead_workers_are_replaced_and_the_pool_lives_on(one_worker: RewardRunner) -> None:
    started = time.monotonic()
    result = one_worker.score(PROMPTS, RESPONSES, metadata())
    assert time.monotonic() - started < 20
    kinds = {(f.component, f.row): f.kind for f in result.failures}
    assert kinds == {("stuck", BAD_ROW): "timeout", ("exits", BAD_ROW): "error"}
    assert "killed and replaced" in next(f.message for f in result.failures if f.component == "stuck")
    assert one_worker.replaced_workers == 2
    assert result.components["stuck"] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert result.keep == [True, True, False, True, True]
    pids = set(result.components["sample_pid"])
    assert len(pids) == 1 and os.getpid() not in pids
    again = one_worker.score(PROMPTS, RESPONSES, metadata(bad=False))
    assert not again.failures and set(again.components["sample_pid"]) == pids  # same worker, kept alive


def test_a_sigterm_to_the_process_group_leaves_the_workers_scoring() -> None:
    """Slurm and torchrun signal the whole group: the trainer finishes its step and checkpoints, so the step's
    rows must still be scored, not zeroed by ``on_error`` because the worker died with the signal."""
    configs = [RewardFunctionConfig(f"{SAMPLE}:signalled", label="signalled"), RewardFunctionConfig("sample_pid")]
    with RewardRunner(configs, workers=1) as runner:
        result = runner.score(PROMPTS, RESPONSES, metadata())
        assert not result.failures and runner.replaced_workers == 0
        assert result.components["signalled"] == [1.0] * len(PROMPTS)


def test_empty_batch_and_bad_inputs() -> None:
    runner = RewardRunner([RewardFunctionConfig("synthetic_check")], workers=0)
    empty = runner.score([], [], [])
    assert empty.totals == [] and empty.metrics()["rewards/total"] == 0.0
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        runner.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="prompt 0 is a list"):
        runner.score([[{"role": "user", "content": "hi"}]], ["x"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="workers=-1"):
        RewardRunner([], workers=-1)


def test_builtins_cost_little_per_row() -> None:
    rows = 2000
    prompts = [f"What is {i % 90} + 7?" for i in range(rows)]
    responses = [f"Adding them gives \\boxed{{{i % 90 + 7}}}. So the answer is {i % 90 + 7}." for i in range(rows)]
    configs = [RewardFunctionConfig("synthetic_check"), RewardFunctionConfig("math_answer"),
               RewardFunctionConfig("regex_format", kwargs={"pattern": r"\\boxed\{"}),
               RewardFunctionConfig("length_penalty", kwargs={"target": 20, "scale": 20})]
    with RewardRunner(configs, workers=2) as runner:
        runner.score(prompts[:4], responses[:4], [{"answer": 0}] * 4)  # start the workers
        started = time.monotonic()
        result = runner.score(prompts, responses, [{"answer": i % 90 + 7} for i in range(rows)])
        elapsed = time.monotonic() - started
    assert result.means()["synthetic_check"] == result.means()["math_answer"] == 1.0
    assert elapsed < 2.0, f"{rows} rows x 4 built-ins took {elapsed:.2f} s"


def test_a_reward_functions_connection_error_is_not_a_lost_rank() -> None:
    """A remote judge's 'Connection reset by peer' raised with on_error: raise read as another rank lost."""
    from engine.parallel.failures import explain

    judged = RewardError("reward function 'judge' failed on row 0 (error): ConnectionResetError: [Errno 104] "
                         "Connection reset by peer")
    assert explain(judged, 0, 30, "during training") is None
    assert explain(RuntimeError("[Errno 104] Connection reset by peer"), 0, 30, "during training") is not None


@pytest.mark.parametrize("function", ["raises_always", "returns_nan_always"])
def test_a_function_that_fails_on_every_row_stops_even_with_on_error_zero(function: str) -> None:
    """Scored 0 on every row, a broken function (an import, a signature) trained a run on nothing and the run
    exited 0. One that fails on some rows goes on (above); a batch of one row says nothing of the function."""
    configs = [RewardFunctionConfig(f"{SAMPLE}:{function}", label="broken"), RewardFunctionConfig("synthetic_check")]
    with pytest.raises(RewardError, match=r"'broken' failed on every one of the 5 rows scored together \(row 0, "
                                          r"(error|invalid): .*with on_error=zero it would score them all 0"):
        score(configs, workers=0)
    with RewardRunner(configs, workers=0) as runner:
        assert runner.score(PROMPTS[:1], RESPONSES[:1], metadata()[:1]).errors["broken"] == 1
    skipped = score([RewardFunctionConfig(f"{SAMPLE}:{function}", label="broken", on_error="skip")], workers=0)
    assert not any(skipped.keep)  # on_error=skip drops the rows (a run with none left stops on its own)
