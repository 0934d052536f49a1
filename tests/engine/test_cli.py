"""CLI surface: field listing, example configs, and layout errors reported by every rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import TrainConfig, load_config
from tests.helpers import REPO


def test_config_show_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "parallel.distributed_optimizer" in out and "Shard optimizer state" in out
    # the shared fields: each algorithm's default where they differ (it showed SFT's run.output_dir as the default)
    assert "run.output_dir (str, defaults: sft 'runs/sft-demo'; rm 'runs/rm'; dpo 'runs/dpo';" in out
    assert "data.seq_length (int, defaults: sft, grpo, reinforce, ppo 128; rm, dpo, iterative-dpo, steerlm2 256)" in out
    assert "run.seed (int, default 1234)" in out
    assert main(["config", "presets"]) == 0
    assert "nemotron4-340b" in capsys.readouterr().out


def test_config_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sequence_length: 12\n")
    assert main(["config", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'data.sequence_length'" in err and str(bad) in err


def test_another_algorithms_config_names_the_algorithm(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A GRPO file given to keel train sft said only 'unknown config key rollout'."""
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text("rollout:\n  temperature: 0.9\ngrpo:\n  eps_high: 0.28\n")
    assert main(["train", "sft", "--config", str(grpo)]) == 2
    err = capsys.readouterr().err
    assert err == (f"keel: configuration error: {grpo}: unknown config key 'rollout': 'rollout' is a setting of grpo, "
                   "reinforce, ppo, iterative-dpo, steerlm2, not of sft; did you mean `keel train grpo --config "
                   f"{grpo}`?\n")
    assert main(["train", "rm", "dpo.beta=0.1"]) == 2
    assert "key 'dpo': 'dpo' is a setting of dpo, iterative-dpo, not of rm; did you mean `keel train dpo|iterative-dpo`?" \
        in capsys.readouterr().err
    assert main(["train", "dpo", "dpo.betta=0.1"]) == 2  # nobody's key: the plain message
    assert capsys.readouterr().err.endswith("unknown config key 'dpo.betta' (did you mean dpo.beta?)\n")


def test_config_show_resolves_every_algorithms_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """It resolved every file with the shared fields only: `keel config show examples/dpo_tiny.yaml` said
    "unknown config key 'dpo'", and no algorithm's own fields could be listed."""
    import yaml

    assert main(["config", "show", str(REPO / "examples" / "dpo_tiny.yaml"), "dpo.beta=0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dpo"]["beta"] == 0.5  # the algorithm its sections fit
    assert main(["config", "show", "--algorithm", "grpo"]) == 0
    assert "rollout.samples_per_prompt" in capsys.readouterr().out
    assert main(["config", "show", "--algorithm", "grpo", "rollout.samples_per_prompt=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["samples_per_prompt"] == 3
    assert main(["config", "show", "parallel.tensor=2"]) == 0  # overrides alone, no file
    assert yaml.safe_load(capsys.readouterr().out)["parallel"]["tensor"] == 2
    shared = tmp_path / "shared.yaml"
    shared.write_text("rollout:\n  max_new_tokens: 8\n")  # GRPO, REINFORCE and PPO all have it
    assert main(["config", "show", str(shared)]) == 2
    assert "suits grpo, ppo, reinforce: say which with --algorithm" in capsys.readouterr().err
    assert main(["config", "show", str(shared), "--algorithm", "ppo", "ppo.critic=init"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["max_new_tokens"] == 8


def test_config_show_makes_the_checks_keel_train_makes(capsys: pytest.CaptureFixture[str]) -> None:
    """`keel config show FILE parallel.tensor=3` printed a layout that keel train refuses (4 heads)."""
    import yaml

    assert main(["config", "show", str(REPO / "examples" / "sft.yaml"), "parallel.tensor=3"]) == 2
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["parallel"]["tensor"] == 3  # shown all the same, to see what was resolved
    assert "keel train would refuse this config on 3 ranks: model tiny-llama: num_attention_heads=4 is not " \
           "divisible by parallel.tensor=3" in err, err
    assert main(["config", "show", "--algorithm", "ppo"]) == 0  # the listing of fields is no config to check
    capsys.readouterr()
    assert main(["config", "show", "--config", str(REPO / "examples" / "sft.yaml"), "parallel.tensor=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["parallel"]["tensor"] == 2  # --config, as keel train takes it
    assert main(["config", "show", "parallel.data=2", "data.global_batch_size=3"]) == 2
    assert "on 2 ranks" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load_and_validate(path: Path) -> None:
    import yaml

    from engine.algorithms.dpo import DPOTrainConfig
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.algorithms.ppo import PPOTrainConfig
    from engine.algorithms.reinforce import ReinforceTrainConfig
    from engine.algorithms.reward import RewardTrainConfig
    from engine.algorithms.steerlm2 import SteerLM2TrainConfig

    sections = yaml.safe_load(path.read_text()) or {}
    by_section = {"steerlm2": SteerLM2TrainConfig, "iterative": IterativeDPOTrainConfig, "rm": RewardTrainConfig,
                  "dpo": DPOTrainConfig, "ppo": PPOTrainConfig, "grpo": GRPOTrainConfig,
                  "reinforce": ReinforceTrainConfig}
    cls = next((c for name, c in by_section.items() if name in sections), TrainConfig)
    # recipes that start from the user's SFT checkpoint (and PPO's from the user's reward model) say so in
    # their header; give them one
    overrides = []
    if "dpo" in sections and "reference" not in sections["dpo"]:
        overrides.append("checkpoint.load=runs/sft/checkpoints")
    if "ppo" in sections and "critic" not in sections["ppo"]:
        overrides += ["checkpoint.load=runs/sft/checkpoints", "reward_model=runs/rm/checkpoints"]
    config = load_config(cls, str(path), overrides)
    config.validate(config.parallel.tensor * config.parallel.pipeline)


def test_invalid_layout_fails_on_every_rank_before_any_process_group() -> None:
    """Two Slurm-style ranks (independent processes, no torchrun to tear one down) both fail alone.

    Neither reaches the rendezvous, so nothing can hang even though rank 1's peer never comes.
    """
    import subprocess
    import sys

    from tests.helpers import _env, free_port

    overrides = ["parallel.tensor=2", "model.num_query_groups=1", "model.num_attention_heads=4"]
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "engine", "train", "sft", *overrides], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}),
        )
        for rank in range(2)
    ]
    message = "num_query_groups (KV heads)=1 is not divisible by parallel.tensor=2"
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-2000:]
        assert err.count(message) == 1 and "Traceback" not in err


def test_the_summary_names_what_the_run_trained_on(tmp_path: Path) -> None:
    """Online RL trains on rollouts of rollout.prompts; its summary said data.source (builtin:sft)."""
    from types import SimpleNamespace

    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.cli import _summary
    from engine.models.presets import PRESETS
    from engine.trainer import FitResult

    prompts = tmp_path / "prompts.jsonl"
    config = load_config(GRPOTrainConfig, None, [f"rollout.prompts={prompts}", f"run.output_dir={tmp_path}",
                                                 "reward_functions=[{name: math_answer}]"])
    result = FitResult(start_step=0, end_step=2, losses={1: 0.5, 2: 0.25})
    for online, source in ((True, str(prompts)), (False, "builtin:sft")):
        trainer = SimpleNamespace(model=SimpleNamespace(preset=PRESETS["tiny-llama"]), best_validation=None,
                                  step=SimpleNamespace(online=online, loss_name="policy_loss"),
                                  layout=SimpleNamespace(describe=lambda: "TP1×PP1×DP1"))
        text = _summary("grpo", config, trainer, result)
        assert f"trained tiny-llama (217.7K parameters) on {source} with layout" in text, text
        assert "policy_loss 0.5000 -> 0.2500" in text


def test_the_summary_of_an_iterative_run_says_which_rounds_trained_nothing(tmp_path: Path) -> None:
    """A run whose prompts all tied printed 'mean dpo_loss per round nan -> nan' and nothing else."""
    from types import SimpleNamespace

    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.cli import _summary
    from engine.models.presets import PRESETS
    from engine.trainer import FitResult

    config = load_config(IterativeDPOTrainConfig, None, [f"run.output_dir={tmp_path}", "iterative.iterations=3"])
    trainer = SimpleNamespace(model=SimpleNamespace(preset=PRESETS["tiny-llama"]), best_validation=None,
                              step=SimpleNamespace(iterative=True, loss_name="dpo_loss"),
                              layout=SimpleNamespace(describe=lambda: "TP1×PP1×DP1"))
    text = _summary("iterative-dpo", config, trainer, FitResult(start_step=0, end_step=3,
                                                                losses={1: math.nan, 2: 0.6, 3: math.nan}))
    assert "mean dpo_loss per round untrained -> untrained" in text and "nan" not in text, text
    assert "2 of 3 rounds trained nothing: every prompt's samples scored alike" in text, text
    text = _summary("iterative-dpo", config, trainer, FitResult(start_step=0, end_step=2, losses={1: 0.7, 2: 0.6}))
    assert "per round 0.7000 -> 0.6000" in text and "trained nothing" not in text, text


def test_megatrons_cpu_fallback_warnings_are_quiet_without_cuda() -> None:
    import subprocess
    import sys

    from tests.helpers import _env

    code = "import engine.runtime as r; {}import megatron.core.optimizer, megatron.core.models.backends"
    env = dict(_env(), PYTHONWARNINGS="default")
    loud, quiet = (subprocess.run([sys.executable, "-c", code.format(call)], cwd=REPO, env=env, capture_output=True,
                                  text=True, check=True).stderr for call in ("", "r.quiet_cpu_fallback_warnings(); "))
    assert "Apex are not installed" in loud and "Apex is not installed" in loud  # the warnings this is about
    assert "not installed" not in quiet, quiet


def test_checkpoint_deprecations_and_cuda_advice_are_quiet_on_cpu() -> None:
    """Every checkpoint load printed torch's FutureWarnings to megatron's checkpoint code, and every
    tensor-parallel CPU step megatron's CUDA_DEVICE_MAX_CONNECTIONS advice, even under --quiet."""
    import warnings

    from engine.runtime import quiet_cpu_fallback_warnings

    advice = ("When using async grad allreduce it is recommended to set the environment variable "
              "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_cpu_fallback_warnings()
        for module in ("megatron.core.dist_checkpointing.strategies.torch", "torch.distributed.checkpoint.planner_helpers",
                       "engine.somewhere"):
            warnings.warn_explicit("x is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit(advice, UserWarning, "layers.py", 738, module="megatron.core.tensor_parallel.layers")
    assert [str(w.message) for w in caught] == ["x is deprecated"]  # only the one from elsewhere


@pytest.mark.parametrize("algo", ["sft", "rm", "dpo", "grpo", "reinforce", "ppo", "iterative-dpo", "steerlm2"])
def test_every_algorithms_defaults_fit_the_default_model(algo: str) -> None:
    """keel train iterative-dpo / steerlm2 with nothing but their required inputs died on data.seq_length=512
    against tiny-llama's 256-token context."""
    from engine.cli import _algorithm

    needs = {"dpo": ["dpo.reference=init"], "ppo": ["reward_model=runs/rm"], "steerlm2": ["reward_model=runs/rm"]}
    config = load_config(_algorithm(algo).CONFIG, None, needs.get(algo, []))
    config.validate(1)


def test_keel_runs_from_any_folder_beside_transformers(tmp_path: Path) -> None:
    """Keel's kernels were a top-level package named ``kernels``, as is one that transformers installs. Run from
    any folder but the repository (the installed ``keel`` as users run it), ``import kernels`` found that
    one, and every algorithm that computes log-probs (DPO, the online ones) died with an ImportError."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = ("import engine.algorithms.dpo, engine.algorithms.grpo, keel_kernels, sys; "
            "print(keel_kernels.__file__); print(sorted(name for name in sys.modules if name.split('.')[0] == 'kernels'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    where, foreign = done.stdout.splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(REPO.resolve()) and foreign == "[]", done.stdout


def test_the_wait_after_a_data_error_does_not_raise_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's monitored_barrier exists only for gloo and raises ValueError under NCCL: the wait that lets
    every rank print its one-line error must not turn that line into a traceback on GPUs."""
    import torch.distributed as dist

    from engine import cli

    def gloo_only(**_: object) -> None:
        raise ValueError("monitored_barrier is only implemented for GLOO backend.")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "monitored_barrier", gloo_only)
    cli._wait_for_the_other_ranks(0.1)


def test_overrides_may_follow_the_options() -> None:
    """The README's `keel data ref-logprobs ref.jsonl --config dpo.yaml checkpoint.load=...`: argparse
    alone called the overrides after --config unrecognized."""
    from engine.cli import parse_command_line

    args = parse_command_line(["data", "ref-logprobs", "ref.jsonl", "dpo.beta=0.2", "--config", "dpo.yaml",
                               "checkpoint.load=sft"])
    assert (args.output, args.config, args.overrides) == ("ref.jsonl", "dpo.yaml", ["dpo.beta=0.2", "checkpoint.load=sft"])
    assert parse_command_line(["train", "sft", "a.b=1", "--config", "x.yaml", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    # keel data validate takes a run's overrides (refused without --config, tests/engine/data/test_data_cli.py)
    assert parse_command_line(["data", "validate", "rows.jsonl", "--config", "r.yaml", "a.b=1"]).overrides == ["a.b=1"]
    for wrong in (["train", "sft", "--bogus"], ["data", "synth", "sft", "out.jsonl", "a.b=1"]):
        with pytest.raises(SystemExit):
            parse_command_line(wrong)


def test_a_finished_run_started_again_says_so_also_past_its_end(tmp_path: Path) -> None:
    """Fewer iterative.iterations than the checkpoint's said 'resumed at iteration 3 of 2, its last'."""
    from types import SimpleNamespace

    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.cli import _progress
    from engine.trainer import FitResult

    config = load_config(IterativeDPOTrainConfig, None, ["iterative.iterations=2"])
    trainer = SimpleNamespace(step=SimpleNamespace(iterative=True, loss_name="dpo_loss"))
    _, past = _progress(config, trainer, FitResult(start_step=3, end_step=3))
    assert past == ("  nothing to train: the run resumed at iteration 3, past iterative.iterations=2; raise "
                    "iterative.iterations to train on, or start afresh with checkpoint.resume=none")
    _, last = _progress(config, trainer, FitResult(start_step=2, end_step=2))
    assert "resumed at iteration 2 of 2, its last;" in last


def test_an_output_that_is_a_directory_or_the_input_is_refused_before_any_work(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The output is renamed into place at the end: a directory there lost the whole job's work, and the
    input given as output was overwritten (keel data label drops the rows it cannot label)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi", "response": "yes"}\n')
    assert main(["data", "synth", "sft", str(tmp_path), "--num", "3"]) == 2
    assert f"output {tmp_path} is a directory: give the path of the file to write" in capsys.readouterr().err
    assert main(["data", "label", str(rows), str(rows), "--rm", str(tmp_path / "no-rm")]) == 2
    assert f"output {rows} is this command's input: write to another file" in capsys.readouterr().err
    assert rows.read_text() == '{"prompt": "hi", "response": "yes"}\n' and sorted(tmp_path.iterdir()) == [rows]
    assert main(["eval", "rewardbench", "--checkpoint", "c", "--data", str(rows), "--out", str(tmp_path)]) == 2
    assert f"(e.g. {tmp_path / 'report.json'})" in capsys.readouterr().err  # the report is JSON, not JSONL


def test_iterative_dpo_is_also_taken_as_its_example_files_spell_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/iterative_dpo_tiny.yaml led users to `keel train iterative_dpo`: 'invalid choice'."""
    from engine import cli

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(cli, "run_train", lambda algo, config, overrides: seen.append((algo, config)) or 0)
    for spelling in ("iterative_dpo", "iterative-dpo"):
        args = cli.parse_command_line(["train", spelling, "--config", "x.yaml"])
        args.func(args)
    assert seen == [("iterative-dpo", "x.yaml")] * 2
