"""Every option that takes a checkpoint reads it in the same forms (``engine.checkpoint.dist.locate``).

``keel generate`` took a run directory; ``reward_model=``, ``checkpoint.load=``, ``--rm``, ``ppo.critic`` failed
on one with "cannot read keel.json", and ``keel convert keel-to-hf`` exported a checkpoints directory's newest
step where ``keel generate`` took its best.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.checkpoint import dist as ckpt
from engine.checkpoint.dist import CheckpointError, locate


def _step(checkpoints: Path, step: int, algorithm: str = "sft") -> Path:
    path = checkpoints / f"step_{step:07d}"
    path.mkdir(parents=True)
    config = {"model": {"preset": "tiny-llama"}, "parallel": {}}
    (path / ckpt.META).write_text(json.dumps({"algorithm": algorithm, "step": step, "config": config,
                                             "checkpoint_id": f"id-{step}"}))
    (path / "metadata.json").write_text("{}")
    return path


def _run(root: Path, algorithm: str = "sft", best: bool = True, checkpoints: str = "checkpoints") -> Path:
    """A run directory with steps 1 and 2 under ``checkpoints`` (relative to ``root``), step 1 marked best."""
    run = root / "run"
    run.mkdir(parents=True)
    directory = root / checkpoints
    _step(directory, 1, algorithm), _step(directory, 2, algorithm)
    (directory / ckpt.LATEST).write_text("step_0000002")
    if best:
        (directory / ckpt.BEST).write_text("step_0000001")
    (run / "config.yaml").write_text(f"checkpoint:\n  dir: {directory}\n")
    return run


def test_every_form_names_the_best_checkpoint_else_the_latest(tmp_path: Path) -> None:
    run = _run(tmp_path / "a", checkpoints="elsewhere/ckpts")  # config.yaml's checkpoint.dir, not <run>/checkpoints
    directory = tmp_path / "a" / "elsewhere" / "ckpts"
    best, latest = directory / "step_0000001", directory / "step_0000002"
    for form in (run, directory, directory / ckpt.BEST, run / ckpt.BEST, best):
        assert locate(form) == best, form
    assert locate(directory / ckpt.LATEST) == locate(run / ckpt.LATEST) == locate(latest) == latest

    unmarked = _run(tmp_path / "b", best=False)
    assert locate(unmarked) == tmp_path / "b" / "checkpoints" / "step_0000002"
    (tmp_path / "b" / "checkpoints" / ckpt.LATEST).unlink()  # no pointers: the newest complete step
    assert locate(tmp_path / "b" / "checkpoints") == tmp_path / "b" / "checkpoints" / "step_0000002"


def test_a_pointer_to_an_incomplete_checkpoint_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A start-up reads checkpoint.dir twice (the early shape check, then the resume): the warning came twice."""
    checkpoints = tmp_path / "checkpoints"
    _step(checkpoints, 1)
    (checkpoints / "step_0000002").mkdir()  # killed mid-save, and the pointer already moved (an older writer)
    (checkpoints / ckpt.LATEST).write_text("step_0000002")
    with caplog.at_level("WARNING", logger="engine.checkpoint.dist"):
        assert ckpt.find_latest(str(checkpoints)) == ckpt.find_latest(str(checkpoints)) == checkpoints / "step_0000001"
    assert caplog.text.count("which is incomplete; scanning") == 1


def test_what_names_no_checkpoint_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    unmarked = _run(tmp_path, best=False)
    with pytest.raises(CheckpointError, match=r"^reward model .*run/best: .*checkpoints has no 'best' pointer \(a run "
                       r"marks its best checkpoint only when it evaluates\); give a run directory"):
        locate(unmarked / ckpt.BEST, "reward model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"^checkpoint.load .*empty is no complete checkpoint; give a run"):
        locate(empty, "checkpoint.load")
    with pytest.raises(CheckpointError, match=r"^ppo.critic .*missing does not exist; give a run directory"):
        locate(tmp_path / "missing", "ppo.critic")
    from engine.algorithms.ppo import PPOTrainConfig
    from engine.config import load_config

    # checked with the other checkpoints a run names, before the data and the models (it came after them)
    config = load_config(PPOTrainConfig, None, [f"ppo.critic={tmp_path / 'missing'}"])
    with pytest.raises(CheckpointError, match=r"^ppo.critic .*missing does not exist"):
        config.check_checkpoints()
    # 'reward_model', as the help names the default, is the reward model's checkpoint
    named = load_config(PPOTrainConfig, None, ["ppo.critic=reward_model", f"reward_model={tmp_path / 'rm'}"])
    assert named.ppo.critic == str(tmp_path / "rm")


def test_the_commands_read_a_run_directory(tmp_path: Path) -> None:
    from engine.config import ConfigError
    from engine.convert.hf import keel_to_hf
    from engine.eval.label import _reward_model
    from engine.eval.scoring import reward_model_config
    from engine.generate import resolve_checkpoint

    policy, rm = _run(tmp_path / "policy"), _run(tmp_path / "rm", algorithm="rm")
    best = tmp_path / "rm" / "checkpoints" / "step_0000001"
    assert resolve_checkpoint(str(policy)) == tmp_path / "policy" / "checkpoints" / "step_0000001"
    assert _reward_model(str(rm)) == str(best)
    assert reward_model_config(str(rm))[0] == best
    # an override no config has is the command line's fault, not the checkpoint's keel.json
    with pytest.raises(ConfigError, match=r"^command-line overrides: unknown config key 'data.bogus'"):
        reward_model_config(str(rm), ["data.bogus=1"])
    assert reward_model_config(str(rm), ["data.seq_length=48"])[1].data.seq_length == 48
    with pytest.raises(CheckpointError, match="step_0000001 is a reward model checkpoint"):
        keel_to_hf(rm, tmp_path / "hf")  # read as far as the checkpoint's kind: the run directory was found
    with pytest.raises(ConfigError, match=r"--rm .*nothing does not exist"):
        _reward_model(str(tmp_path / "nothing"))


def test_a_reward_model_scores_at_this_worlds_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward model trained at TP2 with sequence parallelism (or PP2 with virtual stages) failed to load for
    `keel eval rewardbench` and `keel data label` on one rank, and beside a GRPO policy ("parallel.sequence_parallel
    =true needs parallel.tensor > 1", blamed on its keel.json): the layout is where it was trained, not its weights."""
    from engine.eval.scoring import reward_model_config

    rm = _run(tmp_path / "rm", algorithm="rm")
    trained = {"tensor": 2, "pipeline": 2, "sequence_parallel": True, "virtual_pipeline": 2}
    for step in (1, 2):
        meta = tmp_path / "rm" / "checkpoints" / f"step_{step:07d}" / ckpt.META
        saved = json.loads(meta.read_text())
        meta.write_text(json.dumps({**saved, "config": {**saved["config"], "parallel": trained}}))
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    alone = reward_model_config(str(rm))[1].parallel
    assert (alone.tensor, alone.pipeline, alone.sequence_parallel, alone.virtual_pipeline) == (1, 1, False, None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    kept = reward_model_config(str(rm))[1].parallel
    assert (kept.tensor, kept.pipeline, kept.sequence_parallel, kept.virtual_pipeline) == (2, 2, False, None)
    beside = reward_model_config(str(rm), ["parallel.tensor=2", "parallel.pipeline=1"])[1].parallel  # online RL's
    assert (beside.tensor, beside.pipeline, beside.sequence_parallel, beside.virtual_pipeline) == (2, 1, False, None)


def test_a_frozen_models_checkpoint_is_pinned_to_the_step_the_run_began_with(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """dpo.reference (or checkpoint.load) given as a run directory names its best step when it is read: a DPO run
    resumed after the SFT run behind it trained on took the new step as its reference, and its losses moved."""
    from engine.algorithms.dpo import DPOTrainConfig
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.checkpoint.pinning import pin_frozen
    from engine.config import load_config

    sft = _run(tmp_path / "sft")
    checkpoints = tmp_path / "sft" / "checkpoints"
    fresh = load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}"])  # the reference defaults to it
    ids = pin_frozen(fresh)
    assert fresh.dpo.reference == str(checkpoints / "step_0000001")  # the best step, as the saved config shows
    assert ids == {"dpo.reference": "id-1"}
    saved = {"config": fresh.to_dict(), "frozen_ids": ids}  # what the run's checkpoints record

    (checkpoints / ckpt.BEST).write_text("step_0000002")  # the SFT run trained on and marked another best
    resumed = load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}"])
    with caplog.at_level("WARNING", logger="engine.checkpoint.pinning"):
        assert pin_frozen(resumed, saved) == ids
    assert resumed.dpo.reference == str(checkpoints / "step_0000001")
    assert f"dpo.reference={sft} now names {checkpoints / 'step_0000002'}; this run began with " \
           f"{checkpoints / 'step_0000001'} and keeps it" in caplog.text

    # the SFT run restarted with checkpoint.resume=none saves its own step_0000001 at the same path
    meta = json.loads((checkpoints / "step_0000001" / ckpt.META).read_text())
    (checkpoints / "step_0000001" / ckpt.META).write_text(json.dumps(dict(meta, checkpoint_id="id-1-again")))
    with pytest.raises(CheckpointError, match=r"^dpo.reference: .*step_0000001 was written again since this run "
                       r"began \(a run restarted over it"):
        pin_frozen(load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}"]), saved)
    import shutil

    shutil.rmtree(checkpoints / "step_0000001")  # rotated out by keep_last, say
    with pytest.raises(CheckpointError, match=r"^dpo.reference: this run began with .*step_0000001, which is gone"):
        pin_frozen(load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}"]), saved)
    before = {"config": dict(saved["config"], dpo=dict(saved["config"]["dpo"], reference=str(sft)))}  # not pinned yet
    old = load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}"])
    pin_frozen(old, before)
    assert old.dpo.reference == str(checkpoints / "step_0000002")

    # an online run's KL reference 'init' is the policy's start: checkpoint.load is pinned then, and the reward model
    online = load_config(GRPOTrainConfig, None, [f"checkpoint.load={sft}", "reference=init", f"reward_model={sft}"])
    pin_frozen(online)
    assert (online.reference, online.checkpoint.load, online.reward_model) == (
        "init", str(checkpoints / "step_0000002"), str(checkpoints / "step_0000002"))
    # a reference no model is built from (grpo.kl=none; iterative DPO's is each round's policy) is left as given:
    # pinned, a resume would be refused for a checkpoint it never reads
    unread = load_config(GRPOTrainConfig, None, [f"checkpoint.load={sft}", "grpo.kl=none", f"reward_model={sft}"])
    assert pin_frozen(unread, unread=("reference",)) == {"reward_model": "id-2"} and unread.reference == str(sft)
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig

    iterative = load_config(IterativeDPOTrainConfig, None, [f"checkpoint.load={sft}", f"reward_model={sft}"])
    assert list(pin_frozen(iterative)) == ["reward_model"]


def test_reference_logprobs_of_another_model_than_the_policys_start_are_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file of reference log-probs from one checkpoint, with a policy started from another, trained without a word
    (its first step at accuracy 0.625, not 0.5)."""
    from engine.algorithms.dpo import DPOTrainConfig
    from engine.config import load_config

    sft = _run(tmp_path / "sft")
    checkpoints = tmp_path / "sft" / "checkpoints"
    refs = tmp_path / "ref.jsonl"
    line = {"split": "train", "index": 0, "chosen": -1.0, "rejected": -2.0, "fingerprint": 1}
    refs.write_text(json.dumps(dict(line, reference=str(checkpoints / "step_0000001"))) + "\n")
    config = load_config(DPOTrainConfig, None, [f"checkpoint.load={sft}", f"dpo.reference_logprobs={refs}"])
    with caplog.at_level("WARNING", logger="engine.algorithms.dpo"):
        config.check_fresh_start()  # the policy starts from the best step, which the file was made from
        assert not caplog.records
        (checkpoints / ckpt.BEST).write_text("step_0000002")
        config.check_fresh_start()
    assert f"dpo.reference_logprobs={refs} holds the log-probs of {checkpoints / 'step_0000001'}, and the policy " \
           f"starts from {checkpoints / 'step_0000002'}" in caplog.text
