"""The contract between the shared training loop and one algorithm.

An algorithm is a :class:`Step`: it says what data it trains on, how one micro-batch
goes through the model on the last pipeline stage, and how that output becomes a loss.
The trainer owns everything else (schedules, accumulation, optimizer, checkpoints,
logging), so reward models, DPO or PPO plug in without touching the loop.

Algorithms that need more than the trained model (DPO's frozen reference, later PPO's
critic and reward model) build them in :meth:`Step.setup` as
:class:`~engine.runner.ModelRunner` objects at the run's layout, and run forward-only
work on each step's micro-batches in :meth:`Step.before_schedule` (e.g. reference
log-probs, stored into the micro-batches for the last pipeline stage's loss).

Loss convention (megatron's per-token mode): ``loss`` returns the *sum* of the
per-item losses of the micro-batch and the number of items it summed over; the trainer
divides gradients by the item count of the whole global batch across micro-batches and
data-parallel ranks. The reported loss is therefore the same for every layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from engine.data.batching import Batch, StepDataset


class Step(ABC):
    """What one micro-batch does. Subclasses set ``name`` and ``loss_name``."""

    name: str = "step"
    loss_name: str = "loss"
    # whether :meth:`loss` weighs rows by ``batch["keep"]`` (:class:`engine.data.batching.ReadOnce`): then a
    # validation reads each row once, the last global batch filled with rows that count nothing
    reads_keep: bool = False

    def setup(self, config: Any, parallel: Any, tokenizer: Any) -> None:
        """Build extra (frozen) models or state, after the data sets; the default needs none."""
        return None

    @abstractmethod
    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[StepDataset, StepDataset]:
        """(train, validation) data sets; built before the models, so they may not need :meth:`setup`'s."""

    def check_datasets(self, config: Any, tokenizer: Any, train: Any, valid: Any) -> None:
        """Refuse data the run cannot use, with one error naming file, line and field, before the models are
        built; the default has nothing to check beyond what :meth:`build_datasets` did."""
        return None

    def before_schedule(self, micro_batches: list[Batch]) -> None:
        """Forward-only work on one step's micro-batches before its schedule (in place); default none.

        Runs on every rank of every pipeline stage; what it adds for the loss only needs to be
        present on the last stage.
        """
        return None

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        """Run ``model`` on ``batch`` (process groups in ``parallel``); on the last stage return what :meth:`loss` consumes."""

    @abstractmethod
    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of losses, item count, {metric: tensor([sum, count])}) for one micro-batch."""

    def model_class(self) -> tuple[type, dict[str, Any]]:
        """The megatron model class to build per chunk and its extra constructor arguments."""
        from megatron.core.models.gpt import GPTModel

        return GPTModel, {}

    def metric_names(self) -> tuple[str, ...]:
        """Names of the (sum, count) metrics :meth:`loss` reports; the first is the loss."""
        return (self.loss_name,)

    def curve_metrics(self) -> tuple[str, ...]:
        """Metrics drawn into the run's ``curves.png``: the step's own, then the gradient norm and learning rate."""
        return (*self.metric_names(), "grad_norm", "lr")

    def empty_step_hint(self) -> str:
        """What to change when a training step has no item that carries loss (its item count is 0)."""
        return "check the data of this step"

    def tokens_in(self, batch: Batch) -> int:
        """Number of tokens processed for throughput reporting."""
        return int(batch["tokens"].numel())
