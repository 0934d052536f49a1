"""How the forward-only pass over rollouts (π_old, reference, critic values) splits its rows.

A stand-in runner whose "model" returns each position's token id lets the test read which rows
a replica computed, in which micro-batches and at which widths, and check the values it puts at
each response token. The gather over real data-parallel ranks is covered end to end by
``tests/distributed/test_online.py`` (TP1×DP2 against TP2: the same losses, rollout log-probs
equal to the trainer's).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine.algorithms import logprobs

# prompt + response token ids; every id is distinct, so a value names its row and position
SEQUENCES = [[100 * r + t for t in range(1, n + 1)] for r, n in enumerate([5, 9, 4, 12, 7, 3, 10])]
PROMPTS = [2, 3, 1, 4, 2, 2, 5]


class _Runner:
    """``run_schedule`` calls megatron's contract: ``forward_step(iterator, model) -> (output, collect)``."""

    def __init__(self, dp_rank: int, data: int, pipeline: int) -> None:
        layout = SimpleNamespace(data=data, pipeline=pipeline, tensor=1, sequence_parallel=False)
        self.parallel = SimpleNamespace(dp_rank=dp_rank, layout=layout, is_last_stage=lambda: True)
        self.batches: list[dict[str, torch.Tensor]] = []

    def run_schedule(self, batches: list[dict[str, torch.Tensor]], step: Any, forward_only: bool,
                     collect_outputs: bool) -> list[torch.Tensor]:
        assert forward_only and collect_outputs
        self.batches = batches
        data = iter(batches)
        model = lambda tokens, positions, mask: tokens.float()  # noqa: E731
        outputs = []
        for _ in batches:
            output, collect = step(data, model)
            outputs.append(collect(output))
        return outputs


def _token_at_position(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output


def _run(monkeypatch: pytest.MonkeyPatch, dp_rank: int, data: int, pipeline: int = 1) -> tuple[_Runner, list]:
    gathered: dict[str, Any] = {}

    def gather(local: torch.Tensor, total_rows: int, parallel: Any) -> torch.Tensor:
        gathered["local"] = local
        full = torch.full((total_rows, local.shape[1]), float("nan"))
        full[parallel.dp_rank:: parallel.layout.data] = local
        return full

    monkeypatch.setattr("engine.parallel.collectives.gather_data_parallel_rows", gather)
    monkeypatch.setattr("engine.parallel.collectives.from_last_stage", lambda value, parallel: value)  # one stage here
    runner = _Runner(dp_rank, data, pipeline)
    values = logprobs.response_values(runner, SEQUENCES, PROMPTS, _token_at_position, micro_batch_size=2)
    assert gathered["local"].shape == (len(range(dp_rank, len(SEQUENCES), data)), max(map(len, SEQUENCES)))
    return runner, values


@pytest.mark.parametrize("dp_rank", [0, 1, 2])
def test_each_replica_computes_its_round_robin_share_longest_first_cut_to_length(monkeypatch: pytest.MonkeyPatch,
                                                                                dp_rank: int) -> None:
    runner, values = _run(monkeypatch, dp_rank, data=3)
    mine = list(range(dp_rank, len(SEQUENCES), 3))
    rows_seen = [int(row[0]) // 100 for batch in runner.batches for row in batch["tokens"] if int(row[0]) > 0]
    assert sorted(rows_seen) == mine  # this replica's rows only, each once
    assert rows_seen == sorted(mine, key=lambda r: -len(SEQUENCES[r]))
    for batch in runner.batches:  # each micro-batch as wide as its longest row
        assert batch["tokens"].shape[1] == max(int((row > 0).sum()) for row in batch["tokens"])
    for r in range(len(SEQUENCES)):
        if r in mine:  # the value at label position t is the token at t: positions prompt-1 .. len-2
            assert values[r] == [float(t) for t in SEQUENCES[r][PROMPTS[r] - 1: -1]]
        else:  # another replica's row: left to the gather
            assert all(v != v for v in values[r])


def test_under_pipeline_parallelism_every_micro_batch_has_the_longest_width(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, values = _run(monkeypatch, dp_rank=0, data=1, pipeline=2)
    assert {batch["tokens"].shape[1] for batch in runner.batches} == {12}
    assert values == [[float(t) for t in s[p - 1: -1]] for s, p in zip(SEQUENCES, PROMPTS, strict=True)]


def test_training_micro_batches_take_their_own_widths_and_place_values_at_label_positions() -> None:
    from engine.algorithms.online import rollout_micro_batches

    rows = [3, 1, 6, 0]  # longest first, as the trainer orders a step's rows
    advantages = [[float(r)] * (len(s) - p) for r, (s, p) in enumerate(zip(SEQUENCES, PROMPTS, strict=True))]
    batches = rollout_micro_batches(SEQUENCES, PROMPTS, {"advantages": advantages}, rows, 2, [12, 10])
    assert [b["tokens"].shape for b in batches] == [torch.Size([2, 12]), torch.Size([2, 10])]
    for batch, chosen in zip(batches, (rows[:2], rows[2:]), strict=True):
        for slot, r in enumerate(chosen):
            n, p = len(SEQUENCES[r]), PROMPTS[r]
            assert batch["tokens"][slot, :n].tolist() == SEQUENCES[r]
            assert batch["loss_mask"][slot].nonzero().flatten().tolist() == list(range(p - 1, n - 1))
            assert batch["advantages"][slot].nonzero().flatten().tolist() == list(range(p - 1, n - 1)) or r == 0
            assert batch["advantages"][slot, p - 1: n - 1].tolist() == advantages[r]
