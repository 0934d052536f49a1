"""SteerLM 2.0 (HelpSteer2 paper): train the policy toward the Bayes-optimal attribute-conditioned policy.

For a prompt ``x`` and target attributes ``a*`` (``steerlm2.targets``, assigned to the prompts in
turn), the current SteerLM policy prompted with ``a*`` is the proposal ``Q(y|a*,x)``; it samples
``y_1..y_n`` (``rollout.samples_per_prompt``, temperature 0.7, top-p 0.9). The target policy is
``P(y|a*,x) ∝ P(a*|x,y) · P(y|x)``. Each sample gets the self-normalised importance weight::

    log P(a*|x,y_i) = Σ_k log N(a*_k; μ_k(x,y_i), σ²)
                    = Σ_k [ -(a*_k - μ_k(x,y_i))² / (2σ²) - log(σ √(2π)) ]
    log w_i         = log P(a*|x,y_i) + log P(y_i|x) - log Q(y_i|a*,x)
    w̃_i             = exp(log w_i) / Σ_j exp(log w_j)          (softmax over the prompt's samples)

* ``μ(x,y)``: the attributes the regression reward model (``reward_model``) predicts for the
  response; ``k`` runs over the attributes named in the target that the model predicts; ``σ`` is
  ``steerlm2.attribute_sigma`` (the RM likelihood is a Gaussian of that width around the prediction);
* ``log P(y|x)``, the prior: the sequence log-prob of the response under the **frozen initial policy**
  (``reference``, default ``checkpoint.load``) prompted with ``steerlm2.prior_attributes`` (default
  None: no attribute line, i.e. not conditioned);
* ``log Q(y|a*,x)``: the sequence log-prob under the current policy (recomputed by the training model)
  prompted with ``a*``;
* a sample the reward model cannot score (the response does not fit) is left out of its prompt's softmax.

Loss (per prompt) ``-Σ_i w̃_i log π_θ(y_i|a*,x)`` with sequence log-probs: a weighted NLL whose
minimiser over θ minimises ``KL(P̂ || π_θ)`` for the weighted sample estimate ``P̂`` of the target.
Each sample's term is multiplied by its prompt's sample count and averaged over samples, which is the
mean over prompts of the per-prompt loss when a batch holds whole prompts. Defaults are the recipe's:
n 10, 2 iterations of 2 epochs, constant LR 1e-7. Everything is computed in log space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.algorithms.iterative import IterativeConfig, IterativeTrainConfig, mean, optimizer_with_lr, recipe_rollout
from engine.algorithms.logprobs import lm_forward, response_logprobs, sequence_logprobs
from engine.algorithms.online import PromptSampling, RolloutConfig
from engine.config import ConfigError, DataConfig, OptimizerConfig, doc
from engine.data.errors import DataError
from engine.losses import self_normalised_weights, steerlm2_log_weights, weighted_nll

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"


def parse_target(text: str, field_name: str) -> dict[str, int]:
    """``"helpfulness:4,verbosity:2"`` → ``{"helpfulness": 4, "verbosity": 2}`` (names and 0..4 checked)."""
    from engine.data.schemas import parse_attributes

    try:
        return parse_attributes(text, None, field_name)
    except DataError as exc:  # a setting, not a data row: the row's hint (data.on_error) does not apply
        got = "" if exc.got is None else f", got {exc.got!r}"
        raise ConfigError(f"{field_name}={text!r}: {exc.field}: expected {exc.expected}{got}") from None


@dataclass
class SteerLM2Config:
    targets: list = doc("Target attribute strings ('helpfulness:4,...,verbosity:2'); prompt i of the prompt set "
                        "is conditioned on targets[i % len(targets)]; held-out prompts are evaluated at each.",
                        [DEFAULT_TARGET])
    attribute_sigma: float = doc("Width σ of the RM likelihood P(a*|x,y) = Π_k N(a*_k; μ_k(x,y), σ²).", 1.0)
    prior_attributes: Optional[str] = doc(
        "What the prior P(y|x) (the frozen initial policy) is prompted with: None = no attribute line "
        "(unconditioned), 'target' = the sample's own target a* (the default: a SteerLM policy never saw a prompt "
        "without attributes), or an attribute string.", "target")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("steerlm2.targets is empty: give at least one 'helpfulness:4,...' string")
        for i, target in enumerate(self.targets):
            parse_target(target, f"steerlm2.targets[{i}]")
        if self.prior_attributes and self.prior_attributes != "target":
            parse_target(self.prior_attributes, "steerlm2.prior_attributes")
        if not self.attribute_sigma > 0:
            raise ConfigError(f"steerlm2.attribute_sigma={self.attribute_sigma} must be > 0")


def _steerlm_data() -> DataConfig:
    return DataConfig(chat_template="nemotron", seq_length=256)  # the default preset's context


@dataclass
class SteerLM2TrainConfig(IterativeTrainConfig):
    """``keel train steerlm2``: the sampling sections, ``iterative`` and ``steerlm2``."""

    ALGORITHM: ClassVar[str] = "steerlm2"

    rollout: RolloutConfig = field(default_factory=lambda: recipe_rollout(epochs=2))
    iterative: IterativeConfig = field(default_factory=lambda: IterativeConfig(iterations=2))
    steerlm2: SteerLM2Config = field(default_factory=SteerLM2Config)
    optimizer: OptimizerConfig = optimizer_with_lr(1e-7)
    data: DataConfig = field(default_factory=_steerlm_data)
    reward_functions: list = field(default_factory=list, metadata={"doc": "Not used by steerlm2 (weights come "
                                                                           "from the reward model)."})

    def check_reward(self) -> None:
        return None  # the reward model is required, but only at validate: the defaults have none

    def validate(self, world_size: int) -> None:
        if not self.reward_model:
            raise ConfigError("steerlm2 needs a regression reward model: set reward_model=<checkpoint of keel train rm "
                              "with rm.type=regression>")
        super().validate(world_size)

    def check_checkpoints(self) -> None:
        """The reward model predicts attributes (a regression model's keel.json, read before any model is built)."""
        super().check_checkpoints()
        from engine.checkpoint.dist import CheckpointError
        from engine.eval.scoring import reward_model_config

        assert self.reward_model is not None  # validate
        _, rm_config = reward_model_config(self.reward_model, setting="reward_model")
        if rm_config.rm.type != "regression":
            raise CheckpointError(f"reward_model={self.reward_model} is a Bradley-Terry reward model (rm.type="
                                  f"{rm_config.rm.type}): steerlm2 reads the attributes a regression reward model "
                                  "predicts; set reward_model=<checkpoint of keel train rm with rm.type=regression>")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.chat_template != "nemotron":
            raise ConfigError(f"steerlm2: data.chat_template={self.data.chat_template!r}; SteerLM writes the "
                              "attributes into the prompt with the 'nemotron' template: set data.chat_template="
                              "nemotron (a checkpoint.load trained under another template has never seen them: "
                              "SteerLM 2.0 starts from a SteerLM SFT model)")
        if self.rollout.eval_samples_per_prompt:
            raise ConfigError(f"rollout.eval_samples_per_prompt={self.rollout.eval_samples_per_prompt} does not apply "
                              "to steerlm2: its held-out evaluation answers every prompt greedily at each target")


def warn_if_not_steerlm(load: Optional[str]) -> None:
    """A policy trained under another template than nemotron has never seen the attribute line that SteerLM 2.0
    conditions its proposal on: a warning naming the checkpoint and how a SteerLM SFT model is made."""
    from engine.checkpoint.inherit import checkpoint_config

    template = (checkpoint_config(load).get("data") or {}).get("chat_template") if load else None
    if template is not None and template != "nemotron":
        logger.warning("steerlm2: checkpoint.load=%s was trained with data.chat_template=%s, not nemotron: it has "
                       "never seen the attribute line the targets are written into, so its samples ignore them. "
                       "SteerLM 2.0 starts from a SteerLM SFT model (keel data convert-steerlm, then keel train "
                       "sft data.chat_template=nemotron)", load, template)


class WeightedSamples:
    """Prompt (with its target attributes) + sampled response ids, each with a weight (a data set of the loop)."""

    def __init__(self, rows: list[tuple[list[int], int, float]], seq_length: int, pad_id: int):
        self.rows = [r for r in rows if len(r[0]) <= seq_length]
        if len(self.rows) < len(rows):
            logger.warning("steerlm2: %d samples longer than data.seq_length=%d left out of training",
                           len(rows) - len(self.rows), seq_length)
        self.seq_length = seq_length
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, index: int) -> int:
        return len(self.rows[index][0])

    def collate(self, indices: list[int]) -> Batch:
        size, width = len(indices), self.seq_length
        tokens = torch.full((size, width), self.pad_id, dtype=torch.long)
        labels = torch.full((size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(size, width)
        weights = torch.zeros(size)
        for slot, index in enumerate(indices):
            ids, prompt, weight = self.rows[index]
            tokens[slot, : len(ids)] = torch.tensor(ids)
            labels[slot, : len(ids) - 1] = torch.tensor(ids[1:])
            mask[slot, prompt - 1: len(ids) - 1] = 1.0
            weights[slot] = weight
        return {"tokens": tokens, "labels": labels, "loss_mask": mask, "weight": weights}


def prompt_weights(target: dict[str, int], names: list[str], predicted: list[list[float]], prior: list[float],
                   proposal: list[float], sigma: float) -> tuple[list[float], list[float]]:
    """(log w_i, w̃_i) of one prompt's samples (see the module docstring); a sample whose prediction is NaN
    (not scored) gets log w = -inf and weight 0."""
    columns = [names.index(name) for name in target if name in names]
    if not columns:
        raise ConfigError(f"steerlm2: the reward model predicts {names}, none of the target's {sorted(target)}")
    aims = torch.tensor([float(target[names[c]]) for c in columns], dtype=torch.float64)
    mu = torch.tensor(predicted, dtype=torch.float64)[:, columns]
    log_w = steerlm2_log_weights(aims, mu, torch.tensor(prior, dtype=torch.float64),
                                 torch.tensor(proposal, dtype=torch.float64), sigma)
    log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, float("-inf")), log_w)
    if bool(torch.isinf(log_w).all()):
        return log_w.tolist(), [0.0] * len(prior)
    return log_w.tolist(), self_normalised_weights(log_w).tolist()


def attribute_gap(target: dict[str, int], names: list[str], predicted: list[float]) -> float:
    """Mean ``|a*_k - μ_k|`` over the target's attributes the reward model predicts."""
    return mean([abs(target[name] - predicted[names.index(name)]) for name in target if name in names])


class SteerLM2Step(PromptSampling, Step):
    name = "steerlm2"
    loss_name = "steerlm2_loss"
    iterative = True  # run by engine.iterative_trainer.IterativeTrainer

    def __init__(self, config: SteerLM2Config):
        self.settings = config
        self.targets = [parse_target(t, "steerlm2.targets") for t in config.targets]
        self.prior: Any = None
        self.parallel: Any = None
        self.names: list[str] = []

    def metric_names(self) -> tuple[str, ...]:
        return (self.loss_name, "sequence_logp")

    def setup(self, config: Any, parallel: Any, tokenizer: Any) -> None:
        """The prior P(y|x): the frozen initial policy (``reference``)."""
        from engine.runner import ModelRunner, starting_weights

        self.parallel = parallel
        if parallel.is_main:
            warn_if_not_steerlm(config.checkpoint.load)
        checkpoint = starting_weights(config.reference, config.checkpoint.load)
        self.prior = ModelRunner.frozen(config, parallel, self.model_class(), checkpoint)
        logger.info("steerlm2: prior P(y|x) = %s prompted with %s", checkpoint or "the policy's initialisation",
                    self.settings.prior_attributes or "no attributes")

    def _prior_attributes(self, target: str) -> Optional[str]:
        prior = self.settings.prior_attributes
        return target if prior == "target" else prior

    def _target_string(self, index: int) -> str:
        from engine.data.schemas import attribute_string

        return str(attribute_string(self.targets[index % len(self.targets)]))

    def target(self, prompt_index: int) -> Optional[str]:
        return self._target_string(prompt_index)

    def score_samples(self, trainer: Any, rows: list[Any], attributes: list[Any], prompts: list[list[int]],
                      rollouts: Any, responses: list[str]) -> list[dict[str, Any]]:
        """Predicted attributes μ(x,y), log Q(y|a*,x) (current policy) and log P(y|x) (prior) of every sample."""
        self.names, predicted = trainer.phase.reward_model_attributes(rows, responses)
        micro = trainer.config.data.micro_batch_size
        proposal = _sequence_sums(trainer.model, prompts, rollouts.tokens, micro)
        prior_prompts = [trainer.phase.render(row, self._prior_attributes(target))
                         for row, target in zip(rows, attributes, strict=True)]
        prior = _sequence_sums(self.prior, prior_prompts, rollouts.tokens, micro)
        return [{"predicted": dict(zip(self.names, p, strict=True)), "proposal_logp": q, "prior_logp": r}
                for p, q, r in zip(predicted, proposal, prior, strict=True)]

    def round_data(self, trainer: Any, samples: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]], str, dict[str, Any]]:
        """(weighted samples data set, weights.jsonl rows, its name, summary)."""
        by_prompt: dict[int, list[dict[str, Any]]] = {}
        for sample in samples:
            by_prompt.setdefault(sample["prompt_index"], []).append(sample)
        rows, train_rows, sizes = [], [], []
        for prompt, group in sorted(by_prompt.items()):
            target = parse_target(group[0]["attributes"], "attributes")
            names = list(group[0]["predicted"])
            log_w, weights = prompt_weights(target, names, [list(s["predicted"].values()) for s in group],
                                            [s["prior_logp"] for s in group], [s["proposal_logp"] for s in group],
                                            self.settings.attribute_sigma)
            sizes.append(1.0 / max(sum(w * w for w in weights), 1e-12))  # effective sample size
            ids = trainer.phase.render(trainer.prompts[prompt], group[0]["attributes"])
            for sample, lw, w in zip(group, log_w, weights, strict=True):
                rows.append({"prompt_index": prompt, "sample": sample["sample"], "attributes": sample["attributes"],
                             "log_weight": lw, "weight": w})
                if w > 0:
                    train_rows.append((ids + sample["tokens"], len(ids), w * len(group)))
        data = trainer.config.data
        dataset = WeightedSamples(train_rows, data.seq_length, trainer.tokenizer.pad_id)
        return dataset, rows, "weights.jsonl", {"effective_sample_size": mean(sizes), "weighted_samples": len(dataset)}

    def begin_round(self, trainer: Any) -> None:
        return None

    def sample_summary(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        gaps = [attribute_gap(parse_target(s["attributes"], "attributes"), list(s["predicted"]),
                              list(s["predicted"].values())) for s in samples]
        values = {"attribute_gap": mean([g for g in gaps if g == g]),
                  "response_length": mean([float(len(s["tokens"])) for s in samples])}
        for i in range(len(self.targets)):
            mine = [s for s in samples if s["attributes"] == self._target_string(i)]
            values[f"response_length_target{i}"] = mean([float(len(s["tokens"])) for s in mine])
        return values

    def evaluate(self, trainer: Any, rows: list[Any]) -> dict[str, float]:
        """Greedy answers to every held-out prompt at every target: attribute gap and length per target."""
        phase = trainer.phase
        phase.refit()
        values: dict[str, float] = {}
        gaps: list[float] = []
        for i in range(len(self.targets)):
            text = self._target_string(i)
            rollouts, responses = phase.generate([phase.render(r, text) for r in rows], 0, greedy=True)
            names, predicted = phase.reward_model_attributes(rows, responses)
            mine = [attribute_gap(self.targets[i], names, p) for p in predicted]
            mine = [g for g in mine if g == g]
            gaps += mine
            values[f"attribute_gap_target{i}"] = mean(mine)
            values[f"response_length_target{i}"] = mean([float(n) for n in rollouts.lengths])
            if "verbosity" in names:
                column = names.index("verbosity")
                values[f"predicted_verbosity_target{i}"] = mean([p[column] for p in predicted if p[column] == p[column]])
        values["attribute_gap"] = mean(gaps)
        return values

    def curve_metrics(self) -> tuple[str, ...]:
        return ("attribute_gap", "steerlm2_loss", "effective_sample_size", "response_length")

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[Any, Any]:
        return PromptSampling.build_datasets(self, config, tokenizer)

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        return lm_forward(model, batch)

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ rows of -n·w̃·log π(y|a*,x), rows, metrics); rows of weight 0 are padding."""
        logps, _ = sequence_logprobs(output, batch["labels"], batch["loss_mask"], self.parallel)
        weights = batch["weight"].to(logps.device).float()
        losses = weighted_nll(logps.float(), weights)
        present = (weights > 0).float()
        count = present.sum()
        metrics = {self.loss_name: torch.stack([losses.sum().detach(), count]),
                   "sequence_logp": torch.stack([(logps.detach().float() * present).sum(), count])}
        return losses.sum(), count.to(torch.int), metrics


def _sequence_sums(runner: Any, prompts: list[list[int]], responses: list[list[int]], micro: int) -> list[float]:
    """Sequence log-prob of each response after its prompt under ``runner`` (forward-only, every rank)."""
    per_token = response_logprobs(runner, [p + r for p, r in zip(prompts, responses, strict=True)],
                                  [len(p) for p in prompts], micro)
    return [float(sum(row)) for row in per_token]


CONFIG = SteerLM2TrainConfig


def create(config: Any) -> SteerLM2Step:
    return SteerLM2Step(config.steerlm2)
