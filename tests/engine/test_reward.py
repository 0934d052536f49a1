"""Reward models in one process: the combined recipe end to end, weights-only init, the scorer."""

from __future__ import annotations

import json
import math
import random
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


def _validation_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == "validation"]


def _short_answer_preferences(path: Path, count: int, first: int) -> str:
    """HelpSteer2-Preference rows preferring a bare number to a long non-answer, in random order."""
    rng = random.Random(first)
    rows = []
    for i in range(first, first + count):
        short, long = f"{i}.", "I do not know the answer to that question."
        strength = rng.choice([2, 3])
        one, two, sign = (long, short, 1) if rng.random() < 0.5 else (short, long, -1)
        rows.append({"prompt": f"question {i}", "response_1": one, "response_2": two,
                     "preference_strength": sign * strength})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _check_scoring_of_over_long_pairs(checkpoint: Path) -> None:
    """score_pairs_from_checkpoint (seq_length 96): a long prompt is cut, a response that does not fit is not scored."""
    from engine.eval.scoring import score_pairs_from_checkpoint

    rows = [{"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
            {"prompt": "Read this first. " * 12 + "What is 3 + 3?", "chosen": "6.", "rejected": "It is 7."},
            {"prompt": "Hi", "chosen": "Hello! " * 20, "rejected": "Go away."}]
    chosen, rejected, attributes, fits = score_pairs_from_checkpoint(str(checkpoint), rows, None)
    assert fits == ["whole", "prompt_cut", "dropped"]
    assert all(math.isfinite(v) for v in chosen[:2] + rejected[:2]) and math.isnan(chosen[2])
    assert attributes is not None and attributes["names"] == ["helpfulness"] and len(attributes["rejected"]) == 3
    # scored a few responses at a time under a progress bar (keel eval rewardbench sat silent): the same scores
    import engine.eval.scoring

    engine.eval.scoring.SCORE_CHUNK, chunk = 1, engine.eval.scoring.SCORE_CHUNK
    try:
        again = score_pairs_from_checkpoint(str(checkpoint), rows, None, progress=True)
    finally:
        engine.eval.scoring.SCORE_CHUNK = chunk
    assert again[0][:2] == pytest.approx(chosen[:2], abs=1e-6) and again[1][:2] == pytest.approx(rejected[:2], abs=1e-6)


def test_combined_recipe_regression_then_scaled_bt(tmp_path: Path) -> None:
    from engine.eval.scoring import load_scorer
    from engine.trainer import Trainer

    first, _ = _fit("rm_regression_helpfulness.yaml", tmp_path, "stage1")
    # stage 1 validates on prompt pairs: pairwise accuracy of the helpfulness score is reported
    validation = _validation_records(tmp_path / "stage1")
    assert [r["step"] for r in validation] == [2, 4] and all(0.0 <= r["accuracy"] <= 1.0 for r in validation)
    best = tmp_path / "stage1" / "checkpoints" / "best"
    assert first.best_checkpoint and best.is_file()
    assert int(best.read_text().strip().split("_")[1]) in first.validation
    _check_scoring_of_over_long_pairs(best)
    # Stage 2 as the example runs it, on HelpSteer2-Preference rows whose signal a few steps can learn
    # (the built-in pairs need far more steps than a unit test affords): the short answer is preferred,
    # the opposite of what the stage-1 model scores higher, so the accuracy must move to pass.
    train, valid = _short_answer_preferences(tmp_path / "train.jsonl", 64, 0), \
        _short_answer_preferences(tmp_path / "valid.jsonl", 32, 1000)
    config = load_config(RewardTrainConfig, str(REPO / "examples" / "rm_scaled_bt_from_regression.yaml"),
                         SMALL + [f"run.output_dir={tmp_path / 'stage2'}", f"checkpoint.load={best}",
                                  "run.train_steps=8", "run.eval_interval=0", "run.eval_batches=8",
                                  "optimizer.lr=2e-3", "scheduler.warmup_steps=0", f"data.source={train}",
                                  f"data.validation_source={valid}"])
    with single_process_parallel(seed=config.run.seed) as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        fresh = {k: v.detach().clone() for k, v in trainer.model.chunks[0].module.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        assert trainer.maybe_resume() == 0
        # stage 2 starts from stage 1's best weights, trunk and head, not from its own initialisation
        loaded = trainer.model.chunks[0].module.state_dict()
        saved = load_scorer(str(best)).chunks[0].state_dict()
        weights = [k for k in saved if isinstance(saved[k], torch.Tensor) and not k.endswith("_extra_state")]
        assert "reward_head.weight" in weights and all(torch.equal(loaded[k], saved[k]) for k in weights)
        assert not torch.equal(fresh["reward_head.weight"], loaded["reward_head.weight"])
        before = trainer.evaluate()
        result = trainer.fit()
        after = trainer.evaluate()
    assert config.rm.bt_variant == "scaled" and trainer.step.variant == "scaled"
    assert all(math.isfinite(v) for v in result.losses.values())
    # scaled BT moves the pairwise accuracy of the stage-1 model on held-out preference pairs
    assert before["accuracy"] <= 0.25 and after["accuracy"] >= 0.9, (before, after)
    assert after["rm_loss"] < before["rm_loss"] / 2, (before, after)


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


def test_scorer_matches_direct_forward_and_never_reads_a_cut_response(tmp_path: Path) -> None:
    from engine.eval.scoring import RewardScorer
    from engine.trainer import Trainer

    config = load_config(RewardTrainConfig, None, SMALL + [f"run.output_dir={tmp_path}", "run.train_steps=1"])
    with single_process_parallel() as parallel:
        trainer = Trainer(config, RewardStep(config.rm), parallel)
        step = trainer.step
        scorer = RewardScorer(trainer.model.chunks, step, trainer.tokenizer, parallel, 96, micro_batch_size=2)
        # Lengths vary (the scorer sorts rows by length and cuts each micro-batch to its longest row), one
        # response alone is longer than the 96 positions (no score), one prompt is (cut from the left), and
        # the rows leave a padded last micro-batch.
        rows = [("What is 2 + 2?", "2 + 2 = 4."), ("Q", "A."), ("Tell me a story.", "Once upon a time " * 9),
                ("What is 2 + 2?", "2 + 2 = 5."), ("Hi", "Hello there, how can I help you today?"),
                ("Tell me everything. " * 10, "No.")]
        rewards = scorer.score(rows)
        assert rewards.shape == (6, 5)
        assert torch.isnan(rewards[2]).all() and scorer._encode(*rows[2]) is None
        cut = scorer._encode(*rows[5])
        assert cut is not None
        end = int(cut["end_index"])
        assert end == 95 and int(cut["tokens"][end]) == trainer.tokenizer.eos_id  # ends with the whole response
        assert trainer.tokenizer.decode(cut["tokens"][end - 3: end].tolist()) == "No."
        for i, (prompt, response) in enumerate(rows):
            item = scorer._encode(prompt, response)
            if item is None:
                continue
            batch = {k: v.unsqueeze(0) for k, v in item.items()}
            with torch.no_grad():
                direct = step.forward(trainer.model.chunks[0], batch)[0]
            assert torch.allclose(rewards[i], direct.float(), atol=1e-5)


def test_rm_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"rm.type='ranking' is not one of"):
        load_config(RewardTrainConfig, None, ["rm.type=ranking"])
    with pytest.raises(ConfigError, match=r"rm.attributes=\['honesty'\]"):
        load_config(RewardTrainConfig, None, ["rm.attributes=[honesty]"])
    with pytest.raises(ConfigError, match=r"rm.type=bt trains on data.format in .* got 'attributes' \(the default, "
                                          r"for rated rows\); set data.format=pairs or helpsteer2_preference and "
                                          r"data.source to your pairs file, or rm.type=regression for rated rows"):
        load_config(RewardTrainConfig, None, ["rm.type=bt"])
    with pytest.raises(ConfigError, match=r"got 'pairs'; data.format=pairs trains rm.type=bt$"):
        load_config(RewardTrainConfig, None, ["data.format=pairs", "data.source=pairs.jsonl"])
    # a reward is read at the response's last token: reward data never truncate it; SFT has no prompt to cut
    assert load_config(RewardTrainConfig, None, []).data.overlong == "cut_prompt"
    with pytest.raises(ConfigError, match=r"data.overlong='truncate' is not one of 'cut_prompt', 'drop'"):
        load_config(RewardTrainConfig, None, ["data.overlong=truncate"])
    from engine.config import TrainConfig

    with pytest.raises(ConfigError, match=r"data.overlong='cut_prompt' is not one of 'truncate', 'drop'"):
        load_config(TrainConfig, None, ["data.overlong=cut_prompt"])
    assert load_config(RewardTrainConfig, None, []).rm.bt_variant == "auto"


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
    # a checkpoint saved before reward data refused data.overlong=truncate still loads for scoring
    from engine.checkpoint import dist as ckpt
    from engine.eval.scoring import load_scorer

    path = ckpt.resolve(str(tmp_path / "checkpoints"))
    meta = json.loads((path / ckpt.META).read_text())
    meta["config"]["data"]["overlong"] = "truncate"
    (path / ckpt.META).write_text(json.dumps(meta))
    with single_process_parallel():
        scorer = load_scorer(str(tmp_path / "checkpoints"))
        assert torch.equal(scorer.chunks[0].reward_head.weight, head)


def test_ratings_the_head_never_sees_are_told(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file rating "Helpfulness" (capitalised) and no verbosity trained those heads on nothing, silently;
    with rm.attributes=[helpfulness] its first step failed with Bradley-Terry advice on a regression run."""
    import logging

    from engine.algorithms import reward
    from engine.data.errors import DataError

    rows = [{"prompt": f"q{i}", "response": "a", "Helpfulness": 4, "correctness": 3} for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="engine.algorithms.reward"):
        reward.check_rated(rows, ["helpfulness", "correctness"], "mine.jsonl")
    assert "mine.jsonl: no row rates helpfulness, so the head learns nothing there; drop it from rm.attributes; " \
           "not read: Helpfulness (for helpfulness); rating fields are spelled helpfulness, correctness, " \
           "coherence, complexity, verbosity" in caplog.text, caplog.text
    caplog.clear()
    misspelt = [{"prompt": "q", "response": "a", "helpfullness": 4, "correctness": 3}]
    with caplog.at_level(logging.WARNING, logger="engine.algorithms.reward"):
        reward.check_rated(misspelt, ["helpfulness", "correctness"], "mine.jsonl")
    assert "not read: helpfullness (for helpfulness)" in caplog.text, caplog.text
    with pytest.raises(DataError, match=r"mine.jsonl: field '<ratings>': expected rows that rate at least one of "
                                        r"rm.attributes=\['helpfulness'\], got 'none' .*not read: Helpfulness"):
        reward.check_rated(rows, ["helpfulness"], "mine.jsonl")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.algorithms.reward"):
        reward.check_rated(rows, ["correctness"], "mine.jsonl")
    assert "not read: Helpfulness" in caplog.text and "no row rates" not in caplog.text
    step = RewardStep(load_config(RewardTrainConfig, None, ["rm.attributes=[helpfulness]"]).rm)
    assert step.empty_step_hint().startswith("no row of the step rates any of rm.attributes=['helpfulness']")
    bt = load_config(RewardTrainConfig, None, ["rm.type=bt", "data.format=pairs", "data.source=mine.jsonl"])
    assert "bt_variant" in RewardStep(bt.rm).empty_step_hint()
