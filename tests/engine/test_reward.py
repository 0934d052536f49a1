"""Reward models in one process: the combined recipe end to end, weights-only init, the scorer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.algorithms.reward import RewardStep, RewardTrainConfig
from engine.config import ConfigError, load_config
from tests.helpers import REPO, single_process_parallel

SMALL = [
    "run.train_steps=4", "run.eval_interval=2", "run.eval_batches=1", "data.num_samples=64", "data.seq_length=96",
    "data.micro_batch_size=2", "data.global_batch_size=4", "logging.progress=false", "logging.tensorboard=false",
    "checkpoint.save_interval=0",
]


def _fit(config_file: str, tmp_path: Path, name: str, *extra: str) -> object:
    from engine.trainer import Trainer

    config = load_config(RewardTrainConfig, str(REPO / "examples" / config_file),
                         SMALL + [f"run.output_dir={tmp_path / name}", *extra])
    with single_process_parallel(seed=config.run.seed) as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        result = trainer.fit()
        head = trainer.model.chunks[0].module.reward_head.weight.detach().clone()
    return result, head


def test_combined_recipe_regression_then_scaled_bt(tmp_path: Path) -> None:
    first, head = _fit("rm_regression_helpfulness.yaml", tmp_path, "stage1")
    assert first.best_checkpoint and "accuracy" not in str(first.validation)
    best = tmp_path / "stage1" / "checkpoints" / "best"
    assert best.is_file()
    second, _ = _fit("rm_scaled_bt_from_regression.yaml", tmp_path, "stage2", f"checkpoint.load={best}",
                     "run.train_steps=1", "run.eval_interval=0")
    assert second.losses and all(v == v for v in second.losses.values())
    # stage 2 started from stage 1's weights: its initial head equals the best stage-1 head
    config = load_config(RewardTrainConfig, str(REPO / "examples" / "rm_scaled_bt_from_regression.yaml"),
                         SMALL + [f"run.output_dir={tmp_path / 'stage2b'}", f"checkpoint.load={best}"])
    from engine.eval.scoring import load_scorer
    from engine.trainer import Trainer

    with single_process_parallel(seed=config.run.seed) as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        trainer.maybe_resume()
        loaded = trainer.model.chunks[0].module.reward_head.weight.detach().clone()
        best_head = load_scorer(str(best)).chunks[0].reward_head.weight.detach()
    best_step = int(best.read_text().strip().split("_")[1])
    assert best_step in first.validation
    assert torch.equal(loaded, best_head)
    if best_step == max(first.validation):
        assert torch.equal(loaded, head)


def test_sft_checkpoint_initialises_a_reward_model(tmp_path: Path) -> None:
    from engine.algorithms.sft import SFTStep
    from engine.config import TrainConfig
    from engine.trainer import Trainer

    sft_config = load_config(TrainConfig, None, ["run.train_steps=1", "data.num_samples=32", "data.seq_length=64",
                                                 "data.micro_batch_size=2", "data.global_batch_size=2",
                                                 "logging.progress=false", f"run.output_dir={tmp_path / 'sft'}"])
    with single_process_parallel() as parallel:
        sft = Trainer(sft_config, SFTStep(), parallel)
        sft.fit()
        embedding = sft.model.chunks[0].module.embedding.word_embeddings.weight.detach().clone()
    rm_config = load_config(RewardTrainConfig, None, SMALL + [f"run.output_dir={tmp_path / 'rm'}",
                                                              f"checkpoint.load={tmp_path / 'sft' / 'checkpoints'}"])
    with single_process_parallel(seed=99) as parallel:
        trainer = Trainer(rm_config, RewardStep(rm_config.rm), parallel)
        assert trainer.maybe_resume() == 0
        loaded = trainer.model.chunks[0].module.embedding.word_embeddings.weight.detach()
    assert torch.equal(loaded, embedding)


def test_scorer_matches_direct_forward(tmp_path: Path) -> None:
    from engine.eval.scoring import RewardScorer
    from engine.trainer import Trainer

    config = load_config(RewardTrainConfig, None, SMALL + [f"run.output_dir={tmp_path}", "run.train_steps=1"])
    with single_process_parallel() as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        step = trainer.step
        scorer = RewardScorer(trainer.model.chunks, step, trainer.tokenizer, parallel, 96, micro_batch_size=2)
        # Lengths vary (the scorer sorts rows by length and cuts each micro-batch to its longest row),
        # one row is longer than the 96 positions, and 5 rows leave a padded last micro-batch.
        rows = [("What is 2 + 2?", "2 + 2 = 4."), ("Q", "A."), ("Tell me a story.", "Once upon a time " * 9),
                ("What is 2 + 2?", "2 + 2 = 5."), ("Hi", "Hello there, how can I help you today?")]
        rewards = scorer.score(rows)
        assert rewards.shape == (5, 5)
        for i, (prompt, response) in enumerate(rows):
            item = scorer._encode(prompt, response)
            batch = {k: v.unsqueeze(0) for k, v in item.items()}
            with torch.no_grad():
                direct = step.forward(trainer.model.chunks[0], batch)[0]
            assert torch.allclose(rewards[i], direct.float(), atol=1e-5)


def test_rm_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"rm.type='ranking' is not one of"):
        load_config(RewardTrainConfig, None, ["rm.type=ranking"])
    with pytest.raises(ConfigError, match=r"rm.attributes=\['honesty'\]"):
        load_config(RewardTrainConfig, None, ["rm.attributes=[honesty]"])
    with pytest.raises(ConfigError, match=r"rm.type=bt trains on data.format in"):
        load_config(RewardTrainConfig, None, ["rm.type=bt"])


def test_validation_pairs_stay_aligned_when_a_row_is_too_long() -> None:
    """Regression validation pairs rows by prompt; an over-long row drops its whole pair, not one row."""
    from engine.algorithms.reward import PairedAttributes
    from engine.config import DataConfig
    from engine.data.tokenizers import load_tokenizer

    def row(prompt: str, response: str, score: int) -> dict:
        return {"prompt": prompt, "response": response, "helpfulness": score, "correctness": score,
                "coherence": score, "complexity": 1, "verbosity": 1}

    rows = [row("p1", "worse", 1), row("p1", "better", 3),
            row("p2", "fine", 4), row("p2", "x" * 200, 0),  # the rejected row of p2 does not fit
            row("p3", "good", 2), row("p3", "bad", 0),
            row("p4", "tie", 2), row("p4", "tie too", 2)]  # equal goodness: no pair
    data = DataConfig(seq_length=64, chat_template="plain")
    paired = PairedAttributes(rows, load_tokenizer("byte"), data, {"helpfulness": 1.0})
    assert len(paired) == 2
    batch = paired.collate([0, 1])
    # rows [chosen p1, rejected p1, chosen p3, rejected p3]
    assert batch["attributes"][:, 0].tolist() == [3.0, 1.0, 2.0, 0.0]
    assert batch["paired"].tolist() == [True, True]


def test_untied_output_layer_is_frozen_and_checkpoints_round_trip(tmp_path: Path) -> None:
    from engine.trainer import Trainer

    overrides = SMALL + ["model.preset=tiny-nemotron", f"run.output_dir={tmp_path}", "run.train_steps=2",
                         "run.eval_interval=0", "checkpoint.save_interval=2"]
    config = load_config(RewardTrainConfig, None, overrides)
    with single_process_parallel() as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        model = trainer.model.chunks[0].module
        frozen = model.output_layer.weight
        assert not frozen.requires_grad and model.reward_head.weight.requires_grad
        optimized = {id(p) for group in trainer.model.optimizer.param_groups for p in group["params"]}
        assert id(frozen) not in optimized and id(model.reward_head.weight) in optimized
        before = frozen.detach().clone()
        trainer.fit()
        assert torch.equal(frozen, before)
        head = model.reward_head.weight.detach().clone()
    with single_process_parallel() as parallel:
        resumed = Trainer(load_config(RewardTrainConfig, None, overrides + ["checkpoint.resume=auto"]),
                          RewardStep(config.rm), parallel)
        assert resumed.maybe_resume() == 2
        assert torch.equal(resumed.model.chunks[0].module.reward_head.weight, head)
