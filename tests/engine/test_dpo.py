"""DPO, IPO and RPO losses against formulas computed independently here (plain Python floats
from given log-probs; the losses compute in fp32, hence 1e-5), and the DPO step's loss on
real logits against log_softmax + gather."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.algorithms.dpo import DPOConfig, DPOStep, DPOTrainConfig
from engine.config import ConfigError, load_config
from engine.losses import chosen_nll, dpo_loss

POLICY_C = [-10.0, -4.5, -20.0, -3.0]
POLICY_R = [-12.0, -4.0, -19.0, -9.0]
REF_C = [-11.0, -5.0, -20.5, -3.5]
REF_R = [-11.5, -4.2, -19.2, -8.0]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _h(i: int) -> float:
    return (POLICY_C[i] - REF_C[i]) - (POLICY_R[i] - REF_R[i])


def _tensors() -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in (POLICY_C, POLICY_R, REF_C, REF_R)]


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_with_label_smoothing(beta: float, smoothing: float) -> None:
    got = dpo_loss(*_tensors(), beta=beta, variant="dpo", label_smoothing=smoothing)
    for i in range(len(POLICY_C)):
        expected = -(1 - smoothing) * _log_sigmoid(beta * _h(i)) - smoothing * _log_sigmoid(-beta * _h(i))
        assert got[i].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_loss(beta: float) -> None:
    got = dpo_loss(*_tensors(), beta=beta, variant="ipo")
    for i in range(len(POLICY_C)):
        assert got[i].item() == pytest.approx((_h(i) - 1 / (2 * beta)) ** 2, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_hinge_loss(beta: float) -> None:
    got = dpo_loss(*_tensors(), beta=beta, variant="hinge")
    for i in range(len(POLICY_C)):
        assert got[i].item() == pytest.approx(max(0.0, 1 - beta * _h(i)), rel=1e-5, abs=1e-6)
    # past the margin (βh >= 1) a pair teaches nothing
    assert dpo_loss(*_tensors(), beta=2.0, variant="hinge").eq(0).tolist() == [True, False, False, True]
    with pytest.raises(ConfigError, match="does nothing with dpo.loss=hinge"):
        DPOConfig(loss="hinge", label_smoothing=0.1)


def test_rpo_nll_term_is_mean_token_nll_of_the_chosen() -> None:
    tokens = torch.tensor([5.0, 3.0, 10.0, 1.0])
    got = chosen_nll(torch.tensor(POLICY_C), tokens)
    for i, n in enumerate(tokens.tolist()):
        assert got[i].item() == pytest.approx(-POLICY_C[i] / n, rel=1e-6)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(*_tensors(), beta=0.1, variant="kto")


def _expected_step_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, reference: list[float],
                        beta: float, smoothing: float, nll_weight: float) -> tuple[float, float]:
    """(sum of pair losses, accuracy) from log_softmax + gather and the formulas in plain floats."""
    picked = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = [(picked[r] * mask[r]).sum().item() for r in range(logits.shape[0])]
    counts = [mask[r].sum().item() for r in range(logits.shape[0])]
    total, correct = 0.0, 0.0
    for p in range(len(logps) // 2):
        pc, pr, rc, rr = logps[2 * p], logps[2 * p + 1], reference[2 * p], reference[2 * p + 1]
        h = (pc - rc) - (pr - rr)
        total += -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
        total += nll_weight * (-pc / counts[2 * p])
        wins = beta * (pc - rc) - beta * (pr - rr)
        correct += 1.0 if wins > 0 else 0.5 if wins == 0 else 0.0
    return total, correct / (len(logps) // 2)


@pytest.mark.parametrize("loss, smoothing, nll", [("dpo", 0.0, None), ("dpo", 0.25, 0.5), ("rpo", 0.1, None)])
def test_step_loss_on_logits(loss: str, smoothing: float, nll: float | None) -> None:
    generator = torch.Generator().manual_seed(3)
    rows, seq, vocab = 6, 7, 11
    logits = torch.randn(rows, seq, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (rows, seq), generator=generator)
    mask = (torch.rand(rows, seq, generator=generator) > 0.3).float()
    reference = [-15.0, -14.0, -9.5, -12.0, -20.0, -18.5]
    config = DPOConfig(loss=loss, beta=0.7, label_smoothing=smoothing, nll_weight=nll)
    step = DPOStep(config)
    batch = {"labels": labels, "loss_mask": mask, "reference_logps": torch.tensor(reference)}
    total, count, metrics = step.loss(batch, logits)
    weight = config.nll_coefficient
    expected_total, expected_accuracy = _expected_step_loss(logits, labels, mask, reference, 0.7, smoothing, weight)
    assert int(count) == rows // 2
    assert total.item() == pytest.approx(expected_total, rel=1e-5)
    assert (metrics["accuracy"][0] / metrics["accuracy"][1]).item() == pytest.approx(expected_accuracy)
    batch["reference_logps"] = torch.tensor(_tie_reference(logits, labels, mask))
    _, _, metrics = step.loss(batch, logits)
    assert (metrics["accuracy"][0] / metrics["accuracy"][1]).item() == 0.5  # policy == reference: ties count half


def _tie_reference(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[float]:
    from engine.algorithms.logprobs import sequence_logprobs

    return sequence_logprobs(logits, labels, mask, None)[0].tolist()


def test_config_needs_a_reference_and_defaults_it_to_checkpoint_load() -> None:
    with pytest.raises(ConfigError, match="needs a reference"):
        load_config(DPOTrainConfig, None, []).validate(1)
    config = load_config(DPOTrainConfig, None, ["checkpoint.load=/some/sft/checkpoint"])
    assert config.dpo.reference == "/some/sft/checkpoint"
    assert load_config(DPOTrainConfig, None, ["dpo.loss=rpo"]).dpo.nll_coefficient == 1.0
    assert load_config(DPOTrainConfig, None, ["dpo.loss=ipo"]).dpo.nll_coefficient == 0.0
    with pytest.raises(ConfigError, match="dpo.loss"):
        DPOConfig(loss="slic")


def test_sigmoid_is_trls_name_of_the_dpo_loss() -> None:
    """dpo.loss=sigmoid (TRL's loss_type) was refused as "not one of 'dpo', 'ipo', 'rpo'" while the help says
    "'dpo' (sigmoid)". It is taken as dpo, and saved as dpo, so a resumed run's config compares equal."""
    config = load_config(DPOTrainConfig, None, ["dpo.loss=sigmoid"])
    assert config.dpo.loss == "dpo" and config.to_dict()["dpo"]["loss"] == "dpo"
    assert config.to_dict() == load_config(DPOTrainConfig, None, ["dpo.loss=dpo"]).to_dict()
    with pytest.raises(ConfigError, match=r"dpo.loss='kto' is not one of 'dpo' \(or TRL's 'sigmoid'\), 'ipo', 'hinge', "
                       r"'rpo'"):
        DPOConfig(loss="kto")


def test_a_partial_reference_file_of_another_reference_is_refused(tmp_path: Path) -> None:
    """keel data ref-logprobs resumed a .partial file begun with another dpo.reference and mixed the two
    references' log-probs in one file (the per-pair fingerprint covers the token ids only)."""
    from engine.algorithms.dpo_reference import _check_partial, reference_identity
    from engine.config import ConfigError

    step = tmp_path / "sft" / "step_0000003"
    step.mkdir(parents=True)
    (step / "keel.json").write_text("{}")
    (step / "metadata.json").write_text("{}")
    (tmp_path / "sft" / "latest").write_text(step.name)
    init = reference_identity(load_config(DPOTrainConfig, None, ["dpo.reference=init", "run.seed=5"]))
    assert "run.seed=5" in init
    sft = reference_identity(load_config(DPOTrainConfig, None, [f"dpo.reference={tmp_path / 'sft'}"]))
    assert sft == str(step)
    partial = tmp_path / "ref.jsonl.rank0.partial"
    _check_partial(partial, [{"index": 0, "reference": sft}, {"index": 1}], sft)  # its own, and files from before
    with pytest.raises(ConfigError, match=r"holds log-probs of reference init .*this run's is .*step_0000003"):
        _check_partial(partial, [{"index": 0, "reference": init}], sft)


def test_reference_init_with_checkpoint_load_is_the_loaded_policy(tmp_path: Path) -> None:
    """examples/dpo_tiny.yaml sets dpo.reference=init; with checkpoint.load=<SFT> the reference was the random
    seeded initialisation beside a policy loaded from the SFT checkpoint (first loss 0.777, no warning). 'init'
    is the weights the policy starts from: at the first step the policy is its reference, and the loss log 2."""
    import math

    from engine.cli import main
    from engine.runner import starting_weights
    from tests.helpers import REPO, train_losses

    quiet = ["logging.progress=false", "logging.tensorboard=false", "data.num_samples=64"]
    assert main(["train", "sft", *quiet, "run.train_steps=2", "optimizer.lr=0.01", "data.tokenizer=builtin-sp",
                 f"run.output_dir={tmp_path / 'sft'}"]) == 0
    assert main(["train", "dpo", "--config", str(REPO / "examples" / "dpo_tiny.yaml"), *quiet, "run.train_steps=1",
                 "run.eval_interval=0", f"checkpoint.load={tmp_path / 'sft'}", f"run.output_dir={tmp_path / 'dpo'}"]) == 0
    assert train_losses(tmp_path / "dpo", "dpo_loss")[1] == pytest.approx(math.log(2), abs=1e-6)
    assert starting_weights("init", None) is None and starting_weights("runs/ref", "runs/sft") == "runs/ref"
