"""A run from ``checkpoint.load`` takes the checkpoint's model and tokenizer unless the user sets them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.algorithms.dpo import DPOTrainConfig
from engine.config import TrainConfig, load_config


def _fake_checkpoint(root: Path, step: int = 5, **sections: dict[str, Any]) -> Path:
    """A directory that passes as a complete checkpoint, its keel.json holding a saved config."""
    saved = dataclasses.asdict(TrainConfig())
    for name, values in sections.items():
        saved[name] = dict(saved[name], **values)
    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "keel.json").write_text(json.dumps({"step": step, "config": saved}))
    (path / "metadata.json").write_text("{}")
    (root / "latest").write_text(path.name)
    return path


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    return _fake_checkpoint(tmp_path / "smol", model={"preset": "smollm2-135m", "num_layers": 2},
                            data={"tokenizer": "/models/smol.gguf", "chat_template": "chatml"})


def test_unset_model_and_tokenizer_come_from_the_checkpoint(converted: Path) -> None:
    config = load_config(TrainConfig, None, [f"checkpoint.load={converted}", "data.source=my.jsonl"])
    assert (config.model.preset, config.model.num_layers) == ("smollm2-135m", 2)
    assert (config.data.tokenizer, config.data.chat_template) == ("/models/smol.gguf", "chatml")
    assert config.inherited == {"model.preset": "smollm2-135m", "model.num_layers": 2,
                                "data.tokenizer": "/models/smol.gguf", "data.chat_template": "chatml"}
    assert config.data.source == "my.jsonl"  # nothing else is taken
    # a run's checkpoint directory (its `latest` pointer) and a YAML file work alike
    assert load_config(TrainConfig, None, [f"checkpoint.load={converted.parent}"]).model.preset == "smollm2-135m"


def test_rope_and_norm_settings_are_taken_one_by_one_also_under_a_named_preset(tmp_path: Path) -> None:
    """model.preset=llama3-70b with checkpoint.load=<a converted Llama-3.1-70B> kept the shape (it matches) and
    built the model without the checkpoint's RoPE scaling: only a warning said so."""
    scaled = _fake_checkpoint(tmp_path / "l31", model={"preset": "tiny-llama", "rope_scaling_factor": 8.0,
                                                        "rotary_base": 500000.0, "layernorm_epsilon": 1e-6})
    config = load_config(TrainConfig, None, [f"checkpoint.load={scaled}", "model.preset=tiny-llama"])
    assert (config.model.rope_scaling_factor, config.model.rotary_base, config.model.layernorm_epsilon) == \
        (8.0, 500000.0, 1e-6)
    assert {k: v for k, v in config.inherited.items() if k.startswith("model.")} == {
        "model.rotary_base": 500000.0, "model.layernorm_epsilon": 1e-6, "model.rope_scaling_factor": 8.0}
    extended = load_config(TrainConfig, None, [f"checkpoint.load={scaled}", "model.rotary_base=1000000"])
    assert (extended.model.rotary_base, extended.model.rope_scaling_factor) == (1000000, 8.0)  # set: the user's


def test_what_the_user_sets_wins(converted: Path, tmp_path: Path) -> None:
    config = load_config(TrainConfig, None, [f"checkpoint.load={converted}", "data.tokenizer=byte",
                                                "model.preset=tiny-llama"])
    assert (config.model.preset, config.model.num_layers, config.data.tokenizer) == ("tiny-llama", None, "byte")
    assert config.data.chat_template == "chatml" and config.inherited == {"data.chat_template": "chatml"}
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"checkpoint:\n  load: {converted}\nmodel:\n  num_layers: 3\ndata:\n  chat_template: plain\n")
    config = load_config(DPOTrainConfig, str(yaml_file), [])
    assert (config.model.preset, config.model.num_layers) == ("tiny-llama", 3)  # a shape field set: the user's model
    assert (config.data.tokenizer, config.data.chat_template) == ("/models/smol.gguf", "plain")


def test_nothing_is_taken_without_a_complete_checkpoint(tmp_path: Path) -> None:
    for load in (tmp_path / "missing", tmp_path):
        config = load_config(TrainConfig, None, [f"checkpoint.load={load}"])
        assert config.model.preset == "tiny-llama" and config.data.tokenizer == "byte" and not config.inherited
    assert not load_config(TrainConfig, None, []).inherited


@pytest.mark.parametrize("algorithm", ["dpo", "iterative-dpo", "rm", "critic"])
def test_generate_reads_every_policy_checkpoint_and_refuses_scorers(tmp_path: Path, algorithm: str) -> None:
    """keel generate rebuilt a DPO run's config as a plain TrainConfig, whose data.overlong refuses DPO's
    cut_prompt: no DPO policy could generate. Reward models and critics score; they are refused by name."""
    from engine.config import ConfigError
    from engine.generate import saved_config

    saved = dataclasses.asdict(load_config(DPOTrainConfig, None, ["dpo.reference=init"]))
    path = tmp_path / "step_0000003"
    path.mkdir()
    (path / "keel.json").write_text(json.dumps({"step": 3, "config": saved, "algorithm": algorithm}))
    (path / "metadata.json").write_text("{}")
    if algorithm in ("rm", "critic"):
        with pytest.raises(ConfigError, match=r"is a (reward model|PPO critic) checkpoint: it scores responses.*cannot be generated from"):
            saved_config(str(path), 2)
        return
    config, resolved = saved_config(str(path), 2)
    assert resolved == str(path) and config.parallel.tensor == 2 and config.data.seq_length == saved["data"]["seq_length"]


def test_an_error_in_a_taken_value_says_where_it_came_from(tmp_path: Path) -> None:
    from engine.algorithms.steerlm2 import SteerLM2TrainConfig
    from engine.config import ConfigError

    plain = _fake_checkpoint(tmp_path / "sft", data={"chat_template": "auto"})  # not a SteerLM policy
    with pytest.raises(ConfigError, match=r"the config of checkpoint.load \(.*data.chat_template\).*'nemotron'"):
        load_config(SteerLM2TrainConfig, None, [f"checkpoint.load={plain}", "reward_model=runs/rm"])


def test_steerlm2_from_a_policy_of_another_template_is_warned_about(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Set to nemotron by hand, a plain SFT policy was taken as SteerLM's proposal without a word."""
    import logging

    from engine.algorithms.steerlm2 import SteerLM2TrainConfig, warn_if_not_steerlm

    plain = _fake_checkpoint(tmp_path / "sft", data={"chat_template": "auto"})
    config = load_config(SteerLM2TrainConfig, None, [f"checkpoint.load={plain}", "data.chat_template=nemotron"])
    with caplog.at_level(logging.WARNING):
        warn_if_not_steerlm(config.checkpoint.load)
    assert f"checkpoint.load={plain} was trained with data.chat_template=auto, not nemotron" in caplog.text
    caplog.clear()
    steerlm = _fake_checkpoint(tmp_path / "steerlm", data={"chat_template": "nemotron"})
    with caplog.at_level(logging.WARNING):
        warn_if_not_steerlm(str(steerlm))
        warn_if_not_steerlm(None)
    assert not caplog.records


@pytest.mark.parametrize("algorithm", ["rm", "critic"])
def test_a_policy_does_not_start_from_a_scorer(tmp_path: Path, algorithm: str) -> None:
    """``keel train dpo checkpoint.load=<reward model>`` trained a policy whose LM head was left random (the
    RM has a value head instead), with one warning among the logs. A policy's weights now refuse a scorer;
    a reward model or critic (the combined recipe, PPO's critic) still loads one."""
    import types

    from engine.checkpoint import dist as ckpt

    path = tmp_path / "step_0000003"
    path.mkdir()
    (path / "keel.json").write_text(json.dumps({"step": 3, "algorithm": algorithm, "model_signature": {}}))
    (path / "metadata.json").write_text("{}")
    policy = [types.SimpleNamespace()]
    with pytest.raises(ckpt.CheckpointError, match=r"step_0000003 is a .* checkpoint: .*no language-model head"):
        ckpt.load_weights(path, policy, None, {})
    scorer = [types.SimpleNamespace(num_outputs=1)]
    with pytest.raises(Exception) as caught:  # past the check: megatron reads the (empty) fake checkpoint
        ckpt.load_weights(path, scorer, None, {})
    assert "language-model head" not in str(caught.value)


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path: Path) -> None:
    """data.tokenizer set to another tokenizer than the checkpoint's (an SFT checkpoint on the byte
    tokenizer, a recipe that names builtin-sp) would train on ids that mean other tokens: refused. The
    same file under another path passes; so does a checkpoint whose tokenizer file is not on this machine."""
    from engine.config import ConfigError

    on_bytes = _fake_checkpoint(tmp_path / "bytes", data={"tokenizer": "byte"})
    with pytest.raises(ConfigError, match=r"data.tokenizer=builtin-sp is not the tokenizer checkpoint.load=.* \(byte\)"):
        load_config(TrainConfig, None, [f"checkpoint.load={on_bytes}", "data.tokenizer=builtin-sp"])
    assert load_config(TrainConfig, None, [f"checkpoint.load={on_bytes}", "data.tokenizer=byte"]).data.tokenizer == "byte"
    original, copy, other = (tmp_path / name for name in ("a.json", "copy/tokenizer.json", "b.json"))
    copy.parent.mkdir()
    original.write_text('{"model": {"vocab": {"a": 0}}}')
    copy.write_text(original.read_text())
    other.write_text('{"model": {"vocab": {"b": 0}}}')
    on_file = _fake_checkpoint(tmp_path / "file", data={"tokenizer": str(original)})
    assert load_config(TrainConfig, None, [f"checkpoint.load={on_file}", f"data.tokenizer={copy.parent}"]).data.tokenizer
    with pytest.raises(ConfigError, match="its token ids would mean other tokens"):
        load_config(TrainConfig, None, [f"checkpoint.load={on_file}", f"data.tokenizer={other}"])


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "ppo"])
def test_a_reward_model_is_not_read_from_a_policy(tmp_path: Path, algorithm: str) -> None:
    """``reward_model=<an SFT checkpoint>`` (online RL, keel eval) failed on the policy's saved config as a
    reward model's: 'rm.type=regression trains on data.format in ('attributes',), got 'chat''."""
    from engine.config import ConfigError
    from engine.eval.scoring import load_scorer

    path = _fake_checkpoint(tmp_path / "run")
    meta = json.loads((path / "keel.json").read_text())
    (path / "keel.json").write_text(json.dumps(dict(meta, algorithm=algorithm)))
    with pytest.raises(ConfigError, match=f"a {algorithm} checkpoint, not a reward model"):
        load_scorer(str(tmp_path / "run"))
    from engine.algorithms.grpo import GRPOTrainConfig

    config = load_config(GRPOTrainConfig, None, [f"reward_model={tmp_path / 'run'}"])
    # the trainer's check before the data and models are built, naming the option (of several checkpoints)
    with pytest.raises(ConfigError, match=f"^reward_model={tmp_path / 'run'}: a {algorithm} checkpoint, not a reward"):
        config.check_checkpoints()


@pytest.mark.parametrize(("algorithm", "rm", "head", "outputs"), [
    ("sft", {}, "a new one-output value head (a sft checkpoint: its trunk)", 1),
    ("rm", {"type": "regression"}, "the reward model's regression head", 5),
    ("rm", {"type": "bt"}, "the reward model's bt head", 1),
    ("critic", {"type": "bt"}, "the PPO critic's bt head", 1),  # a critic's config is a PPO run's: its own record
])
def test_ppo_takes_a_critic_head_by_the_kind_of_its_checkpoint(tmp_path: Path, algorithm: str, rm: dict[str, Any],
                                                              head: str, outputs: int) -> None:
    """ppo.critic=<an SFT checkpoint> built the reward model's default head, a 5-attribute regression weighed by
    the goodness weights, untrained, and said "regression head, 5 outputs"; so did a critic's checkpoint, whose
    saved config (its PPO run's) has no rm section."""
    from engine.algorithms.ppo import PPOTrainConfig, critic_source

    path = _fake_checkpoint(tmp_path / "run")
    meta = json.loads((path / "keel.json").read_text())
    if algorithm == "critic":
        meta["rm"] = rm  # what a critic's save records
    else:
        meta["config"]["rm"] = rm
    (path / "keel.json").write_text(json.dumps(dict(meta, algorithm=algorithm)))
    config = load_config(PPOTrainConfig, None, [f"ppo.critic={tmp_path / 'run'}"])
    rm_config, source, described = critic_source(config)
    assert (source, described) == (str(path), head)
    assert (1 if rm_config.rm.type == "bt" else len(rm_config.rm.attributes)) == outputs
    other = load_config(PPOTrainConfig, None, ["ppo.critic=init"])  # a resumed run rebuilds the head it trained
    assert critic_source(other, path)[:2] == (rm_config, str(path))


def test_a_critic_saved_without_its_heads_settings_is_read_from_its_weights(tmp_path: Path) -> None:
    """Critics saved before their head was recorded: its shape says which (a resumed run whose critic came from a
    policy checkpoint kept the 5-output head it was built with then)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engine.algorithms.ppo import PPOTrainConfig, critic_source
    from engine.cli import main

    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=176, vocab_size=512,
                                               num_labels=1)).save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-keel", str(tmp_path / "hf"), str(tmp_path / "critic")]) == 0
    step = tmp_path / "critic" / "step_0000000"
    meta = json.loads((step / "keel.json").read_text())
    (step / "keel.json").write_text(json.dumps(dict(meta, algorithm="critic", config=dict(meta["config"], rm=None))))
    rm_config, _, head = critic_source(load_config(PPOTrainConfig, None, [f"ppo.critic={step}"]))
    assert (rm_config.rm.type, head) == ("bt", "the PPO critic's bt head")


def test_a_run_from_a_checkpoint_takes_a_fine_tuning_learning_rate(tmp_path: Path, converted: Path) -> None:
    """The from-scratch default of 3e-3 took a converted SmolLM2's SFT loss from 1.0 to 5.3 in three steps, and
    was every policy algorithm's default: fine-tuning takes each algorithm's own rate, unless the user sets one
    (in the YAML or on the command line); from scratch, and in the iterative recipes, nothing changes."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.algorithms.reward import RewardTrainConfig
    from engine.algorithms.sft import SFTTrainConfig
    from engine.checkpoint.inherit import describe_inherited

    load = f"checkpoint.load={converted}"
    rates = {cls: load_config(cls, None, [load]).optimizer.lr
             for cls in (SFTTrainConfig, RewardTrainConfig, DPOTrainConfig, GRPOTrainConfig, IterativeDPOTrainConfig)}
    assert list(rates.values()) == [2e-5, 1e-5, 1e-6, 1e-6, 9e-8]
    sft = load_config(SFTTrainConfig, None, [load])
    assert sft.inherited["optimizer.lr"] == 2e-5
    assert describe_inherited(str(converted), sft.inherited).endswith(
        "optimizer.lr=2e-05, the default for fine-tuning a checkpoint (not 0.003, which trains from scratch; set "
        "optimizer.lr to choose)")
    missing = load_config(SFTTrainConfig, None, [f"checkpoint.load={tmp_path / 'nothing'}"])  # refused later, by name
    assert missing.optimizer.lr == 2e-5 and describe_inherited("x", missing.inherited).startswith("optimizer.lr=2e-05")
    assert load_config(SFTTrainConfig, None, [load, "optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"checkpoint:\n  load: {converted}\noptimizer:\n  lr: 5.0e-4\n")
    assert load_config(SFTTrainConfig, str(yaml_file)).optimizer.lr == 5e-4
    assert load_config(SFTTrainConfig).optimizer.lr == load_config(GRPOTrainConfig).optimizer.lr == 3e-3
