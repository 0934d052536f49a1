"""Config loading, overrides, validation messages, and the field listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, TrainConfig, describe, iter_fields, load_config, save_config


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  train_steps: 7\nparallel:\n  tensor: 2\n")
    config = load_config(TrainConfig, str(path), ["parallel.tensor=1", "optimizer.lr=1e-4", "parallel.data=2"])
    assert config.run.train_steps == 7
    assert config.parallel.tensor == 1  # command line wins
    assert config.optimizer.lr == pytest.approx(1e-4)
    assert config.parallel.data == 2
    assert config.checkpoint.dir == "runs/sft-demo/checkpoints"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, str(path))
    assert "optimizer.learning_rate" in str(err.value) and str(path) in str(err.value)


def test_unknown_section_and_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optimiser'"):
        load_config(TrainConfig, str(path))
    path.write_text("run:\n  train_steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: run.train_steps: expected an integer, got 'many'"):
        load_config(TrainConfig, str(path))


def test_corrupt_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML"):
        load_config(TrainConfig, str(path))
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing.yaml"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))


def test_bad_override_values() -> None:
    with pytest.raises(ConfigError, match=r"command-line overrides: unknown config key 'parallel.tensors'"):
        load_config(TrainConfig, None, ["parallel.tensors=2"])
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        load_config(TrainConfig, None, ["parallel.tensor"])
    with pytest.raises(ConfigError, match=r"scheduler.type='linear' is not one of"):
        load_config(TrainConfig, None, ["scheduler.type=linear"])
    with pytest.raises(ConfigError, match=r"sequence_parallel=true needs parallel.tensor > 1"):
        load_config(TrainConfig, None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"precision.fp8 needs precision.dtype=bf16"):
        load_config(TrainConfig, None, ["precision.fp8=hybrid"])


def test_describe_lists_every_field_with_doc() -> None:
    text = describe(TrainConfig)
    names = [name for name, *_ in iter_fields(TrainConfig)]
    assert len(names) > 40
    for name, _, _, doc in iter_fields(TrainConfig):
        assert name in text
        assert doc, f"{name} has no documentation"
    for section in ("run", "model", "parallel", "optimizer", "scheduler", "data", "checkpoint", "logging", "precision"):
        assert f"[{section}]" in text


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(TrainConfig, None, ["run.seed=7", "parallel.tensor=2"])
    save_config(config, str(tmp_path / "config.yaml"))
    again = load_config(TrainConfig, str(tmp_path / "config.yaml"))
    assert again == config


def test_describe_lists_the_defaults_an_owner_sets_for_its_sections() -> None:
    from engine.algorithms.iterative_dpo import CONFIG as IterativeDPO
    from engine.algorithms.steerlm2 import CONFIG as SteerLM2

    def default(cls: type, name: str) -> str:
        text = describe(cls)
        return text.split(f"  {name} (")[1].split(")")[0]

    assert default(SteerLM2, "iterative.iterations") == "int, default 2"  # the recipe's 2, not the section's 3
    assert default(IterativeDPO, "iterative.iterations") == "int, default 3"


def test_min_lr_above_lr_names_both_keys() -> None:
    """megatron's scheduler asserted ``max_lr >= min_lr`` in a traceback after the model was built."""
    with pytest.raises(ConfigError, match=r"optimizer.min_lr=0.1 exceeds optimizer.lr=0.01; lower optimizer.min_lr"):
        load_config(TrainConfig, None, ["optimizer.min_lr=0.1", "optimizer.lr=0.01"])
    assert load_config(TrainConfig, None, ["optimizer.min_lr=0.01", "optimizer.lr=0.01"]).optimizer.min_lr == 0.01


def test_sft_refuses_formats_it_cannot_train_on() -> None:
    """``data.format=pairs`` passed the config and failed in a traceback when the SFT rows were rendered."""
    from engine.algorithms.sft import CONFIG as SFT

    with pytest.raises(ConfigError, match=r"command-line overrides: keel train sft trains on data.format 'chat' or "
                                          r"'text', got 'pairs'"):
        load_config(SFT, None, ["data.format=pairs"])
    assert load_config(SFT, None, ["data.format=text"]).data_formats() == ("chat", "text")


@pytest.mark.parametrize("algorithm, setting", [("grpo", "rollout.temperature=0"), ("reinforce", "rollout.top_k=1"),
                                                ("iterative-dpo", "rollout.temperature=0.0"),
                                                ("iterative-dpo", "rollout.samples_per_prompt=1")])
def test_comparing_algorithms_refuse_rollouts_that_cannot_differ(algorithm: str, setting: str) -> None:
    """Greedy rollouts, or one per prompt, leave GRPO / RLOO nothing but zero advantages and iterative DPO no pair."""
    from engine.cli import _algorithm

    config_class = _algorithm(algorithm).CONFIG
    with pytest.raises(ConfigError) as err:
        load_config(config_class, None, [setting])
    assert setting.split("=")[0] in str(err.value)
    load_config(config_class, None, [])  # the defaults sample several rollouts per prompt


def test_ppo_may_roll_out_greedily_and_once() -> None:
    from engine.cli import _algorithm

    config = load_config(_algorithm("ppo").CONFIG, None, ["rollout.temperature=0", "rollout.samples_per_prompt=1"])
    assert config.rollout.temperature == 0 and config.rollout.samples_per_prompt == 1


def test_dpo_takes_a_reference_model_or_its_log_probs_not_both() -> None:
    """Both set, the stored log-probs were used and config.yaml named the other reference."""
    from engine.algorithms.dpo import DPOTrainConfig

    with pytest.raises(ConfigError, match="dpo.reference=runs/sft and dpo.reference_logprobs=ref.jsonl: the file's"):
        load_config(DPOTrainConfig, None, ["dpo.reference=runs/sft", "dpo.reference_logprobs=ref.jsonl"])
    stored = load_config(DPOTrainConfig, None, ["checkpoint.load=runs/sft", "dpo.reference_logprobs=ref.jsonl"])
    assert stored.dpo.reference is None  # not checkpoint.load: the run's config names only what it used
    assert load_config(DPOTrainConfig, None, ["checkpoint.load=runs/sft"]).dpo.reference == "runs/sft"
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.4 does nothing with dpo.loss=ipo"):
        load_config(DPOTrainConfig, None, ["dpo.loss=ipo", "dpo.label_smoothing=0.4"])  # was accepted and ignored
    assert load_config(DPOTrainConfig, None, ["dpo.loss=rpo", "dpo.label_smoothing=0.4"]).dpo.label_smoothing == 0.4


@pytest.mark.parametrize("algorithm, setting", [("rm", "data.pack=true"), ("rm", "data.loss_on=all"),
                                                ("dpo", "data.pack=true"), ("dpo", "data.loss_on=all"),
                                                ("grpo", "data.pack=true"), ("steerlm2", "data.loss_on=all"),
                                                ("grpo", "data.validation_fraction=0.5"), ("ppo", "data.overlong=drop"),
                                                ("reinforce", "run.eval_batches=7")])
def test_a_data_setting_the_algorithm_never_reads_is_refused(algorithm: str, setting: str) -> None:
    """data.pack and data.loss_on were accepted by reward-model, DPO and online runs and did nothing, and so were
    data.validation_fraction, data.overlong and run.eval_batches by online runs."""
    from engine.cli import _algorithm

    cls = _algorithm(algorithm).CONFIG
    name, value = setting.split("=")
    with pytest.raises(ConfigError, match=rf"^command-line overrides: {name}={value} does nothing in this run: .*; "
                                          rf"leave {name} unset$"):
        load_config(cls, None, [setting])
    assert f"{name} (" in describe(cls) and "Not read by this algorithm" in describe(cls).split(f"{name} (")[1][:200]
    load_config(TrainConfig, None, [setting])  # SFT reads them all


def test_rollouts_that_the_sequence_cuts_are_said_and_refused_where_grpo_judges_their_length(
        caplog: pytest.LogCaptureFixture) -> None:
    """data.seq_length=64 with rollout.max_new_tokens=100: 81% of responses were cut by the sequence with no
    word, and grpo.overlong=penalty (judging by max_new_tokens, never reached) penalised none."""
    from types import SimpleNamespace

    from engine.algorithms.grpo import GRPOConfig, GRPOStep

    config = SimpleNamespace(data=SimpleNamespace(seq_length=120), rollout=SimpleNamespace(max_new_tokens=100),
                             grpo=GRPOConfig(overlong="penalty"))
    step = GRPOStep(config)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^grpo.overlong=penalty judges responses by rollout.max_new_tokens, and "
                                          r"2 of 3 prompts leave fewer than rollout.max_new_tokens=100 tokens within "
                                          r"data.seq_length=120 \(as few as 80\), .* data.seq_length=140 lets every"):
        step._check_room(config, [40, 10, 30], step.judges_by_max_new_tokens())
    step.grpo.overlong = "keep"
    with caplog.at_level("WARNING", logger="engine.algorithms.online"):
        step._check_room(config, [40, 10, 30], step.judges_by_max_new_tokens())
    assert "2 of 3 prompts leave fewer than" in caplog.text
    # the advice stays within the model's context (data.seq_length=5022 was offered to a 128-token model)
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine.algorithms.online"):
        step._check_room(config, [40, 10, 30], "", context=130)
        step._check_room(config, [40, 10, 30], "", context=120)
    assert [r.getMessage().split("end; ")[1] for r in caplog.records] == [
        "the model's context of 130 tokens leaves the longest prompt room for 90: lower rollout.max_new_tokens to "
        "that, and raise data.seq_length to 130", "lower rollout.max_new_tokens to 80"]
    config.data.seq_length = 140
    caplog.clear()
    step._check_room(config, [40, 10, 30], step.judges_by_max_new_tokens())
    assert not caplog.text


def test_a_generation_tp_the_world_or_model_cannot_take_is_named_by_its_setting() -> None:
    from engine.algorithms.grpo import GRPOTrainConfig

    config = load_config(GRPOTrainConfig, None, ["rollout.generation_tensor=3"])
    with pytest.raises(ConfigError, match=r"^rollout.generation_tensor=3: generation tensor-parallel size 3 does not "
                                          r"divide the world size 4; pick one of 1, 2 \("):
        config.validate(4)


def test_grpo_overlong_penalty_ramp_must_fit_within_max_new_tokens() -> None:
    """grpo.overlong_cache=100 with rollout.max_new_tokens=48 raised a ValueError traceback in the first iteration."""
    from engine.algorithms.grpo import GRPOTrainConfig

    with pytest.raises(ConfigError, match=r"grpo.overlong_cache=100 must be in 1..rollout.max_new_tokens=48"):
        load_config(GRPOTrainConfig, None, ["grpo.overlong=penalty", "grpo.overlong_cache=100",
                                            "rollout.max_new_tokens=48"])
    assert load_config(GRPOTrainConfig, None, ["grpo.overlong=penalty", "grpo.overlong_cache=48",
                                               "rollout.max_new_tokens=48"]).grpo.overlong_cache == 48
    load_config(GRPOTrainConfig, None, ["grpo.overlong_cache=100", "rollout.max_new_tokens=48"])  # keep: unread
    with pytest.raises(ConfigError, match="grpo.aggregation_constant=-4 must be >= 1"):
        load_config(GRPOTrainConfig, None, ["grpo.aggregation_constant=-4"])
    # each bad value is named alone: max_sampling_rounds=0 was refused as 'grpo.kl_coef must be >= 0 and ...'
    with pytest.raises(ConfigError, match=r": grpo.max_sampling_rounds=0 must be >= 1$"):
        load_config(GRPOTrainConfig, None, ["grpo.max_sampling_rounds=0"])
    with pytest.raises(ConfigError, match=r": grpo.kl_coef=-0.1 must be >= 0$"):
        load_config(GRPOTrainConfig, None, ["grpo.kl_coef=-0.1"])


def test_iterative_dpo_reads_data_overlong() -> None:
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig

    assert load_config(IterativeDPOTrainConfig, None, ["data.overlong=drop"]).data.overlong == "drop"


@pytest.mark.parametrize("algorithm, key, hint", [
    ("grpo", "grpo.beta", "TRL's beta is grpo.kl_coef here"),
    ("grpo", "grpo.num_generations", "TRL's num_generations is rollout.samples_per_prompt here"),
    ("grpo", "rollout.num_generations", "TRL's num_generations is rollout.samples_per_prompt here"),
    ("grpo", "rollout.n", "verl's n is rollout.samples_per_prompt here"),
    ("grpo", "grpo.loss_type", "TRL's loss_type is grpo.aggregation here: 'grpo' is seq_mean_token_mean"),
    ("grpo", "grpo.kl_loss_type", "verl's kl_loss_type is grpo.kl_estimator here: low_var_kl is k3"),
    ("grpo", "grpo.max_completion_length", "TRL's max_completion_length is rollout.max_new_tokens here"),
    ("reinforce", "reinforce.beta", "TRL's beta is reinforce.kl_coef here"),
    ("dpo", "model.rope_theta", "transformers' rope_theta is model.rotary_base here"),
    ("dpo", "model.rms_norm_eps", "transformers' rms_norm_eps is model.layernorm_epsilon here"),
    ("sft", "model.norm_epsilon", "Megatron-LM's norm_epsilon is model.layernorm_epsilon here"),
    ("dpo", "dpo.reference_free", "TRL's reference_free has no setting here: DPO is not supported without"),
    ("dpo", "dpo.rpo_alpha", "TRL's rpo_alpha is dpo.nll_weight here"),
])
def test_a_setting_of_trl_verl_or_openrlhf_is_named_as_keels(algorithm: str, key: str, hint: str) -> None:
    """grpo.beta, grpo.num_generations, model.rope_theta... got no hint, or a wrong one (model.rope_theta:
    "did you mean model.rope_scaling_factor?"; grpo.kl_loss_type: "did you mean grpo.kl_coef?")."""
    from engine.cli import _algorithm

    with pytest.raises(ConfigError) as err:
        load_config(_algorithm(algorithm).CONFIG, None, [f"{key}=1"])
    assert str(err.value).startswith(f"command-line overrides: unknown config key '{key}' ({hint}"), err.value
    assert "did you mean" not in str(err.value), err.value


def test_every_keel_setting_the_foreign_names_point_to_exists() -> None:
    from engine.cli import ALGORITHMS, _algorithm, has_key
    from engine.config import FOREIGN_KEYS

    for key, (_, ours, _) in FOREIGN_KEYS.items():
        assert not any(has_key(_algorithm(name).CONFIG, key) for name in ALGORITHMS), key  # foreign indeed
        assert ours is None or any(has_key(_algorithm(name).CONFIG, ours) for name in ALGORITHMS), (key, ours)
    assert load_config(_algorithm("dpo").CONFIG, None, ["dpo.beta=0.2"]).dpo.beta == 0.2  # the same name as TRL's
