"""Reward models: SteerLM multi-attribute regression and Bradley-Terry (regular/margin/scaled).

* ``rm.type=regression``: the head predicts the attributes in ``rm.attributes`` (0..4
  HelpSteer ratings) at the end-of-response token; loss = mean squared error over the
  labels present (missing ratings are masked).
* ``rm.type=bt``: one scalar per response; chosen and rejected of a pair sit in the same
  micro-batch; loss = Bradley-Terry variant ``rm.bt_variant`` (strength = ``margin``).
  ``auto`` picks ``scaled`` when every pair carries a strength and ``regular`` otherwise,
  and logs its choice; an explicit ``margin`` or ``scaled`` on pairs without a strength
  is refused before training, naming the file and the first such row. A step whose pairs
  all weigh 0 (dropped as diverging, or strength 0 under ``scaled``) stops the run.

Both report ``accuracy`` (chosen scored above rejected). Regression validation data is
paired by prompt (the response with the higher goodness is "chosen", ties dropped), so
regression runs report pairwise accuracy of the goodness score as well as the MSE.
Pairs whose annotators diverge can be kept, dropped, or down-weighted (``rm.diverging``).

Over-long rows keep their response whole and lose the start of their prompt
(``data.overlong=cut_prompt``, see :mod:`engine.data.fit`); a row whose response alone
does not fit is dropped. The counts are logged per source.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.config import ConfigError, DataConfig, TrainConfig, doc
from engine.data.batching import kept_rows
from engine.data.convert import helpsteer2_preference_to_bt
from engine.data.errors import DataError, Where
from engine.data.loaders import iter_records
from engine.data.preference import AttributeDataset, PreferenceDataset
from engine.data.schemas import ATTRIBUTES, MISSING, check_row
from engine.data.sources import paired_rows
from engine.losses import bradley_terry, masked_mse, weighted_score

logger = logging.getLogger(__name__)

GOODNESS_WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45}
BT_VARIANTS = ("auto", "regular", "margin", "scaled")


@dataclass
class RewardConfig:
    type: str = doc("'regression' (SteerLM attributes, MSE) or 'bt' (Bradley-Terry on pairs).", "regression")
    bt_variant: str = doc("Bradley-Terry loss on the rewards r_c (chosen) and r_r (rejected) of a pair, whose "
                          "preference strength l is its 'margin' field: "
                          "'regular' -log sigmoid(r_c - r_r); 'margin' -log sigmoid(r_c - r_r - |l|); 'scaled' "
                          "|l| * -log sigmoid(r_c - r_r); 'auto' picks scaled if every pair has a margin, else "
                          "regular, and logs its choice.", "auto")
    attributes: list = doc("Attributes a regression model predicts, in head order.", list(ATTRIBUTES))
    score_weights: dict = doc("Weights turning attribute predictions into one score (default: goodness).",
                              dict(GOODNESS_WEIGHTS))
    diverging: str = doc("Pairs whose annotators disagree: 'keep', 'drop' or 'downweight'.", "keep")
    diverging_weight: float = doc("Loss weight of diverging pairs with rm.diverging=downweight.", 0.5)
    spread_threshold: float = doc("Also treat a pair as diverging when max-min annotator strength is above this "
                                  "(0 = off).", 0.0)

    def __post_init__(self) -> None:
        if self.type not in ("regression", "bt"):
            raise ConfigError(f"rm.type={self.type!r} is not one of 'regression', 'bt'")
        if self.bt_variant not in BT_VARIANTS:
            raise ConfigError(f"rm.bt_variant={self.bt_variant!r} is not one of {', '.join(map(repr, BT_VARIANTS))}")
        if self.diverging not in ("keep", "drop", "downweight"):
            raise ConfigError(f"rm.diverging={self.diverging!r} is not one of 'keep', 'drop', 'downweight'")
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown or not self.attributes:
            raise ConfigError(f"rm.attributes={self.attributes!r}: choose a non-empty subset of {', '.join(ATTRIBUTES)}")
        bad = [a for a in self.score_weights if a not in ATTRIBUTES]
        if bad:
            raise ConfigError(f"rm.score_weights has unknown attributes {bad}; use {', '.join(ATTRIBUTES)}")


def other_rm_type(rm_type: str) -> str:
    """The reward-model type that is not ``rm_type``: the one a hint names for the other type's rows."""
    return "bt" if rm_type == "regression" else "regression"


def _rm_data_defaults() -> DataConfig:
    # No validation_source: validation comes from data.source, whatever the user sets it to
    # (see RewardStep.build_datasets).
    return DataConfig(source="builtin:helpsteer", format="attributes", seq_length=256, micro_batch_size=4,
                      global_batch_size=16, num_samples=2048, overlong="cut_prompt")


@dataclass
class RewardTrainConfig(TrainConfig):
    """``keel train rm``: the shared sections plus ``rm``."""

    rm: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=_rm_data_defaults)
    OVERLONG: ClassVar[tuple[str, ...]] = ("cut_prompt", "drop")  # a reward is never read from a cut response
    TYPE_FORMATS: ClassVar[dict[str, tuple[str, ...]]] = {"regression": ("attributes",),
                                                           "bt": ("pairs", "helpsteer2_preference")}
    IGNORED: ClassVar[dict[str, str]] = {
        "data.pack": "a reward model scores each response (or pair) as its own sample, never packed with others",
        "data.loss_on": "a reward model's loss is on the score read at each response's last token",
    }
    FINE_TUNE_LR: ClassVar[Optional[float]] = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run.output_dir == "runs/sft-demo":
            self.run.output_dir = "runs/rm"
            self.checkpoint.dir = "runs/rm/checkpoints"
        expected = self.data_formats()
        if self.data.format not in expected:
            other = other_rm_type(self.rm.type)
            hint = f"; data.format={self.data.format} trains rm.type={other}" \
                if self.data.format in self.TYPE_FORMATS[other] else ""
            default = _rm_data_defaults()
            if self.data.format == default.format:  # the user set rm.type=bt and not the data's format
                source = " and data.source to your pairs file" if self.data.source == default.source else ""
                hint = (f" (the default, for rated rows); set data.format=pairs or helpsteer2_preference{source}, "
                        f"or rm.type={other} for rated rows")
            raise ConfigError(f"rm.type={self.rm.type} trains on data.format in {expected}, got "
                              f"{self.data.format!r}{hint}")

    def data_formats(self) -> tuple[str, ...]:
        """Regression reads attribute rows; Bradley-Terry reads pairs."""
        return self.TYPE_FORMATS[self.rm.type]


class PairedAttributes:
    """Attribute rows paired by prompt: samples ``[c0, r0, c1, r1, ...]`` with both label sets."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, data: Any, weights: dict[str, float],
                 source: str = "<data>"):
        by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_prompt[str(row["prompt"])].append(row)

        def goodness(row: dict[str, Any]) -> float:
            return sum(w * float(row.get(k, 0) if row.get(k, MISSING) != MISSING else 0) for k, w in weights.items())

        ordered = []
        for group in by_prompt.values():
            if len(group) >= 2 and goodness(group[0]) != goodness(group[1]):
                first, second = sorted(group[:2], key=goodness, reverse=True)
                ordered += [first, second]
        self.inner = AttributeDataset(ordered, tokenizer, data.seq_length, template=data.chat_template,
                                      overlong=data.overlong if data.overlong != "truncate" else "drop",
                                      source=source)
        # A pair counts only when both of its rows fit: (sample of the chosen, sample of the rejected).
        sample_of = {row: sample for sample, row in enumerate(self.inner.row_index)}
        self.pairs = [(sample_of[2 * k], sample_of[2 * k + 1]) for k in range(len(ordered) // 2)
                      if 2 * k in sample_of and 2 * k + 1 in sample_of]
        if len(self.pairs) < len(ordered) // 2:
            logger.warning("validation: dropped %d of %d pairs with a row longer than seq_length=%d",
                           len(ordered) // 2 - len(self.pairs), len(ordered) // 2, data.seq_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def length(self, index: int) -> int:
        return max(self.inner.length(j) for j in self.pairs[index])

    def collate(self, indices: list[int]) -> Batch:
        batch = self.inner.collate([j for i in indices for j in self.pairs[i]])
        batch["paired"] = torch.ones(len(indices), dtype=torch.bool)
        return batch


def check_rated(rows: list[dict[str, Any]], attributes: Sequence[str], source: str) -> None:
    """A regression head learns an attribute only from rows that rate it: refuse training data that rates none
    of ``attributes``, and warn of each one it never rates, and of fields that differ from an attribute only in
    case or one slip of spelling ("Helpfulness", "helpfullness" trained nothing, silently)."""
    from engine.data.schemas import near_attribute

    unrated = [a for a in attributes if not any(row.get(a, MISSING) != MISSING for row in rows)]
    near = sorted({f"{key} (for {meant})" for row in rows[:1000] for key in row if (meant := near_attribute(key))})
    unread = f"not read: {', '.join(near)}; rating fields are spelled {', '.join(ATTRIBUTES)}" if near else ""
    if len(unrated) == len(attributes):
        raise DataError(None, "<ratings>", f"rows that rate at least one of rm.attributes={list(attributes)}",
                        got="none", source=source, hint=f"check the rating fields; {unread}" if near else
                        "check the rating fields")
    if unrated:
        logger.warning("%s: no row rates %s, so the head learns nothing there; drop %s from rm.attributes%s", source,
                       ", ".join(unrated), "it" if len(unrated) == 1 else "them", f"; {unread}" if near else "")
    elif near:
        logger.warning("%s: %s", source, unread)


class RewardStep(Step):
    name = "rm"
    loss_name = "rm_loss"
    reads_keep = True

    def __init__(self, rm: RewardConfig):
        self.rm = rm
        self.variant = rm.bt_variant  # "auto" is resolved against the data in build_datasets
        self.head_size = len(rm.attributes) if rm.type == "regression" else 1
        attribute_index = [ATTRIBUTES.index(a) for a in rm.attributes]
        self._label_columns = torch.tensor(attribute_index)
        self._weights = torch.tensor([rm.score_weights.get(a, 0.0) for a in rm.attributes])
        if rm.type == "regression" and not bool((self._weights != 0).any()):
            self._weights = torch.ones(len(rm.attributes))  # e.g. helpfulness-only models score by it

    def model_class(self) -> tuple[type, dict[str, Any]]:
        from engine.models.heads import RewardGPTModel

        return RewardGPTModel, {"num_outputs": self.head_size}

    def metric_names(self) -> tuple[str, ...]:
        return (self.loss_name, "accuracy")

    def empty_step_hint(self) -> str:
        if self.rm.type == "regression":
            return (f"no row of the step rates any of rm.attributes={list(self.rm.attributes)} (the rating fields are "
                    f"lower-case: {', '.join(ATTRIBUTES)})")
        return ("every pair of the step weighs 0: dropped as diverging (rm.diverging=drop) or of strength 0 under "
                "rm.bt_variant=scaled; use rm.diverging=downweight, more data per step, or rm.bt_variant=regular")

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[Any, Any]:
        data = config.data
        try:
            train_rows, valid_rows = paired_rows(data, config.run.seed, config.data_formats())
        except DataError as exc:
            raise self._other_type_hint(exc) from None
        train_source, valid_source = data.source, data.validation_source or data.source
        if self.rm.type == "regression":
            train = AttributeDataset(train_rows, tokenizer, data.seq_length, template=data.chat_template,
                                     overlong=data.overlong, source=train_source)
            check_rated(train_rows, self.rm.attributes, train_source)
            valid = PairedAttributes(valid_rows, tokenizer, data, self.rm.score_weights, f"{valid_source} (validation)")
            return train, valid
        if data.format == "helpsteer2_preference":
            train_rows, _ = helpsteer2_preference_to_bt(train_rows)
            valid_rows, _ = helpsteer2_preference_to_bt(valid_rows)
        self.variant = resolve_bt_variant(self.rm.bt_variant, data, config.run.seed, train_rows, valid_rows)
        make = lambda rows, name: PreferenceDataset(rows, tokenizer, data.seq_length,  # noqa: E731
                                                    template=data.chat_template, overlong=data.overlong, source=name)
        return make(train_rows, train_source), make(valid_rows, f"{valid_source} (validation)")

    def _other_type_hint(self, error: DataError) -> DataError:
        """Rows of the other reward-model type's format name the ``rm.type`` that trains on them."""
        other = other_rm_type(self.rm.type)
        if error.looks_like not in RewardTrainConfig.TYPE_FORMATS[other]:
            return error
        kind = "preference pairs train a Bradley-Terry" if other == "bt" else "rated rows train a regression"
        return error.with_hint(f"the row has the fields of data.format={error.looks_like}: {kind} reward model; "
                               f"set rm.type={other} data.format={error.looks_like}")

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None)
        if not getattr(model, "module", model).post_process:
            return output  # not the last pipeline stage: hidden states for the next one
        from engine.models.heads import select_end

        return select_end(output, batch["end_index"])  # [rows, K]

    def scores(self, rewards: torch.Tensor) -> torch.Tensor:
        """One scalar per row: the weighted attributes (regression) or the reward (BT)."""
        if self.rm.type == "bt":
            return rewards[:, 0].float()
        return weighted_score(rewards, self._weights)

    def _pair_weights(self, batch: Batch) -> torch.Tensor:
        diverging = batch["diverging"].bool()
        if self.rm.spread_threshold > 0:
            diverging = diverging | (batch["annotator_spread"] > self.rm.spread_threshold)
        weights = torch.ones(diverging.shape[0], device=diverging.device)  # the mask may live on a GPU
        if self.rm.diverging == "drop":
            weights[diverging] = 0.0
        elif self.rm.diverging == "downweight":
            weights[diverging] = self.rm.diverging_weight
        return weights

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of losses, item count, metrics). Items: present labels (regression) or pairs of weight > 0 (BT).

        Down-weighted pairs still count as one item each, so the loss is sum(w * l) / pairs kept; a pair
        weighs 0 when dropped as diverging or, under ``scaled``, when its strength is 0.
        """
        rewards = output.float()
        device = rewards.device
        kept = kept_rows(batch, rewards.shape[0], device)  # 0 on rows that only fill a validation batch
        correct, pairs = torch.zeros((), device=device), torch.zeros((), device=device)
        if self.rm.type == "regression":
            labels = batch["attributes"][:, self._label_columns].to(device)
            errors, present = masked_mse(rewards, labels, missing=float(MISSING))
            total, count = (errors * kept[:, None]).sum(), (present * kept[:, None]).sum()
            if "paired" in batch:  # validation pairs: rows [c0, r0, c1, r1, ...]
                pair_scores = self.scores(rewards).view(-1, 2)
                kept_pairs = kept.view(-1, 2)[:, 0]
                correct = ((pair_scores[:, 0] > pair_scores[:, 1]).float() * kept_pairs).sum()
                pairs = kept_pairs.sum()
        else:
            pair_rewards = rewards[:, 0].view(-1, 2)
            kept_pairs = kept.view(-1, 2)[:, 0]
            weights = self._pair_weights(batch).to(device) * kept_pairs
            margin = batch["margin"].to(device)
            losses = bradley_terry(pair_rewards[:, 0], pair_rewards[:, 1], self.variant, margin)
            effective = weights * margin.abs() if self.variant == "scaled" else weights
            total, count = (losses * weights).sum(), (effective > 0).float().sum()
            correct = ((pair_rewards[:, 0] > pair_rewards[:, 1]).float() * kept_pairs).sum()
            pairs = kept_pairs.sum()
        metrics = {
            self.loss_name: torch.stack([total.detach(), count.detach()]),
            "accuracy": torch.stack([correct.detach(), pairs]),
        }
        return total, count.to(torch.int), metrics


def _first_without_strength(source: str, fmt: str, num: int, seed: int) -> Optional[Where]:
    """Where the first valid pair of ``source`` without a ``margin`` is (scanned only to report it)."""
    for where, raw in iter_records(source, num, seed):
        try:
            row = check_row(fmt, raw, where)
        except DataError:
            continue
        if row.get("margin") is None:
            return where
    return None


def resolve_bt_variant(requested: str, data: DataConfig, seed: int, train_rows: list[dict[str, Any]],
                       valid_rows: list[dict[str, Any]]) -> str:
    """The Bradley-Terry variant to train with (see the module docstring); logs what ``auto`` chose."""
    lacking = [(rows, source, offset) for rows, source, offset in
               ((train_rows, data.source, 0), (valid_rows, data.validation_source or data.source, 1))
               if any(row.get("margin") is None for row in rows)]
    if requested == "auto":
        variant = "regular" if lacking else "scaled"
        reason = (f"pairs of {lacking[0][1]} carry no strength ('margin')" if lacking
                  else "every pair carries a strength ('margin')")
        logger.info("rm.bt_variant=auto: %s, training %s Bradley-Terry", reason, variant)
        return variant
    if requested in ("margin", "scaled") and lacking:
        _, source, offset = lacking[0]  # builtin validation rows are drawn with the next seed
        where = _first_without_strength(source, data.format, data.num_samples, seed + offset)
        raise DataError(where, "margin", f"a preference strength: rm.bt_variant={requested} weighs every pair by "
                        "it", "missing", source=source,
                        hint="add 'margin' to every row, or set rm.bt_variant=regular (or auto)")
    return requested


CONFIG = RewardTrainConfig


def create(config: Any) -> RewardStep:
    return RewardStep(config.rm)
