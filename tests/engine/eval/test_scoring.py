"""``--weights`` a reward model cannot use are refused before it is built (they tied every pair at 0%)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.algorithms.reward import RewardConfig
from engine.cli import main
from engine.config import ConfigError
from engine.eval.scoring import check_weights
from tests.helpers import keel_train

ALL = "helpfulness, correctness, coherence, complexity, verbosity"


def test_weights_the_model_cannot_use_are_refused() -> None:
    full, helpful = RewardConfig(), RewardConfig(attributes=["helpfulness"])
    check_weights(None, full, "ckpt")
    check_weights({"helpfulness": 1.0, "correctness": 0.5}, full, "ckpt")
    check_weights({"helpfulness": 1.0}, helpful, "ckpt")
    with pytest.raises(ConfigError, match=rf"^--weights has unknown attributes \['foo'\]; this model \(ckpt\) "
                                          rf"predicts {ALL}$"):
        check_weights({"foo": 1.0}, full, "ckpt")
    with pytest.raises(ConfigError, match=r"^--weights names correctness, which ckpt does not predict; it predicts "
                                          r"helpfulness \(its rm.attributes\)$"):
        check_weights({"helpfulness": 1.0, "correctness": 1.0}, helpful, "ckpt")
    with pytest.raises(ConfigError, match="every attribute weight 0, so every pair ties"):
        check_weights({"helpfulness": 0.0}, helpful, "ckpt")
    with pytest.raises(ConfigError, match="^--weights: ckpt is a Bradley-Terry reward model, which gives one score"):
        check_weights({"helpfulness": 1.0}, RewardConfig(type="bt"), "ckpt")


def test_rewardbench_refuses_weights_the_model_does_not_predict(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A regression RM predicting helpfulness only, given --weights correctness=1: accuracy 0.0% (all tied)."""
    keel_train(1, ["model.preset=tiny-llama", "rm.type=regression", "rm.attributes=[helpfulness]",
                   "run.train_steps=1", "data.num_samples=16", "data.seq_length=64", "data.micro_batch_size=2",
                   "data.global_batch_size=2", "logging.progress=false", "logging.tensorboard=false",
                   "checkpoint.resume=none", f"run.output_dir={tmp_path / 'rm'}"], algo="rm")
    data = tmp_path / "rb.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "chosen": "2", "rejected": "3", "subset": "math-prm"}) + "\n")
    checkpoint = str(tmp_path / "rm" / "checkpoints")
    for weights, message in (("correctness=1", "--weights names correctness, which"),
                             ("foo=1", "--weights has unknown attributes ['foo']")):
        assert main(["eval", "rewardbench", "--checkpoint", checkpoint, "--data", str(data), "--weights",
                     weights]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"keel: configuration error: {message}") and "predicts helpfulness" in err, err
        assert err.count("\n") == 1
