"""Direct preference optimisation: DPO, IPO and RPO against a frozen reference policy.

For a pair (prompt x, chosen y_c, rejected y_r) with sequence log-probs ``log π(y|x)``
summed over the response tokens, ``h = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) -
log π_ref(y_r))`` and (formulas in :mod:`engine.losses`):

* ``dpo.loss=dpo``: ``-(1-ε) log σ(βh) - ε log σ(-βh)`` (ε = ``dpo.label_smoothing``); ``sigmoid``,
  TRL's name of it, is taken as ``dpo`` (and saved so);
* ``dpo.loss=ipo``: ``(h - 1/(2β))²``;
* ``dpo.loss=hinge``: ``max(0, 1 - βh)`` (SLiC-HF; TRL's ``hinge``);
* ``dpo.loss=rpo``: the dpo term plus ``dpo.nll_weight`` (default 1) times the chosen
  response's mean token NLL; any variant can add that term with ``dpo.nll_weight``.

Chosen and rejected rows of a pair go through the model in one forward (rows
``[c0, r0, c1, r1, ...]``). Reference log-probs come either from a live frozen reference
model (``dpo.reference``: a checkpoint, defaulting to ``checkpoint.load``; ``init`` = the
policy's own seeded initialisation), run forward-only on each step's micro-batches before
the training pass, or from a file written once by ``keel data ref-logprobs``
(``dpo.reference_logprobs``), so the reference need not stay in memory. Both give the same
losses. Log-probs come from :func:`keel_kernels.token_logprobs` on the vocabulary-parallel
logits (no gather of the vocabulary).

Metrics per step: ``dpo_loss``, ``accuracy`` (implicit reward ``β(log π - log π_ref)`` of
the chosen above the rejected; a tie counts half), ``margin`` (mean ``βh``), ``chosen_logps``,
``rejected_logps``, ``chosen_reward``, ``rejected_reward``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.algorithms.logprobs import lm_forward, sequence_logprobs
from engine.config import ConfigError, DataConfig, TrainConfig, doc
from engine.data.batching import kept_rows, to_device
from engine.data.dpo import DPOPairs, load_reference_logprobs
from engine.losses import chosen_nll, dpo_loss, preference_logit

logger = logging.getLogger(__name__)

METRICS = ("dpo_loss", "accuracy", "margin", "chosen_logps", "rejected_logps", "chosen_reward", "rejected_reward")


@dataclass
class DPOConfig:
    loss: str = doc("'dpo' (sigmoid; TRL's 'sigmoid' is taken as 'dpo'), 'ipo' (squared, toward 1/(2 beta)), "
                    "'hinge' (SLiC-HF: max(0, 1 - beta h)) or 'rpo' (dpo + NLL on the chosen).", "dpo")
    beta: float = doc("KL strength beta (HelpSteer2 recipe: 1e-3).", 0.1)
    label_smoothing: float = doc("Label smoothing of the dpo and rpo losses (conservative DPO), in [0, 0.5).", 0.0)
    nll_weight: Optional[float] = doc("Weight of the chosen response's mean token NLL (None: 1 for rpo, else 0).",
                                      None)
    reference: Optional[str] = doc(
        "Checkpoint of the frozen reference model (None = checkpoint.load, recorded in the run's config so a "
        "resumed run keeps it; 'init' = the weights the policy starts from: checkpoint.load when given, else "
        "the seeded initialisation).", None)
    reference_logprobs: Optional[str] = doc(
        "File of reference log-probs written by `keel data ref-logprobs` (then no reference model is built).", None)

    def __post_init__(self) -> None:
        if self.loss == "sigmoid":  # TRL's name of the dpo loss: stored as 'dpo', so saved configs compare alike
            self.loss = "dpo"
        if self.loss not in ("dpo", "ipo", "hinge", "rpo"):
            raise ConfigError(f"dpo.loss={self.loss!r} is not one of 'dpo' (or TRL's 'sigmoid'), 'ipo', 'hinge', "
                              "'rpo'")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.loss in ("ipo", "hinge") and self.label_smoothing:  # no labels to smooth
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} does nothing with dpo.loss={self.loss} (a "
                              f"{'squared loss toward 1/(2 beta)' if self.loss == 'ipo' else 'margin loss'}, with no "
                              "labels to smooth): leave it unset, or use dpo.loss=dpo")

    @property
    def nll_coefficient(self) -> float:
        """The NLL term's weight: ``nll_weight``, or 1 for rpo and 0 otherwise when unset."""
        if self.nll_weight is not None:
            return self.nll_weight
        return 1.0 if self.loss == "rpo" else 0.0


def _dpo_data_defaults() -> DataConfig:
    # HelpSteer-style attribute rows paired by helpfulness (ties dropped), as the HelpSteer2 recipe. No
    # validation_source: validation comes from data.source (a built-in set's unseen :validation split).
    return DataConfig(source="builtin:helpsteer", format="attributes",
                      seq_length=256, micro_batch_size=2, global_batch_size=8, num_samples=2048,
                      overlong="cut_prompt")


@dataclass
class DPOTrainConfig(TrainConfig):
    """``keel train dpo``: the shared sections plus ``dpo``."""

    dpo: DPOConfig = field(default_factory=DPOConfig)
    data: DataConfig = field(default_factory=_dpo_data_defaults)
    # the log-probs of a cut response would train toward its first half: responses stay whole
    OVERLONG: ClassVar[tuple[str, ...]] = ("cut_prompt", "drop")
    FORMATS: ClassVar[tuple[str, ...]] = ("pairs", "attributes", "helpsteer2_preference")
    FINE_TUNE_LR: ClassVar[Optional[float]] = 1e-6
    FROZEN: ClassVar[tuple[str, ...]] = ("dpo.reference",)  # pinned to a step (engine.checkpoint.pinning)
    IGNORED: ClassVar[dict[str, str]] = {
        "data.pack": "DPO reads each pair's two responses as samples of their own, never packed with others",
        "data.loss_on": "DPO's loss is on the log-probabilities of the responses' tokens",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run.output_dir == "runs/sft-demo":
            self.run.output_dir = "runs/dpo"
            self.checkpoint.dir = "runs/dpo/checkpoints"
        if self.data.format not in self.FORMATS:
            raise ConfigError(f"keel train dpo reads data.format 'pairs', 'attributes' (paired by helpfulness) or "
                              f"'helpsteer2_preference', got {self.data.format!r}")
        if self.dpo.reference_logprobs and self.dpo.reference is not None:
            raise ConfigError(f"dpo.reference={self.dpo.reference} and dpo.reference_logprobs="
                              f"{self.dpo.reference_logprobs}: the file's log-probs replace the reference model (the "
                              "file records which one made them); set only one of the two")
        if self.dpo.reference is None and not self.dpo.reference_logprobs:
            self.dpo.reference = self.checkpoint.load

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if self.dpo.reference is None and self.dpo.reference_logprobs is None:
            raise ConfigError("keel train dpo needs a reference: set dpo.reference=<checkpoint> (or checkpoint.load), "
                              "dpo.reference=init, or dpo.reference_logprobs=<file from keel data ref-logprobs>")

    def check_checkpoints(self) -> None:
        from engine.checkpoint.dist import refuse_scorer_policy

        if self.dpo.reference != self.checkpoint.load:  # checkpoint.load is checked as the policy's start
            refuse_scorer_policy(self.dpo.reference, "dpo.reference")

    def check_fresh_start(self) -> None:
        """Stored reference log-probs of another model than the policy starts from are said: DPO's implicit reward
        is then measured against that model, and the first step is not at log 2 and accuracy 0.5."""
        if not self.dpo.reference_logprobs:
            return
        from engine.algorithms.dpo_reference import reference_identity

        path = Path(self.dpo.reference_logprobs)
        if not path.is_file():
            return  # refused when the data is read
        with path.open(encoding="utf-8") as lines:  # every line names the same reference: the first says it
            first = lines.readline()
        try:
            theirs = json.loads(first).get("reference")
        except json.JSONDecodeError:  # empty or torn: refused when the data is read
            return
        mine = reference_identity(self)
        if theirs is not None and theirs != mine:
            logger.warning("dpo.reference_logprobs=%s holds the log-probs of %s, and the policy starts from %s: DPO "
                           "measures its reward against the file's model; write the file from the policy's start "
                           "(keel data ref-logprobs with this checkpoint.load) unless that is meant",
                           self.dpo.reference_logprobs, theirs, mine)


class DPOStep(Step):
    name = "dpo"
    loss_name = "dpo_loss"
    reads_keep = True

    def __init__(self, dpo: DPOConfig):
        self.dpo = dpo
        self.reference: Any = None
        self.parallel: Any = None

    def metric_names(self) -> tuple[str, ...]:
        return METRICS

    def setup(self, config: Any, parallel: Any, tokenizer: Any) -> None:
        from engine.runner import ModelRunner, starting_weights

        self.parallel = parallel
        if self.dpo.reference_logprobs:
            logger.info("dpo: reference log-probs from %s (no reference model)", self.dpo.reference_logprobs)
            return
        checkpoint = starting_weights(self.dpo.reference, config.checkpoint.load)
        self.reference = ModelRunner.frozen(config, parallel, self.model_class(), checkpoint)
        logger.info("dpo: frozen reference model from %s", checkpoint or "the policy's initialisation")

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[DPOPairs, DPOPairs]:
        train, valid = DPOPairs.from_config(config, tokenizer)
        if self.dpo.reference_logprobs:
            stored = load_reference_logprobs(self.dpo.reference_logprobs)
            train.attach_reference(stored, "train", self.dpo.reference_logprobs)
            valid.attach_reference(stored, "validation", self.dpo.reference_logprobs)
        return train, valid

    @torch.no_grad()
    def before_schedule(self, micro_batches: list[Batch]) -> None:
        """Reference log-probs of every row, stored as ``reference_logps`` for the last stage's loss."""
        if self.reference is None:
            return
        outputs = self.reference.run_schedule(micro_batches, self._reference_step, forward_only=True,
                                              collect_outputs=True)
        if self.parallel.is_last_stage():
            for batch, logps in zip(micro_batches, outputs, strict=True):
                batch["reference_logps"] = logps.detach().cpu()

    def _reference_step(self, data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = to_device(next(data_iterator))

        def collect(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return sequence_logprobs(output, batch["labels"], batch["loss_mask"], self.parallel)[0]

        return lm_forward(model, batch), collect

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        return lm_forward(model, batch)

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of per-pair losses, pairs, metrics) for one micro-batch of pairs; a pair whose rows ``keep``
        0 (:class:`engine.data.batching.ReadOnce`) counts nothing."""
        logps, tokens = sequence_logprobs(output, batch["labels"], batch["loss_mask"], self.parallel)
        policy = logps.view(-1, 2)
        kept = kept_rows(batch, logps.shape[0], policy.device).view(-1, 2)[:, 0]
        reference = batch["reference_logps"].to(policy.device).view(-1, 2)
        losses = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.dpo.beta,
                          self.dpo.loss, self.dpo.label_smoothing)
        if self.dpo.nll_coefficient:
            losses = losses + self.dpo.nll_coefficient * chosen_nll(policy[:, 0], tokens.view(-1, 2)[:, 0])
        losses = losses * kept
        with torch.no_grad():
            rewards = self.dpo.beta * (policy - reference)
            margin = self.dpo.beta * preference_logit(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1])
        pairs = kept.sum()
        sums = {
            "dpo_loss": losses.sum().detach(), "accuracy": _wins(rewards[:, 0], rewards[:, 1], kept),
            "margin": (margin * kept).sum(), "chosen_logps": (policy[:, 0].detach() * kept).sum(),
            "rejected_logps": (policy[:, 1].detach() * kept).sum(), "chosen_reward": (rewards[:, 0] * kept).sum(),
            "rejected_reward": (rewards[:, 1] * kept).sum(),
        }
        metrics = {name: torch.stack([value.float(), pairs]) for name, value in sums.items()}
        return losses.sum(), pairs.to(torch.int), metrics


def _wins(chosen: torch.Tensor, rejected: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Kept pairs the chosen wins, a tie counting half (policy == reference scores 0.5, chance)."""
    return ((chosen > rejected).float() * kept).sum() + 0.5 * ((chosen == rejected).float() * kept).sum()


CONFIG = DPOTrainConfig


def create(config: Any) -> DPOStep:
    return DPOStep(config.dpo)
