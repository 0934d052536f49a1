"""DPO from an SFT checkpoint (the reference defaults to checkpoint.load): a run SIGKILLed
mid-run and started again with the same command reproduces the uninterrupted losses bitwise."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import keel_train, train_losses

COMMON = ["data.seq_length=160", "data.micro_batch_size=2", "data.global_batch_size=8", "logging.progress=false",
          "logging.tensorboard=false", "checkpoint.keep_last=0", "optimizer.lr=0.003"]


def test_dpo_killed_then_resumed_reproduces_losses_bitwise(tmp_path: Path) -> None:
    sft = tmp_path / "sft"
    keel_train(1, COMMON + ["run.train_steps=3", "data.num_samples=64", f"run.output_dir={sft}"])
    args = COMMON + ["run.train_steps=6", "checkpoint.save_interval=2", "data.num_samples=160",
                     f"checkpoint.load={sft / 'checkpoints' / 'step_0000003'}"]
    reference = tmp_path / "reference"
    keel_train(2, args + [f"run.output_dir={reference}"], algo="dpo")
    run = tmp_path / "run"
    killed = keel_train(2, args + [f"run.output_dir={run}"], env={"KEEL_FAULT": "after:3:KILL"}, check=False,
                        algo="dpo")
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    keel_train(2, args + [f"run.output_dir={run}"], algo="dpo")
    expected = train_losses(reference, "dpo_loss")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert train_losses(run, "dpo_loss") == expected  # bitwise, every step
    assert expected[1] != expected[6]
