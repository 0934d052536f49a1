"""Supervised fine-tuning: next-token NLL on response tokens.

loss = sum_t mask_t * -log p(y_t | y_<t) / sum_t mask_t over the global batch, where
mask marks assistant tokens (``data.loss_on=assistant``) or every real token (``all``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.config import TrainConfig
from engine.data.sft import build_sft_dataset
from engine.data.sources import load_rows


class SFTStep(Step):
    name = "sft"
    loss_name = "lm_loss"

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[Any, Any]:
        train_rows, valid_rows = load_rows(config.data, config.run.seed)
        return build_sft_dataset(train_rows, tokenizer, config.data), build_sft_dataset(valid_rows, tokenizer, config.data)

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        tokens = batch["tokens"]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return model(tokens, position_ids, batch.get("attention_mask"), labels=batch["labels"])

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].to(output.device).float()
        total = (output.float() * mask).sum()
        count = mask.sum()
        return total, count.to(torch.int), {self.loss_name: torch.stack([total.detach(), count])}



CONFIG = TrainConfig


def create(config: Any) -> SFTStep:
    return SFTStep()
