"""``keel convert hf-to-keel | keel-to-hf``: argument parsing only; the work is in :mod:`engine.convert.hf`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.checkpoint import CHECKPOINT_FORMS


def register(subparsers: Any) -> None:
    """Add the conversion sub-commands to an argparse sub-parser set (``keel convert <command>``)."""
    to_keel = subparsers.add_parser(
        "hf-to-keel", help="Hugging Face Llama or Nemotron (config.json + safetensors) -> Keel checkpoint",
        description="Convert a Hugging Face Llama-family or Nemotron model directory into a Keel checkpoint. Without "
        "model.* overrides it takes the preset whose shape config.json gives; overrides, when given, must describe "
        "the same architecture (model.preset=llama3-8b, nemotron4-15b, ...); the checkpoint loads "
        "at any parallel layout with checkpoint.load=<OUT>/step_0000000. The checkpoint records the tokenizer its runs "
        "use: the directory's tokenizer.json (else tokenizer.model), or data.tokenizer=PATH, stored as an absolute path.",
    )
    to_keel.add_argument("model_dir", help="directory with config.json and *.safetensors (and its tokenizer)")
    to_keel.add_argument("out_dir", help="where to write the Keel checkpoint")
    to_keel.add_argument("overrides", nargs="*", help="model.preset=NAME and other model.* overrides; "
                         "data.tokenizer=PATH when the directory has no tokenizer of its own")
    to_keel.set_defaults(func=_hf_to_keel)

    to_hf = subparsers.add_parser(
        "keel-to-hf", help="Keel checkpoint -> Hugging Face Llama or Nemotron (config.json + model.safetensors)",
        description="Convert a Keel checkpoint (saved at any parallel layout) into a Hugging Face "
        "LlamaForCausalLM or NemotronForCausalLM directory (by the preset's family), with the checkpoint's "
        "tokenizer (tokenizer.json, tokenizer_config.json) when it has a Hugging Face form and its special token ids "
        "in config.json and generation_config.json. The model settings are read from the checkpoint unless given. "
        "Policies (language models) only: reward model and PPO critic checkpoints are refused.",
    )
    to_hf.add_argument("checkpoint", help=f"the Keel checkpoint: {CHECKPOINT_FORMS}")
    to_hf.add_argument("out_dir", help="where to write config.json, model.safetensors and the tokenizer")
    to_hf.add_argument("overrides", nargs="*", help="model.* overrides (default: those saved in the checkpoint)")
    to_hf.set_defaults(func=_keel_to_hf)

    from_gguf = subparsers.add_parser(
        "gguf-to-keel", help="llama.cpp GGUF (Llama architecture; the quantisations the gguf package reads) -> Keel "
        "checkpoint",
        description="Dequantise a Llama-architecture GGUF file to fp32 and write a Keel checkpoint. Without model.* "
        "overrides it takes the preset whose shape the file's metadata gives; overrides, when given, must describe "
        "the same architecture (e.g. model.preset=smollm2-135m).",
    )
    from_gguf.add_argument("gguf_file", help="the .gguf file")
    from_gguf.add_argument("out_dir", help="where to write the Keel checkpoint")
    from_gguf.add_argument("overrides", nargs="*", help="model.preset=NAME and other model.* overrides")
    from_gguf.set_defaults(func=_gguf_to_keel)


def _check_arguments(args: argparse.Namespace, command: str, source: str, allowed: tuple[str, ...]) -> None:
    """Refused before any work: an output directory that is a file or the input itself, and an override that
    the command does not read (it was accepted and ignored)."""
    from engine.config import ConfigError

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file: give a directory to write into (it is created if missing)")
    if out.resolve() == Path(source).resolve():
        raise ConfigError(f"out_dir {out} is this command's input: write to another directory")
    if command.endswith("to-keel"):
        _refuse_a_runs_checkpoints(out)
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if not any(key == name or key.startswith(name) for name in allowed):
            raise ConfigError(f"override {item!r}: keel convert {command} reads only "
                              f"{', '.join(name + '*' if name.endswith('.') else name for name in allowed)}")


def _refuse_a_runs_checkpoints(out: Path) -> None:
    """A converted checkpoint is saved as step 0 and made ``latest``: written among a run's checkpoints, it
    would stop that run resuming (another conversion's output may be written over)."""
    from engine.checkpoint import dist as ckpt
    from engine.config import ConfigError

    newest = ckpt.find_latest(str(out)) if out.is_dir() else None
    meta = ckpt.read_meta(newest) if newest is not None else {}
    if newest is not None and meta.get("algorithm") != "convert" and not meta.get("converted"):
        raise ConfigError(f"out_dir {out} holds a training run's checkpoints ({newest.name}): the conversion would "
                          "become their latest and stop that run resuming; write to a new directory")


def _hf_to_keel(args: argparse.Namespace) -> int:
    from engine.checkpoint import dist as ckpt
    from engine.convert.hf import hf_to_keel

    _check_arguments(args, "hf-to-keel", args.model_dir, ("model.", "data.tokenizer", "data.chat_template"))
    path = hf_to_keel(args.model_dir, args.out_dir, args.overrides)
    if ckpt.scorer_kind(ckpt.read_meta(path)) is not None:
        print(f"Keel reward model: {path}\n  use it with reward_model={path} (online RL, SteerLM 2.0 needs a "
              f"regression one) or keel eval rewardbench --rm {path}")
    else:
        print(f"Keel checkpoint: {path}\n  use it with checkpoint.load={path}")
    return 0


def _gguf_to_keel(args: argparse.Namespace) -> int:
    from engine.convert.gguf import gguf_to_keel

    _check_arguments(args, "gguf-to-keel", args.gguf_file, ("model.", "data.tokenizer"))
    path = gguf_to_keel(args.gguf_file, args.out_dir, args.overrides)
    print(f"Keel checkpoint: {path}\n  use it with checkpoint.load={path}")
    return 0


def _keel_to_hf(args: argparse.Namespace) -> int:
    from engine.convert.hf import keel_to_hf

    _check_arguments(args, "keel-to-hf", args.checkpoint, ("model.",))
    path = keel_to_hf(args.checkpoint, args.out_dir, args.overrides)
    print(f"Hugging Face model: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.convert")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from engine.checkpoint.dist import CheckpointError
    from engine.config import ConfigError

    try:
        return int(args.func(args))
    except (ConfigError, CheckpointError) as exc:  # one line, as keel convert says it
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2
