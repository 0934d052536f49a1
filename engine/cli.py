"""Command line: ``keel train <algorithm>``, ``keel config``, ``keel data``.

Every sub-command validates its configuration before creating any process group and
reports user errors as one line on stderr instead of a traceback: configuration errors
exit 2; data errors (file, row and field), checkpoint and training errors exit 1, on
every rank.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from engine.config import ConfigError, TrainConfig, UnknownKeyError, describe, load_config
from engine.data.errors import DataError
from engine.parallel import failures
from engine.run_lock import release_held
from engine.runtime import quiet_cpu_fallback_warnings, setup_logging
from engine.runtime import shutdown as _shutdown

logger = logging.getLogger("engine")

ALGORITHMS: dict[str, tuple[str, str]] = {
    # name: (module defining CONFIG and create(config) -> Step, one-line description)
    "sft": ("engine.algorithms.sft", "supervised fine-tuning on chat or plain text"),
    "rm": ("engine.algorithms.reward", "reward model: SteerLM attribute regression or Bradley-Terry"),
    "dpo": ("engine.algorithms.dpo", "direct preference optimisation (DPO, IPO, RPO) against a frozen reference"),
    "grpo": ("engine.algorithms.grpo", "online GRPO (Dr. GRPO, DAPO options) on rollouts from the generation backend"),
    "reinforce": ("engine.algorithms.reinforce", "online REINFORCE with a leave-one-out baseline (RLOO)"),
    "ppo": ("engine.algorithms.ppo", "online PPO: actor from SFT, critic from the reward model, GAE"),
    "iterative-dpo": ("engine.algorithms.iterative_dpo", "iterative DPO: sample n per prompt, best vs worst by the "
                      "reward, one DPO round from the current policy; repeat"),
    "steerlm2": ("engine.algorithms.steerlm2", "SteerLM 2.0: sample n per prompt at target attributes, train on "
                 "self-normalised importance weights from the reward model"),
}


def _algorithm(algo: str) -> Any:
    return __import__(ALGORITHMS[algo][0], fromlist=["create"])


def _load_train_config(algo: str, config_path: Optional[str], overrides: list[str]) -> Any:
    """``algo``'s config; a key only other algorithms have (a GRPO file given to ``keel train sft``) says whose."""
    try:
        return load_config(_algorithm(algo).CONFIG, config_path, overrides)
    except UnknownKeyError as exc:
        owners = [name for name in ALGORITHMS if name != algo and has_key(_algorithm(name).CONFIG, exc.key)]
        if not owners:
            raise
        fitting = [name for name in owners if all(has_key(_algorithm(name).CONFIG, k) for k in _top_keys(config_path))]
        command = f"keel train {'|'.join(fitting or owners)}" + (f" --config {config_path}" if config_path else "")
        raise ConfigError(f"{exc}: '{exc.key}' is a setting of {', '.join(owners)}, not of {algo}; "
                          f"did you mean `{command}`?") from None


def _top_keys(config_path: Optional[str]) -> list[str]:
    """The sections of a YAML config file (none without one, or when it does not read as a mapping)."""
    import yaml

    try:
        tree = yaml.safe_load(Path(config_path).read_text()) if config_path else None
    except (OSError, yaml.YAMLError):
        return []
    return [str(key) for key in tree] if isinstance(tree, dict) else []


def has_key(config_class: type, key: str) -> bool:
    """Whether the config dataclass has the dotted ``key`` (a section or a field of one)."""
    import dataclasses

    current: Any = config_class
    for part in key.split("."):
        if not dataclasses.is_dataclass(current):
            return False
        known = {f.name: f for f in dataclasses.fields(current)}
        if part not in known:
            return False
        current = typing.get_type_hints(current).get(part)
    return True


def run_train(algo: str, config_path: Optional[str], overrides: list[str]) -> int:
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env

    module = _algorithm(algo)
    config = _load_train_config(algo, config_path, overrides)
    env = read_launch_env()
    config.validate(env.world_size)  # before any process group exists
    setup_logging(config.logging.level)
    if config.inherited:
        from engine.checkpoint.inherit import describe_inherited

        logger.info(describe_inherited(str(config.checkpoint.load), config.inherited))
    layout = ParallelLayout.from_config(config.parallel, env.world_size)
    timeout = config.parallel.timeout_minutes
    restart = functools.partial(failures.restart_hint, config.checkpoint.dir, config.checkpoint.resume)
    if env.launcher != "single":
        failures.watch_launcher(env.rank)
    with failures.translated(env.rank, timeout, "while joining the job (rendezvous, process groups)", restart):
        parallel = ParallelState.initialize(layout, env, seed=config.run.seed, timeout_minutes=timeout)
    from engine.trainer import Trainer

    step = module.create(config)
    trainer_class: Any = Trainer
    if getattr(step, "iterative", False):
        from engine.iterative_trainer import IterativeTrainer

        trainer_class = IterativeTrainer
    elif getattr(step, "online", False):
        from engine.online_trainer import OnlineTrainer

        trainer_class = OnlineTrainer
    try:
        trainer = trainer_class(config, step, parallel)
        with failures.translated(env.rank, timeout, "during training", restart):
            result = trainer.fit()
        if parallel.is_main:
            print(_summary(algo, config, trainer, result), flush=True)
    finally:
        release_held()  # the run directory is free once the run is over, also when keel runs in-process
    _shutdown()
    # Ctrl-C: checkpointed, but interrupted, so that `keel train sft && keel train dpo ...` stops there as after any
    # interrupted command; SIGTERM (pre-emption) is a planned stop, 0 as in NeMo (docker/slurm/job.sh requeues)
    return 130 if result.stopped_by == "SIGINT" else 0


def _loss_text(value: float) -> str:
    return "untrained" if math.isnan(value) else f"{value:.4f}"


def _run_outputs(run_dir: str) -> str:
    """The files a run wrote into its directory, as the summary lists them."""
    described = (("config.yaml", "config.yaml (resolved config)"), ("metrics.jsonl", "metrics.jsonl"),
                 ("curves.png", "curves.png (learning curves)"), ("tensorboard", "tensorboard/"))
    return ", ".join(text for name, text in described if os.path.exists(os.path.join(run_dir, name))) or "none"


def _reward_text(run_dir: str, result: Any, compared: bool = False) -> str:
    """``"; reward <first> -> <last>"``: the mean reward of the rollouts of this run's first and last iterations
    (what an online run is for; its loss says little), from ``metrics.jsonl``; empty when none was logged. Where
    the rollouts of a prompt are ``compared`` (GRPO, RLOO), a line more counts the iterations of only tied groups."""
    from engine.metrics import parse_records

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return ""
    records = [r for _, r in parse_records(path) if r.get("split") == "train" and "reward" in r
               and result.start_step < r.get("step", 0) <= result.end_step]
    if not records:
        return ""
    text = f"; reward {records[0]['reward']:.4f} -> {records[-1]['reward']:.4f}"
    tied = sum(r.get("tied_groups") == 1.0 for r in records)
    if compared and tied:
        text += (f"\n  {tied} of {len(records)} iterations learned nothing from the reward: every prompt's rollouts "
                 "scored alike (tied_groups=1), so their advantages were 0")
    return text


def _progress(config: Any, trainer: Any, result: Any) -> tuple[str, str]:
    """(what the run trained on, the summary's progress line: steps or iterations, loss, reward)."""
    losses = result.losses
    steps = sorted(losses)
    first = _loss_text(losses[steps[0]]) if steps else "n/a"
    last = _loss_text(losses[steps[-1]]) if steps else "n/a"
    iterative = getattr(trainer.step, "iterative", False)
    # online RL and the iterative recipes train on their prompts' samples, not on data.source
    source = config.rollout.prompts if iterative or getattr(trainer.step, "online", False) else config.data.source
    if result.end_step == result.start_step and not result.stopped_by:  # a finished run started again
        unit, total, setting = (("iteration", config.iterative.iterations, "iterative.iterations") if iterative
                                else ("step", config.run.train_steps, "run.train_steps"))
        where = f"{result.start_step} of {total}, its last" if result.start_step <= total else \
            f"{result.start_step}, past {setting}={total}"
        return source, (f"  nothing to train: the run resumed at {unit} {where}; raise {setting} to train on, or "
                        "start afresh with checkpoint.resume=none")
    if iterative:
        untrained = sum(math.isnan(losses[s]) for s in steps)
        progress = f"  iterations {result.start_step + 1}..{result.end_step} of {config.iterative.iterations}; " \
                   f"mean {trainer.step.loss_name} per round {first} -> {last}; samples, pairs/weights and summaries " \
                   f"in {os.path.join(os.path.abspath(config.run.output_dir), 'iterations')}"
        if untrained:
            progress += f"\n  {untrained} of {len(steps)} rounds trained nothing: every prompt's samples scored " \
                        "alike (see the warnings and each iteration's summary.json)"
        return source, progress
    progress = f"  steps {result.start_step + 1}..{result.end_step} of {config.run.train_steps}" \
               f"{f' (stopped by {result.stopped_by})' if result.stopped_by else ''}; {trainer.step.loss_name} {first} -> " \
               f"{last}; {result.tokens_per_second:,.0f} tokens/s"
    if getattr(trainer.step, "online", False):
        from engine.online_trainer import ties_teach_nothing

        progress += _reward_text(config.run.output_dir, result, ties_teach_nothing(config))
    return source, progress


def _summary(algo: str, config: TrainConfig, trainer: Any, result: Any) -> str:
    preset = trainer.model.preset
    source, progress = _progress(config, trainer, result)
    lines = [
        "",
        f"Keel {algo}: trained {preset.name} ({preset.parameter_label()} parameters) "
        f"on {source} with layout {trainer.layout.describe()}",
        progress,
    ]
    if result.validation:
        step = max(result.validation)
        lines.append(f"  validation {trainer.step.loss_name} at step {step}: {result.validation[step]:.4f}")
    held_out = getattr(trainer, "held_out_results", None)  # online RL: the rewards of the held-out prompts' answers
    if held_out:
        step = max(held_out)
        lines.append(f"  held-out at iteration {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in held_out[step].items()))
    if trainer.best_validation:
        best_step, best_loss = trainer.best_validation
        lines.append(f"  best validation {trainer.step.loss_name} {best_loss:.4f} at step {best_step} "
                     f"(checkpoint {os.path.join(os.path.abspath(str(config.checkpoint.dir)), 'best')})")
    lines += [
        f"  outputs in {os.path.abspath(config.run.output_dir)}:",
        f"    {_run_outputs(config.run.output_dir)}",
        f"    checkpoint: {os.path.abspath(result.checkpoint) if result.checkpoint else 'none written'}",
    ]
    critic = getattr(trainer, "critic_checkpoint", None)  # PPO's critic, saved beside the policy
    if critic:
        lines.append(f"    critic checkpoint: {os.path.abspath(critic)}")
    return "\n".join(lines)


def _config_show(args: argparse.Namespace) -> int:
    """Every field of ``--algorithm``'s config (the shared ones without it), or a file and overrides resolved
    with the algorithm it names or, for a file, the one its sections fit."""
    import dataclasses

    import yaml

    if args.file and "=" in args.file and not os.path.exists(args.file):  # overrides alone
        args.overrides, args.file = [args.file, *args.overrides], None
    if args.config_file:  # --config FILE, as keel train takes it
        if args.file:
            raise ConfigError(f"give the config once: --config {args.config_file} or {args.file}")
        args.file = args.config_file
    cls = _algorithm(args.algorithm).CONFIG if args.algorithm else TrainConfig
    if args.file:
        from engine.data.cli import run_config

        try:
            config = run_config(args.file, args.algorithm, args.overrides, named="")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    elif args.overrides:
        config = load_config(cls, None, args.overrides)
    elif args.algorithm:
        print(describe(cls))
        return 0
    else:  # the fields every algorithm shares, each algorithm's default where they differ
        print("# the fields every keel train algorithm shares; --algorithm NAME lists one algorithm's own as well")
        print(describe(cls, {name: _algorithm(name).CONFIG for name in ALGORITHMS}))
        return 0
    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    ranks = config.parallel.tensor * config.parallel.pipeline * (config.parallel.data or 1)
    try:  # the checks keel train makes before any work (layout, batch sizes, required settings, reward code)
        config.validate(ranks)
        config.check_named_code()
    except ConfigError as exc:
        print(f"keel: keel train would refuse this config on {ranks} rank{'s' if ranks > 1 else ''}: {exc}",
              file=sys.stderr)
        return 2
    return 0


def _config_presets(args: argparse.Namespace) -> int:
    from engine.models.presets import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name:16s} layers={preset.num_layers:3d} hidden={preset.hidden_size:6d} "
              f"heads={preset.num_attention_heads:3d}/{preset.num_query_groups:<3d} ffn={preset.ffn_hidden_size:6d} "
              f"vocab={preset.vocab_size:7d} {preset.normalization}/{preset.activation} "
              f"params={preset.parameter_label()}")
    return 0


class _AlgorithmParser(argparse.ArgumentParser):
    """Parser of ``keel train <algo>`` whose help ends with every config field (built on demand)."""

    def __init__(self, *args: Any, algo: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.algo = algo

    def format_help(self) -> str:
        return super().format_help() + "\n" + describe(_algorithm(self.algo).CONFIG) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Keel: align LLMs at cluster scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with one algorithm (run under torchrun for several ranks)")
    algos = train.add_subparsers(dest="algorithm", required=True, parser_class=_AlgorithmParser)
    for name, (_, text) in ALGORITHMS.items():
        p = algos.add_parser(
            name, help=text, description=f"keel train {name}: {text}. Settings are FIELD=VALUE overrides "
            "on top of --config; every field is listed below.",
            algo=name, aliases=[name.replace("-", "_")] if "-" in name else [],  # as the example files spell it
        )
        p.add_argument("--config", help="YAML file with the run's settings")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides")
        p.set_defaults(func=lambda a, n=name: run_train(n, a.config, a.overrides))

    config = sub.add_parser("config", help="inspect configuration fields and presets")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="list every field with its doc and default, or resolve a config")
    show.add_argument("file", nargs="?", help="YAML config to resolve (prints the merged result)")
    show.add_argument("overrides", nargs="*", help="section.field=value overrides")
    show.add_argument("--config", dest="config_file", default=None, help="the YAML config, as keel train takes it "
                      "(the same as giving it as FILE)")
    show.add_argument("--algorithm", choices=list(ALGORITHMS),
                      help="the keel train algorithm whose config to list or resolve (default for a file: the one "
                           "its sections fit; without a file: the fields every algorithm shares)")
    show.set_defaults(func=_config_show)
    presets = csub.add_parser("presets", help="list model presets")
    presets.set_defaults(func=_config_presets)

    _register_optional(sub, "data", "engine.data.cli", "validate, convert and generate data sets")
    _register_optional(sub, "eval", "engine.eval.cli", "evaluate reward models (RewardBench-style accuracy)")
    _register_optional(sub, "convert", "engine.convert", "convert checkpoints to/from Hugging Face and GGUF")
    from engine.generate import register as register_generate
    from engine.generation.plan_cli import register as register_reshard_plan
    from engine.plan import register as register_plan

    register_plan(sub)
    register_generate(sub)
    register_reshard_plan(sub)
    return parser


def _register_optional(sub: Any, name: str, module_name: str, text: str) -> None:
    try:
        module = __import__(module_name, fromlist=["register"])
    except ImportError:
        return
    register: Callable[[Any], None] = module.register
    parser = sub.add_parser(name, help=text)
    register(parser.add_subparsers(dest=f"{name}_command", required=True))


def parse_command_line(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The parsed command line. ``section.field=value`` overrides may stand on either side of the options
    (``keel data ref-logprobs out.jsonl --config dpo.yaml checkpoint.load=...``): argparse hands a
    command's positional overrides only the words before its first option and calls the rest unknown."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not isinstance(getattr(args, "overrides", None), list) or any(
                word.startswith("-") or "=" not in word for word in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = args.overrides + unknown
    return args


def check_output_file(args: argparse.Namespace) -> None:
    """A command's output file (``output`` / ``--out``) that is a directory, or its own input, is refused before
    any work: the file is written at the end (a rename), so the work was done and then lost, or the input gone."""
    output = getattr(args, "output", None) or getattr(args, "out", None)
    if not isinstance(output, str):
        return
    if os.path.isdir(output):
        raise ConfigError(f"output {output} is a directory: give the path of the file to write (e.g. "
                          f"{os.path.join(output, getattr(args, 'out_example', 'out.jsonl'))})")
    for name in ("input", "prompts", "source", "data"):
        given = getattr(args, name, None)
        if isinstance(given, str) and os.path.exists(given) and os.path.abspath(given) == os.path.abspath(output):
            raise ConfigError(f"output {output} is this command's input: write to another file")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_command_line(argv)
    quiet_cpu_fallback_warnings()
    setup_logging()  # `keel train` sets config.logging.level once its config is read
    try:
        check_output_file(args)
        return int(args.func(args))
    except ConfigError as exc:
        print(f"keel: configuration error: {exc}", file=sys.stderr)
        return 2
    except failures.RankFailure as exc:
        return int(failures.exit_on_failure(exc))
    except KeyboardInterrupt:  # a second Ctrl-C in training (the first checkpoints), any Ctrl-C elsewhere
        print("keel: interrupted (Ctrl-C); the checkpoints and .partial outputs written so far are kept, and "
              "the same command resumes from them", file=sys.stderr)
        return 130
    except DataError as exc:  # raised alike on every rank (each reads and checks the same rows)
        print(f"keel: data error: {exc}", file=sys.stderr, flush=True)
        _wait_for_the_other_ranks()
        return 1
    except Exception as exc:
        from engine.checkpoint.dist import CheckpointError
        from engine.rewards.worker import RewardError
        from engine.trainer import TrainingError

        # raised alike on every rank; a reward function's with on_error: raise names it, the row and the fix
        if isinstance(exc, (CheckpointError, TrainingError, RewardError)):
            print(f"keel: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            _wait_for_the_other_ranks()
            return 1
        raise


def _wait_for_the_other_ranks(timeout_s: float = 30.0) -> None:
    """Let every rank say its own one-line error before any exits: torchrun stops the others as soon
    as one worker exits non-zero, which could cut off a rank still on its way to the same error.
    A rank that never arrives (it failed elsewhere) holds the others back ``timeout_s`` at most."""
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_backend() != "gloo":
        return  # monitored_barrier exists only for gloo (NCCL raises ValueError): each rank's own error stands
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError:
        pass  # a rank did not come: its own error, or none, stands


if __name__ == "__main__":  # `python -m engine.cli` as well as `python -m engine` and `keel`
    raise SystemExit(main())
