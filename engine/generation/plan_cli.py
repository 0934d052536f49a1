"""``keel reshard-plan``: print the training → generation resharding plan of a model.

The plan is computed exactly as in a run (:mod:`engine.generation.reshard`), from both
models' checkpoint metadata, on models built on the meta device (no memory, no weights),
so any preset's plan can be read on a laptop. It needs one process per training rank:
started without torchrun, the command relaunches itself on ``TP × PP × DP`` gloo ranks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from engine.models.presets import PRESETS

ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of one weight moved


def _meta_models(args: argparse.Namespace) -> tuple[list[Any], Any, int]:
    from engine.models.builder import build_gpt_chunks, meta_transformer_config
    from engine.models.presets import PRESETS
    from engine.parallel.generation_layout import GenerationParallelState
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env

    preset = PRESETS[args.model]
    env = read_launch_env()
    # gloo even on a GPU machine: the relaunch may start more ranks than there are GPUs, and nothing is computed
    layout = ParallelLayout(args.train_tensor, args.train_pipeline,
                            env.world_size // (args.train_tensor * args.train_pipeline), backend="gloo")
    layout.check_model(preset)
    state = ParallelState.initialize(layout, env)
    generation = GenerationParallelState.initialize(args.generation_tensor)
    generation.layout.check_model(preset)
    with torch.device("meta"):
        train = build_gpt_chunks(preset, meta_transformer_config(preset, state.layout), use_te=False,
                                 virtual_pipeline=None)
        model = build_gpt_chunks(preset, meta_transformer_config(preset, generation.layout), False, None,
                                 process_groups=generation.process_groups())[0]
    return train, model, generation.tp_rank


def check_layouts(args: argparse.Namespace) -> int:
    """The world size of the training layout, once both layouts are known to fit the model (in the parent,
    before any relaunch: a bad layout is one :class:`ConfigError` line, not one per rank and a torchrun trace)."""
    from engine.config import ConfigError
    from engine.parallel.generation_layout import GenerationLayout
    from engine.parallel.layout import LayoutError, ParallelLayout

    for option in ("train_tensor", "train_pipeline", "data", "generation_tensor", "bucket_mib"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    preset = PRESETS[args.model]
    world = args.train_tensor * args.train_pipeline * args.data
    try:
        ParallelLayout(args.train_tensor, args.train_pipeline, args.data).check_model(preset)
    except LayoutError as exc:  # named by this command's options, not the training config's fields
        text = str(exc).replace("parallel.tensor", "--train-tensor").replace("parallel.pipeline", "--train-pipeline")
        raise ConfigError(f"--train-tensor/--train-pipeline: {text}") from None
    GenerationLayout.for_world(args.generation_tensor, world, preset,
                               named=f"--generation-tensor (over TP x PP x DP = {world} ranks)")
    return world


def cmd_reshard_plan(args: argparse.Namespace) -> int:
    from engine.generation.reshard import generation_shards, local_shards, make_plan

    world = check_layouts(args)
    # nothing is computed: on a GPU machine the ranks run with the GPUs hidden, so none opens a CUDA context
    hide_gpus = torch.cuda.is_available()
    if "RANK" not in os.environ and (world > 1 or hide_gpus):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   "-m", "engine", *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return subprocess.call(command, env=env)
    train, model, tp_rank = _meta_models(args)
    rank = dist.get_rank()
    shards = (local_shards(train, rank)[0], generation_shards(model, rank), tp_rank)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shards)
    plan = make_plan([s for t, _, _ in gathered for s in t], [s for _, g, _ in gathered for s in g],
                     [t for _, _, t in gathered], args.bucket_mib * 2**20, ELEMENT_SIZE[args.dtype],
                     args.transport == "shared")
    if rank == 0:
        other = ("; a run on one host with its weights in host memory (CPU) takes the host-shared transport by "
                 "default (rollout.refit_transport=auto): --transport shared plans that" if args.transport == "collective"
                 else "")
        print(f"{args.model}: training TP{args.train_tensor}×PP{args.train_pipeline}×DP{args.data} -> "
              f"generation TP{args.generation_tensor} ({world // args.generation_tensor} replicas); sizes of "
              f"{args.dtype} weights (--dtype); transport {args.transport}{other}")
        print(plan.describe(limit=args.limit), flush=True)
    dist.destroy_process_group()
    return 0


def register(subparsers: Any) -> None:
    """Add ``keel reshard-plan``."""
    parser = subparsers.add_parser(
        "reshard-plan", help="print which training shard goes to which generation rank",
        description="Compute and print the training -> generation weight resharding plan of a model preset "
        "(models on the meta device; relaunches itself on TP x PP x DP gloo ranks).")
    parser.add_argument("--model", required=True, choices=sorted(PRESETS), metavar="PRESET",
                        help=f"model preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--train-tensor", type=int, default=1,
                        help="training tensor-parallel size (default: %(default)s)")
    parser.add_argument("--train-pipeline", type=int, default=1,
                        help="training pipeline-parallel size (default: %(default)s)")
    parser.add_argument("--data", type=int, default=1, help="training data-parallel size (default: %(default)s)")
    parser.add_argument("--generation-tensor", type=int, default=1,
                        help="generation tensor-parallel size; the world of train-tensor x train-pipeline x data "
                        "ranks holds world / generation-tensor replicas (default: %(default)s)")
    parser.add_argument("--bucket-mib", type=int, default=64,
                        help="bucket size of the execution in MiB (default: %(default)s)")
    parser.add_argument("--transport", choices=("collective", "shared"), default="collective",
                        help="refit transport to plan for: point-to-point sends (collective: GPU runs, several "
                        "hosts), or host-shared copies written once (shared: what rollout.refit_transport=auto takes "
                        "on one host with the weights in host memory) (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(ELEMENT_SIZE), default="bf16",
                        help="dtype of the weights moved, for the sizes: a GPU run's bf16 or fp16, a CPU run's fp32 "
                        "(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=40,
                        help="pieces to list; the summary counts all (default: %(default)s)")
    parser.set_defaults(func=cmd_reshard_plan)
