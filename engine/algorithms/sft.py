"""Supervised fine-tuning: next-token NLL on response tokens.

loss = sum_t mask_t * -log p(y_t | y_<t) / sum_t mask_t over the global batch, where
mask marks assistant tokens (``data.loss_on=assistant``) or every real token (``all``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.config import ConfigError, TrainConfig
from engine.data.batching import kept_rows
from engine.data.sft import build_sft_dataset
from engine.data.sources import load_rows


@dataclass
class SFTTrainConfig(TrainConfig):
    """``keel train sft``: the shared sections, on chat or plain-text rows."""

    FORMATS: ClassVar[tuple[str, ...]] = ("chat", "text")
    FINE_TUNE_LR: ClassVar[Optional[float]] = 2e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.format not in self.FORMATS:
            raise ConfigError(f"keel train sft trains on data.format 'chat' or 'text', got {self.data.format!r}")


class SFTStep(Step):
    name = "sft"
    loss_name = "lm_loss"
    reads_keep = True

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[Any, Any]:
        data = config.data
        train_rows, valid_rows = load_rows(data, config.run.seed, config.data_formats())
        valid_source = f"{data.validation_source or data.source} (validation)"
        return (build_sft_dataset(train_rows, tokenizer, data, source=data.source),
                build_sft_dataset(valid_rows, tokenizer, data, source=valid_source))

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        tokens = batch["tokens"]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return model(tokens, position_ids, batch.get("attention_mask"), labels=batch["labels"])

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].to(output.device).float() * kept_rows(batch, output.shape[0], output.device)[:, None]
        total = (output.float() * mask).sum()
        count = mask.sum()
        return total, count.to(torch.int), {self.loss_name: torch.stack([total.detach(), count])}


CONFIG = SFTTrainConfig


def create(config: Any) -> SFTStep:
    return SFTStep()
