"""Online RL losses and advantages against references written with Python floats and loops."""

from __future__ import annotations

import math

import pytest
import torch

from engine.advantages import (
    DynamicSampling,
    dynamic_sampling_filter,
    gae,
    group_advantages,
    overlong_filter,
    overlong_penalty,
    rloo_advantages,
    token_rewards,
    whiten,
)
from engine.losses import aggregate, clipped_policy_loss, clipped_value_loss, kl_penalty

# Three rows of T=6 with different lengths and offsets: tokens 1..3, 0..4, 4..5.
MASK = [
    [0, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 1, 1],
]


def _approx(got: torch.Tensor, expected: list[list[float]] | list[float], rel: float = 1e-5) -> None:
    flat_expected = [x for row in expected for x in row] if expected and isinstance(expected[0], list) else expected
    assert got.flatten().tolist() == pytest.approx(flat_expected, rel=rel, abs=1e-6)


# --- KL ------------------------------------------------------------------------------------


def test_kl_estimators_values() -> None:
    logp = [-1.0, -2.0, -0.5, -3.0]
    ref = [-1.5, -1.0, -0.5, -0.2]
    k1 = kl_penalty(torch.tensor(logp), torch.tensor(ref), "k1")
    k2 = kl_penalty(torch.tensor(logp), torch.tensor(ref), "k2")
    k3 = kl_penalty(torch.tensor(logp), torch.tensor(ref), "k3")
    _approx(k1, [a - b for a, b in zip(logp, ref, strict=True)])
    _approx(k2, [(a - b) ** 2 / 2 for a, b in zip(logp, ref, strict=True)])
    # k3 = π_ref/π - log(π_ref/π) - 1, e.g. the first: e^-0.5 + 0.5 - 1 = 0.10653...
    _approx(k3, [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp, ref, strict=True)])
    assert k3[0].item() == pytest.approx(0.1065306597, rel=1e-6)


def test_kl_k3_is_non_negative_and_zero_only_when_equal() -> None:
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(200, generator=generator) * 5
    ref = -torch.rand(200, generator=generator) * 5
    k3 = kl_penalty(logp, ref, "k3")
    assert bool((k3 >= 0).all())
    assert bool((kl_penalty(logp, logp, "k3") == 0).all())
    assert bool((kl_penalty(logp, ref, "k1") < 0).any())  # k1 is not: the contrast
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


# --- PPO rewards and GAE -------------------------------------------------------------------


def test_token_rewards_puts_score_on_last_response_token() -> None:
    kl = [[0.1 * (i + 1) + 0.01 * t for t in range(6)] for i in range(3)]
    score = [2.0, -1.0, 0.5]
    beta = 0.3
    got = token_rewards(torch.tensor(score), torch.tensor(MASK), torch.tensor(kl), beta)
    last = [3, 4, 5]
    expected = [[(-beta * kl[i][t] if MASK[i][t] else 0.0) + (score[i] if t == last[i] else 0.0) for t in range(6)]
                for i in range(3)]
    _approx(got, expected)
    # a row without response tokens gets nothing
    empty = token_rewards(torch.tensor([5.0]), torch.zeros(1, 4), torch.ones(1, 4), beta)
    assert empty.abs().sum().item() == 0.0


def _reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """GAE over one response, written directly from the recursion."""
    n = len(rewards)
    advantages = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_mixed_lengths_and_offsets(gamma: float, lam: float) -> None:
    rewards = [[0.5, -0.1, 0.2, 1.0, 9.0, 9.0], [0.0, 0.3, -0.2, 0.1, 2.0, 9.0], [9.0, 9.0, 9.0, 9.0, -0.4, 1.5]]
    values = [[7.0, 0.2, 0.4, 0.6, 7.0, 7.0], [0.1, -0.3, 0.5, 0.2, 0.9, 7.0], [7.0, 7.0, 7.0, 7.0, 0.3, -0.2]]
    advantages, returns = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(MASK), gamma, lam)
    expected_adv = [[0.0] * 6 for _ in range(3)]
    expected_ret = [[0.0] * 6 for _ in range(3)]
    for i, row in enumerate(MASK):
        span = [t for t in range(6) if row[t]]
        adv, ret = _reference_gae([rewards[i][t] for t in span], [values[i][t] for t in span], gamma, lam)
        for j, t in enumerate(span):
            expected_adv[i][t], expected_ret[i][t] = adv[j], ret[j]
    _approx(advantages, expected_adv)
    _approx(returns, expected_ret)


def test_gae_by_hand_and_rejects_split_responses() -> None:
    # two tokens, γ=1, λ=0.5: δ1 = 1 - 0.5 = 0.5, δ0 = 0 + 0.5 - 0.2 = 0.3; A0 = 0.3 + 0.5*0.5 = 0.55
    advantages, returns = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.2, 0.5, 3.0]]),
                              torch.tensor([[1, 1, 0]]), 1.0, 0.5)
    _approx(advantages, [[0.55, 0.5, 0.0]])
    _approx(returns, [[0.75, 1.0, 0.0]])
    with pytest.raises(ValueError, match="more than one run"):
        gae(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))


def test_whiten_matches_unbiased_masked_statistics() -> None:
    values = [[1.0, 2.0, 3.0, 9.0], [4.0, -1.0, 9.0, 9.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    picked = [1.0, 2.0, 3.0, 4.0, -1.0]
    mean = sum(picked) / 5  # 1.8
    variance = sum((x - mean) ** 2 for x in picked) / 4  # Bessel: 14.8 / 4 = 3.7
    scale = 1 / math.sqrt(variance + 1e-8)
    got = whiten(torch.tensor(values), torch.tensor(mask))
    _approx(got, [[(v - mean) * scale if m else 0.0 for v, m in zip(r, mr, strict=True)]
                  for r, mr in zip(values, mask, strict=True)])
    kept_mean = whiten(torch.tensor(values), torch.tensor(mask), shift_mean=False)
    _approx(kept_mean, [[(v - mean) * scale + mean if m else 0.0 for v, m in zip(r, mr, strict=True)]
                        for r, mr in zip(values, mask, strict=True)])
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]))


# --- Clipped losses ------------------------------------------------------------------------


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_policy_loss_asymmetric(eps_low: float, eps_high: float) -> None:
    # ratios below, inside and above the bounds, each with a positive and a negative advantage
    ratios = [0.5, 0.9, 1.25, 1.5, 0.5, 0.9, 1.25, 1.5]
    adv = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -2.0]
    old = [-1.0] * 8
    logp = [o + math.log(r) for o, r in zip(old, ratios, strict=True)]
    mask = [1, 1, 1, 1, 1, 1, 1, 0]
    loss, clipped, ratio = clipped_policy_loss(torch.tensor([logp]), torch.tensor([old]), torch.tensor([adv]),
                                               torch.tensor([mask]), eps_low, eps_high)
    expected_loss, expected_clipped = [], []
    for r, a, m in zip(ratios, adv, mask, strict=True):
        bounded = min(max(r, 1 - eps_low), 1 + eps_high)
        objective = min(r * a, bounded * a)
        expected_loss.append(-objective * m)
        expected_clipped.append(float(m and objective != r * a))
    _approx(loss, [expected_loss])
    assert clipped.tolist() == [expected_clipped]
    _approx(ratio, [[r * m for r, m in zip(ratios, mask, strict=True)]])
    # spelled out: A>0 clips above only (ratio 1.5 -> 1.2 or 1.28), A<0 clips below only (0.5 -> 0.8)
    assert loss[0, 3].item() == pytest.approx(-(1 + eps_high))
    assert loss[0, 0].item() == pytest.approx(-0.5)
    assert loss[0, 4].item() == pytest.approx(0.8)
    assert loss[0, 6].item() == pytest.approx(1.25)
    # 1.25 is clipped by eps_high 0.2, not by 0.28
    assert clipped[0, 2].item() == (1.0 if eps_high < 0.25 else 0.0)


def test_clipped_policy_loss_gradient_is_zero_where_clipped() -> None:
    old = torch.tensor([[0.0, 0.0]])
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, clipped, _ = clipped_policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    loss.sum().backward()
    assert logp.grad is not None
    assert clipped.tolist() == [[1.0, 0.0]]
    _approx(logp.grad, [[0.0, -1.1]])  # d(-ρA)/d log π = -ρA


def test_clipped_value_loss() -> None:
    values = [1.0, 0.0, 0.5, 2.0]
    old = [0.5, 0.5, 0.5, 0.0]
    returns = [0.0, 1.0, 0.4, 2.0]
    mask = [1, 1, 1, 0]
    loss, clipped = clipped_value_loss(torch.tensor([values]), torch.tensor([old]), torch.tensor([returns]),
                                       torch.tensor([mask]), clip=0.2)
    # token 0: v=1 clipped to 0.7; (1-0)^2=1 vs (0.7-0)^2=0.49 -> 0.5; token 1: v=0 -> 0.3; 1 vs 0.49 -> 0.5
    # token 2: inside the clip; 0.5*(0.1)^2
    expected = []
    for v, o, r, m in zip(values, old, returns, mask, strict=True):
        vc = min(max(v, o - 0.2), o + 0.2)
        expected.append(0.5 * max((v - r) ** 2, (vc - r) ** 2) * m)
    _approx(loss, [expected])
    assert loss[0].tolist()[:3] == pytest.approx([0.5, 0.5, 0.005])
    # moved away from the return: the unclipped error counts (0 -> 1 vs 0.7 -> 0.09), not clipped
    away, away_clipped = clipped_value_loss(torch.tensor([[0.0]]), torch.tensor([[0.9]]), torch.tensor([[1.0]]),
                                            torch.ones(1, 1), clip=0.2)
    assert away.item() == pytest.approx(0.5 * 1.0) and away_clipped.item() == 0.0
    # moved onto the return from far: the clipped error counts (0.2 -> 0.64 vs 1.1 -> 0.01), clipped
    onto, onto_clipped = clipped_value_loss(torch.tensor([[1.1]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                            torch.ones(1, 1), clip=0.2)
    assert onto.item() == pytest.approx(0.5 * 0.8 ** 2) and onto_clipped.item() == 1.0


# --- Aggregation ---------------------------------------------------------------------------

LOSS = [[9.0, 1.0, 2.0, 3.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 6.0, 9.0], [9.0, 9.0, 9.0, 9.0, 4.0, -2.0]]


def _global_reference(rows: list[int], mode: str, constant: float = 8.0) -> float:
    tokens = [[LOSS[i][t] for t in range(6) if MASK[i][t]] for i in rows]
    if mode == "token_mean":
        return sum(sum(s) for s in tokens) / sum(len(s) for s in tokens)
    if mode == "seq_mean_token_mean":
        return sum(sum(s) / len(s) for s in tokens) / len(tokens)
    return sum(sum(s) / constant for s in tokens) / len(tokens)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum_constant"])
def test_aggregate_modes_and_micro_batch_composition(mode: str) -> None:
    loss, mask = torch.tensor(LOSS), torch.tensor(MASK)
    total, count = aggregate(loss, mask, mode, constant=8.0)
    by_hand = {"token_mean": (6 + 10 + 2) / 10, "seq_mean_token_mean": (2 + 2 + 1) / 3,
               "seq_sum_constant": (6 + 10 + 2) / 8 / 3}
    assert (total / count).item() == pytest.approx(by_hand[mode])
    assert (total / count).item() == pytest.approx(_global_reference([0, 1, 2], mode))
    # two micro-batches (rows 0 | rows 1, 2): Σ sums / Σ counts is the global value
    first = aggregate(loss[:1], mask[:1], mode, constant=8.0)
    second = aggregate(loss[1:], mask[1:], mode, constant=8.0)
    composed = (first[0] + second[0]) / (first[1] + second[1])
    assert composed.item() == pytest.approx(_global_reference([0, 1, 2], mode))
    assert count.item() == (10 if mode == "token_mean" else 3)


def test_aggregate_skips_empty_rows_and_checks_arguments() -> None:
    loss = torch.tensor([[1.0, 3.0], [5.0, 5.0]])
    mask = torch.tensor([[1, 1], [0, 0]])  # second row filtered out (e.g. truncated)
    for mode, expected in [("token_mean", 2.0), ("seq_mean_token_mean", 2.0), ("seq_sum_constant", 1.0)]:
        total, count = aggregate(loss, mask, mode, constant=4.0)
        assert (total / count).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="positive constant"):
        aggregate(loss, mask, "seq_sum_constant")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "sum")


# --- Sequence advantages -------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_rloo_leave_one_out(k: int) -> None:
    scores = [1.0, 0.0, 0.5, 2.0, -1.0, 3.0, 0.25, 0.75]
    got = rloo_advantages(torch.tensor(scores), k)
    expected = []
    for start in range(0, len(scores), k):
        group = scores[start:start + k]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            expected.append(r - sum(others) / len(others))
    _approx(got, expected)
    if k == 2:  # A = r_1 - r_2 and its negative
        _approx(got[:2], [1.0, -1.0])


def test_group_advantages_with_and_without_std() -> None:
    scores = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    eps = 1e-6
    expected_std, expected_plain = [], []
    for start in (0, 4):
        group = scores[start:start + 4]
        mean = sum(group) / 4
        sample_std = math.sqrt(sum((x - mean) ** 2 for x in group) / 3)
        expected_std += [(x - mean) / (sample_std + eps) for x in group]
        expected_plain += [x - mean for x in group]
    _approx(group_advantages(torch.tensor(scores), 4), expected_std)
    _approx(group_advantages(torch.tensor(scores), 4, normalize_std=False), expected_plain)
    # sample std of (1,0,0,1) is sqrt(1/3): advantage 0.5 * sqrt(3), not 1.0 as with the population std
    assert group_advantages(torch.tensor(scores), 4)[0].item() == pytest.approx(0.5 * math.sqrt(3), rel=1e-5)
    with pytest.raises(ValueError, match="num_prompts \\* 4"):
        group_advantages(torch.zeros(6), 4)


def test_skipped_rollouts_take_no_part_in_a_group_baseline() -> None:
    """A rollout the rewards skipped (on_error: skip, or a response the reward model cannot score) carries a
    placeholder 0. It entered the GRPO and RLOO baselines: a tied group of kept rollouts [skip, -0.3, -0.3,
    -0.3] got GRPO advantages [1.5, -0.5, -0.5, -0.5], pushing the policy away from every real sample.
    Expected values: the formulas over the kept rollouts alone, written out by hand."""
    scores = torch.tensor([0.0, -0.3, -0.3, -0.3, 0.0, 1.0, 0.0, 0.5, 7.0, 0.0, 0.0, 0.0])
    keep = torch.tensor([False, True, True, True, False, True, True, True, True, False, False, False])
    # group 1: kept all equal; group 2: kept (1, 0, 0.5), mean 0.5, sample std 0.5; group 3: one kept, no baseline
    eps = 1e-6
    grpo = [0.0, 0.0, 0.0, 0.0, 0.0, 0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.0, 0.0, 0.0, 0.0, 0.0]
    _approx(group_advantages(scores, 4, keep=keep), grpo)
    _approx(group_advantages(scores, 4, normalize_std=False, keep=keep), [0.0] * 5 + [0.5, -0.5] + [0.0] * 5)
    # RLOO: 1 - (0 + 0.5)/2, 0 - (1 + 0.5)/2, 0.5 - (1 + 0)/2
    _approx(rloo_advantages(scores, 4, keep=keep), [0.0] * 5 + [0.75, -0.75, 0.0] + [0.0] * 4)
    # the tied group and the one with a single kept rollout teach nothing: DAPO drops them
    assert dynamic_sampling_filter(scores, 4, keep).tolist() == [False, True, False]
    everything = torch.ones(12, dtype=torch.bool)  # all kept: exactly the plain formulas
    assert torch.equal(group_advantages(scores, 4, keep=everything), group_advantages(scores, 4))
    assert torch.equal(rloo_advantages(scores, 4, keep=everything), rloo_advantages(scores, 4))


# --- DAPO ----------------------------------------------------------------------------------


def test_dynamic_sampling_filter() -> None:
    # all right, mixed, all wrong, all equal partial credit
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert dynamic_sampling_filter(scores, 4).tolist() == [False, True, False, False]
    assert dynamic_sampling_filter(scores, 2).tolist() == [False, False, False, True, False, False, False, False]


def test_dynamic_sampling_bookkeeping_fills_the_batch() -> None:
    sampling = DynamicSampling(target_groups=5, max_rounds=4)
    assert sampling.add_round([True, False, True]) == [0, 2]
    assert not sampling.done
    assert sampling.add_round([False, False]) == []
    assert sampling.add_round([True, True, False, True, True]) == [0, 1, 3]  # the 4th kept group is surplus
    assert sampling.full and sampling.done
    assert (sampling.kept, sampling.dropped, sampling.surplus, sampling.rounds) == (5, 4, 1, 3)
    with pytest.raises(RuntimeError, match="done after 3 rounds"):
        sampling.add_round([True])


def test_dynamic_sampling_bookkeeping_stops_at_the_round_cap() -> None:
    sampling = DynamicSampling(target_groups=4, max_rounds=2)
    assert sampling.add_round(torch.tensor([False, True])) == [1]
    assert sampling.add_round([False, False, True]) == [2]
    assert sampling.done and not sampling.full
    assert (sampling.kept, sampling.dropped, sampling.surplus, sampling.rounds) == (2, 3, 0, 2)
    with pytest.raises(ValueError, match="max_rounds >= 1"):
        DynamicSampling(target_groups=1, max_rounds=0)


def test_overlong_penalty_boundaries() -> None:
    lengths = [0, 12, 16, 17, 18, 20, 21, 100]
    got = overlong_penalty(torch.tensor(lengths), max_length=20, cache_length=4)
    # soft zone (16, 20]: (16 - |y|) / 4; beyond 20: -1
    _approx(got, [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache length"):
        overlong_penalty(torch.tensor(lengths), max_length=20, cache_length=0)


def test_overlong_filter_drops_truncated_sequences() -> None:
    lengths = torch.tensor([5, 20, 20, 12])
    stopped = torch.tensor([True, True, False, False])
    assert overlong_filter(lengths, 20, stopped).tolist() == [True, True, False, True]


def test_sequence_kl_sums_each_rollouts_log_ratio() -> None:
    from engine.advantages import sequence_kl

    logps = [[-0.5, -1.0, -2.0], [-0.25]]
    ref = [[-0.75, -1.5, -1.0], [-1.25]]
    # by hand: (0.25 + 0.5 - 1.0), (1.0)
    assert sequence_kl(logps, ref).tolist() == [-0.25, 1.0]
    with pytest.raises(ValueError):
        sequence_kl([[-1.0, -2.0]], [[-1.0]])  # a reference row of another length


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_loss_adds_the_chosen_kl_estimate(estimator: str) -> None:
    """grpo.kl_estimator (verl's kl_loss_type): the loss term is β times that estimate, per token, in the
    aggregation; the k3 estimator was hard-wired."""
    from types import SimpleNamespace

    from engine.algorithms.grpo import GRPOConfig, GRPOStep
    from engine.errors import ConfigError

    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[0].tolist()
    ref = [-1.0, -0.7, -2.5]
    config = SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=8),
                             grpo=GRPOConfig(kl_estimator=estimator, kl_coef=0.3, aggregation="token_mean"))
    step = GRPOStep(config)  # type: ignore[arg-type]
    step.parallel = None
    batch = {"labels": labels, "loss_mask": mask, "keep": torch.ones(1, 1), "advantages": torch.zeros(1, 3),
             "old_logps": torch.tensor([logp]), "ref_logps": torch.tensor([ref])}
    total, count, metrics = step.loss(batch, logits.float())
    estimates = {"k1": lambda d: d, "k2": lambda d: d * d / 2, "k3": lambda d: math.exp(-d) + d - 1}[estimator]
    expected = sum(estimates(logp[t] - ref[t]) for t in (1, 2)) / 2  # zero advantages: the KL term alone
    assert total.item() / count.item() == pytest.approx(0.3 * expected, rel=1e-5)
    assert (metrics["kl_loss"][0] / metrics["kl_loss"][1]).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="grpo.kl_estimator='k4' is not one of k1, k2, k3"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ConfigError, match="grpo.kl_estimator=k1 is read by grpo.kl=loss only, not grpo.kl=reward"):
        GRPOConfig(kl_estimator="k1", kl="reward")
