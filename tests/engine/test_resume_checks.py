"""What a resumed run must share with its checkpoint (engine.checkpoint.resume), and the checkpoints a run
names besides its own that must be of the right kind: each refused in one line before a tensor is read."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine.algorithms.reward import RewardStep, RewardTrainConfig
from engine.algorithms.sft import SFTStep
from engine.checkpoint.dist import CheckpointError
from engine.config import TrainConfig, load_config
from tests.helpers import single_process_parallel

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
SFT = [*QUIET, "data.num_samples=64", "data.seq_length=128", "data.micro_batch_size=2", "data.global_batch_size=4",
       "checkpoint.save_interval=2"]
RM = [*QUIET, "data.num_samples=32", "data.seq_length=256", "data.micro_batch_size=2", "data.global_batch_size=4",
      "checkpoint.save_interval=2"]


def _fit(run: Path, *overrides: str, rm: bool = False) -> Any:
    """Train (or resume) in ``run`` in this process; returns the trainer."""
    from engine.trainer import Trainer

    cls, base, step = (RewardTrainConfig, RM, RewardStep) if rm else (TrainConfig, SFT, SFTStep)
    config = load_config(cls, None, [*base, f"run.output_dir={run}", *overrides])
    with single_process_parallel() as parallel:
        trainer = Trainer(config, step(config.rm) if rm else step(), parallel)  # type: ignore[attr-defined]
        trainer.fit()
    return trainer


def _refused(run: Path, *overrides: str, rm: bool = False) -> str:
    with pytest.raises(CheckpointError) as refused:
        _fit(run, *overrides, rm=rm)
    return str(refused.value)


def test_a_run_resumes_only_its_own_algorithms_checkpoints_of_its_shape(tmp_path: Path) -> None:
    """An SFT checkpoint resumed by a reward-model run, a reward model's by SFT, and a reward model of 5
    attributes by one of 1: each was taken up (or failed in megatron with a CheckpointingException); now each
    is one line naming both sides, and the way on only where there is one (a reward model starts from any
    trunk, a policy never from a reward model)."""
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    _fit(sft, "run.train_steps=2")
    _fit(rm, "run.train_steps=2", rm=True)
    sft_step, rm_step = sft / "checkpoints" / "step_0000002", rm / "checkpoints" / "step_0000002"

    message = _refused(tmp_path / "rm-on-sft", "run.train_steps=4", f"checkpoint.resume={sft_step}", rm=True)
    assert f"{sft_step} is a `keel train sft` run's checkpoint, and this is `keel train rm`" in message, message
    assert f"checkpoint.load={sft_step} checkpoint.resume=none" in message

    message = _refused(tmp_path / "sft-on-rm", "run.train_steps=4", f"checkpoint.resume={rm_step}")
    assert "is a `keel train rm` run's checkpoint, and this is `keel train sft`" in message, message
    assert "has no language-model head" in message and "checkpoint.load" not in message

    # a fresh start from a reward model's weights: refused before the earlier checkpoints are set aside
    message = _refused(sft, "run.train_steps=4", f"checkpoint.load={rm_step}", "checkpoint.resume=none")
    assert "is a reward model checkpoint" in message and sorted(p.name for p in sft.iterdir()
                                                                  if p.name.startswith("checkpoints")) == ["checkpoints"]

    message = _refused(rm, "run.train_steps=4", "rm.attributes=[helpfulness]", rm=True)
    assert f"{rm_step} holds reward_head.weight with shape [5, 64], and this model's is [1, 64]" in message, message
    assert "rm.attributes" in message


def test_a_resume_at_another_precision_or_tokenizer_is_refused(tmp_path: Path) -> None:
    """bf16 keeps fp32 master weights in the optimizer: an fp32 run's state resumed at bf16 was a KeyError
    traceback. Another tokenizer's ids mean other tokens. Both are refused naming the checkpoint's setting."""
    run = tmp_path / "sft"
    _fit(run, "run.train_steps=2")
    step = run / "checkpoints" / "step_0000002"
    message = _refused(run, "run.train_steps=4", "precision.dtype=bf16")
    assert f"{step} holds the optimizer state of a precision.dtype=fp32 run, and this one is precision.dtype=bf16: " \
           "resume with precision.dtype=fp32" in message, message
    message = _refused(run, "run.train_steps=4", "data.tokenizer=builtin-sp")
    assert "data.tokenizer=builtin-sp is not the tokenizer checkpoint.resume=" in message and \
        message.endswith("Set data.tokenizer=byte"), message


def test_what_a_resume_changes_is_said_and_another_runs_best_is_not_carried(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Resumed from another run's checkpoint, the summary named that run's best validation at a 'best' pointer
    of this run that did not exist; another data.source of the same size or data.loss_on, and a checkpoint
    without optimizer state (Adam restarting), resumed without a word."""
    first = tmp_path / "first"
    _fit(first, "run.train_steps=2", "run.eval_interval=2", "checkpoint.save_optimizer=false")
    step = first / "checkpoints" / "step_0000002"
    assert json.loads((step / "keel.json").read_text())["best_validation"][0] == 2
    with caplog.at_level(logging.INFO, logger="engine"):
        trainer = _fit(tmp_path / "second", "run.train_steps=3", f"checkpoint.resume={step}", "data.loss_on=all")
    assert trainer.resumed_from == step and trainer.best_validation is None
    assert "data.loss_on: assistant -> all" in caplog.text, caplog.text
    assert "holds no optimizer state (it was saved with checkpoint.save_optimizer=false)" in caplog.text
    assert "its best validation (step 2) is not carried over" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine"):
        again = _fit(first, "run.train_steps=3", "run.eval_interval=2")  # its own checkpoint: its best stands
    assert again.best_validation is not None and again.best_validation[0] == 2
    assert "not carried over" not in caplog.text


def test_the_checkpoints_a_run_names_are_of_their_kind_and_ppo_takes_a_bt_critic(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A BT reward model as PPO's critic failed after the models were built ("rm.type=bt trains on
    data.format ..."); a PPO run resumed from another run's checkpoint looked for the critic in its own
    directory. Now the critic is the BT model's, and it resumes from beside the policy it was saved with.
    SteerLM 2.0 on a BT model failed with a traceback once sampling had begun, and a reward model as DPO's or
    online RL's reference was refused without naming the setting: both are now one line before any model."""
    from engine.cli import main
    from tests.helpers import REPO, train_losses

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.",
                                         "rejected": f"It is {2 * i + 1}, maybe."}) + "\n" for i in range(24)))
    assert main(["train", "rm", *QUIET, "rm.type=bt", f"data.source={pairs}", "data.format=pairs",
                 "data.tokenizer=builtin-sp", "run.train_steps=1", f"run.output_dir={tmp_path / 'bt'}"]) == 0
    ppo = ["--config", str(REPO / "examples" / "ppo_tiny.yaml"), *QUIET, "ppo.critic=null",
           f"reward_model={tmp_path / 'bt'}", "rollout.prompts_per_iteration=8", "data.global_batch_size=16",
           "rollout.eval_num_prompts=4", "run.eval_interval=0"]
    assert main(["train", "ppo", *ppo, "run.train_steps=1", f"run.output_dir={tmp_path / 'ppo'}"]) == 0
    first = tmp_path / "ppo" / "checkpoints" / "step_0000001"
    assert (first.parent / "critic" / "step_0000001" / "keel.json").is_file()
    assert main(["train", "ppo", *ppo, "run.train_steps=2", f"checkpoint.resume={first}",
                 f"run.output_dir={tmp_path / 'resumed'}"]) == 0
    assert sorted(train_losses(tmp_path / "resumed", "value_loss")) == [2]
    capsys.readouterr()
    assert main(["train", "steerlm2", "--config", str(REPO / "examples" / "steerlm2_tiny.yaml"), *QUIET,
                 f"reward_model={tmp_path / 'bt'}", f"run.output_dir={tmp_path / 'steer'}"]) == 1
    assert f"reward_model={tmp_path / 'bt'} is a Bradley-Terry reward model (rm.type=bt): steerlm2 reads the " \
           "attributes" in capsys.readouterr().err
    for algorithm, setting in (("dpo", "dpo.reference"), ("grpo", "reference")):
        assert main(["train", algorithm, "--config", str(REPO / "examples" / f"{algorithm}_tiny.yaml"), *QUIET,
                     f"{setting}={tmp_path / 'bt'}", f"run.output_dir={tmp_path / algorithm}"]) == 1
        err = capsys.readouterr().err
        assert f"{setting}={tmp_path / 'bt'}: " in err and "is a reward model checkpoint: it scores responses" in err \
            and f"cannot be {setting}, which names a policy" in err, err
        assert not (tmp_path / algorithm / "config.yaml").exists()  # nothing built, nothing written


def test_one_file_under_two_names_is_no_change_of_data() -> None:
    """Resuming with data.source=/abs/sft.jsonl after sft.jsonl warned that the data source had changed."""
    import os
    from types import SimpleNamespace

    from engine.checkpoint.resume import changed_data_settings

    here = os.path.relpath(__file__)
    meta = {"config": {"data": {"source": here, "loss_on": "assistant"}}}
    same = SimpleNamespace(data=SimpleNamespace(source=os.path.abspath(here), loss_on="assistant"))
    assert changed_data_settings(meta, same) == []
    other = SimpleNamespace(data=SimpleNamespace(source="builtin:sft", loss_on="all"))
    assert changed_data_settings(meta, other) == [f"data.source: {here} -> builtin:sft", "data.loss_on: assistant -> all"]


def test_a_constant_schedule_resumed_with_more_steps_is_no_schedule_change() -> None:
    """A resume with more run.train_steps and scheduler.type=constant warned 'decay steps ...: 4 -> 7', which a
    constant LR never reads; a cosine's decay steps and a changed LR are still said."""
    from types import SimpleNamespace

    from engine.runner import schedule_changes

    saved = {"max_lr": 1e-3, "min_lr": 0.0, "lr_warmup_steps": 0, "lr_decay_steps": 4, "lr_decay_style": "constant",
             "start_wd": 0.0}
    now = SimpleNamespace(**dict(saved, lr_decay_steps=7, min_lr=1e-5))
    assert schedule_changes(now, saved) == []
    cosine = dict(saved, lr_decay_style="cosine")
    assert schedule_changes(SimpleNamespace(**dict(cosine, lr_decay_steps=7, max_lr=2e-3)), cosine) == [
        "optimizer.lr: 0.001 -> 0.002", "decay steps (scheduler.decay_steps or run.train_steps + 1): 4 -> 7"]
