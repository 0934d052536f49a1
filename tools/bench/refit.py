"""Benchmark refit (training layout -> generation layout weight resharding) against a checkpoint round trip.

Four gloo ranks on CPU, fp32, launched by this script with ``torch.distributed.run
--nproc-per-node 4`` (``--nproc``). The training model (default ``bench-125m``: 124.7M parameters,
``model.init=layout_invariant``) is a trained ``ModelRunner`` (DDP + optimizer) at TP2 x PP2.
For each generation tensor-parallel size ``G`` (default 1 and 2; ``4/G`` replicas of ``G``
consecutive ranks, ``GenerationParallelState.initialize(G)``) and each refit case: the point-to-point
``collective`` transport at two bucket sizes (the ``Resharder`` default, 64 MiB, and
``--small-bucket-mib``), and the host-``shared`` transport (one copy of the generation weights per
generation TP rank in ``/dev/shm``, written once per refit; see ``engine/generation/host_shared.py``):

* **refit**: a fresh ``NativeBackend`` (its weights allocated but never written), then
  ``Resharder(training chunks, backend, bucket_bytes, transport).reshard()``: once cold (the backend's
  pages are first written here), ``--repeats`` times warm (timed), and once more warm with RSS
  sampling. A refit's time is the wall time from a barrier before ``reshard()`` to a barrier
  after it, the slowest rank's. Reported per run: ``landed_bytes`` (bytes written into
  generation weights on all ranks: received + copied in-process), ``refit_gb_per_second``
  (landed bytes / time: the aggregate rate), ``model_copy_gb_per_second`` (one fp32 copy of the
  model / time) and each rank's own ``gb_per_second`` from the resharder; per case the
  resharder's ``peak_extra_bytes`` (its bucket buffers, largest rank) and the process RSS growth
  during a refit: RSS sampled every ``--rss-interval-ms`` on a thread (psutil) minus the RSS
  before it (after ``gc.collect`` + ``malloc_trim``), largest rank, cold and warm, and the
  growth of ``getrusage`` ``ru_maxrss`` (the high-water mark; it only grows past an earlier peak).
* **checkpoint**: the training model saved with ``ModelRunner.save`` (weights only, no optimizer:
  what a refit moves) at TP2 x PP2 to ``--checkpoint-dir`` (default: a temporary directory under
  ``$TMPDIR``); then, per ``G``, megatron's groups are re-initialised at TP ``G`` PP1
  (``ParallelState.initialize``) and ``ModelRunner.frozen(config at TP G).load(path)`` is timed
  (barrier to barrier, slowest rank). The load reads what was just written, mostly from the page
  cache: a floor for a real save -> load through storage. The loaded weights are compared with
  the refitted ones (per-parameter sums, exact): ``refit_equals_checkpoint_load``.

``speedup_over_checkpoint`` = (save + load at ``G``) / median warm refit at the default bucket;
the target is >= 10. All refits run before the checkpoint part, while megatron's groups still
describe the training layout. The 1-minute load average before and after the launch is
recorded: with 4 ranks on a 2-core machine the ranks share cores, and any other load changes
the numbers. ``machine_busy`` judges the load *before* the launch only (the load after includes
this benchmark's own ranks).

    python tools/bench/refit.py [--out tools/bench/results/refit.json]
    python tools/bench/refit.py --quick     # smoke test: a 4-layer, hidden-384 model, 1 timed refit
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import (  # noqa: E402
    RssSampler,
    load_average,
    machine_busy,
    machine_info,
    rss_bytes,
    ru_maxrss_bytes,
    run_child,
    trim_memory,
    versions,
    write_report,
)

DEFAULT_OUT = REPO / "tools/bench/results/refit.json"
QUICK_OUT = REPO / "tools/bench/results/refit_quick.json"
TARGET_SPEEDUP = 10.0
METHOD = (
    "refit: barrier, Resharder.reshard(), barrier; the slowest rank's wall time; cold = first refit into a fresh "
    "backend (its pages first written), warm = later ones (median reported); landed_bytes = received + copied "
    "bytes over all ranks; refit_gb_per_second = landed_bytes / time; model_copy_gb_per_second = one fp32 model / "
    "time. Memory per rank: the resharder's peak_extra_bytes; RSS sampled on a thread during one cold and one warm "
    "refit minus RSS before it (after gc + malloc_trim); ru_maxrss growth. checkpoint: ModelRunner.save (weights "
    "only) at the training layout, then per generation TP megatron's groups re-initialised at TP G PP1 and "
    "ModelRunner.frozen(...).load(path) timed barrier to barrier (the just-written files are mostly in the page "
    "cache: a floor for a real round trip through storage). speedup = (save + load) / median warm refit, per transport: "
    "collective (point-to-point, default bucket; every replica lands its own copy) and shared (one host-shared copy "
    "per generation TP rank, each element written once; generation_weight_bytes_on_host compares the memory)"
)
QUICK_MODEL = ["num_layers=4", "hidden_size=384", "ffn_hidden_size=1024", "vocab_size=8192"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}, "
                        f"with --quick {QUICK_OUT.relative_to(REPO)})")
    parser.add_argument("--preset", default="bench-125m", help="Keel model preset")
    parser.add_argument("--model-override", action="append", default=None, metavar="KEY=VALUE",
                        help="model.* shape overrides (repeatable)")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (gloo processes)")
    parser.add_argument("--train-tensor", type=int, default=2, help="training tensor-parallel size")
    parser.add_argument("--train-pipeline", type=int, default=2, help="training pipeline-parallel size")
    parser.add_argument("--generation-tensor", default="1,2", help="generation TP sizes, comma-separated")
    parser.add_argument("--small-bucket-mib", type=float, default=8.0, help="the smaller refit bucket (MiB)")
    parser.add_argument("--repeats", type=int, default=None, help="timed warm refits per case (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rss-interval-ms", type=float, default=5.0)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="where to save (default: a temporary directory, removed afterwards)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="smoke test: a small model, 1 timed refit per case")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_override is None:
        args.model_override = QUICK_MODEL if args.quick else []
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.generation_sizes = [int(g) for g in args.generation_tensor.split(",")]
    if args.repeats < 1 or args.small_bucket_mib <= 0 or min(args.generation_sizes) < 1:
        parser.error("--repeats must be >= 1, --small-bucket-mib > 0 and every generation TP >= 1")
    return args


def default_bucket_bytes() -> int:
    from engine.generation.reshard import Resharder

    return int(inspect.signature(Resharder.__init__).parameters["bucket_bytes"].default)


def overrides(args: argparse.Namespace, run_dir: str, tensor: int, pipeline: int) -> list[str]:
    return [f"model.preset={args.preset}", *[f"model.{o}" for o in args.model_override],
            "model.init=layout_invariant", "model.layer_spec=local", "precision.dtype=fp32",
            f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}", "parallel.backend=gloo",
            f"run.seed={args.seed}", f"run.output_dir={run_dir}", "logging.tensorboard=false",
            "logging.progress=false", "checkpoint.save_interval=0", "checkpoint.resume=none"]


# ---------------------------------------------------------------------------- worker (every rank)


def gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def checksums(model: Any) -> dict[str, tuple[float, float]]:
    """Per parameter (sum, sum of |x|) in float64: equal for equal tensors."""
    return {name: (float(p.double().sum()), float(p.double().abs().sum())) for name, p in model.named_parameters()}


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def timed_reshard(resharder: Any, sample_rss: bool, interval_s: float) -> dict[str, float]:
    """One refit, barrier to barrier, with this rank's stats and memory growth."""
    import torch.distributed as dist

    trim_memory()
    dist.barrier()
    rss_before, maxrss_before = rss_bytes(), ru_maxrss_bytes()
    sampler = RssSampler(interval_s) if sample_rss else nullcontext()
    start = time.perf_counter()
    with sampler:
        stats = resharder.reshard()
        dist.barrier()
    record = {**stats, "wall_seconds": time.perf_counter() - start,
              "ru_maxrss_growth_bytes": float(ru_maxrss_bytes() - maxrss_before)}
    if isinstance(sampler, RssSampler):
        record["rss_growth_bytes"] = float(sampler.peak - rss_before)
    return record


def refit_case(args: argparse.Namespace, config: Any, runner: Any, state: Any, bucket: int,
               transport: str) -> dict[str, Any]:
    """A fresh backend, then cold, warm (timed) and warm RSS-sampled refits; this rank's records."""
    from engine.generation.native import NativeBackend
    from engine.generation.reshard import Resharder

    trim_memory()
    backend = NativeBackend(config, state, max_batch_size=8)
    resharder = Resharder(runner.chunks, backend, bucket_bytes=bucket, transport=transport)
    interval = args.rss_interval_ms / 1000.0
    record: dict[str, Any] = {"cold": timed_reshard(resharder, True, interval)}
    record["warm"] = [timed_reshard(resharder, False, interval) for _ in range(args.repeats)]
    record["warm_sampled"] = timed_reshard(resharder, True, interval)
    record["plan"] = {"buckets": len(resharder.plan.buckets), "pieces": sum(1 for _ in resharder.plan.pieces()),
                      "plan_seconds": resharder.plan.stats["plan_seconds"]}
    record["backend_weight_bytes"] = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    shared = resharder.shared
    record["host_weight_bytes"] = (shared.nbytes * len(shared.views) if shared
                                   else record["backend_weight_bytes"] * dist_world())
    record["transport"] = resharder.transport
    record["checksums"] = checksums(backend.model)
    del resharder, backend
    trim_memory()
    return record


def measure_checkpoint(args: argparse.Namespace, runner: Any, config: Any, env: Any, root: str,
                       refitted: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Save at the training layout, then per generation TP re-initialise megatron's groups and load."""
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel

    from engine.config import TrainConfig, load_config
    from engine.parallel.layout import ParallelLayout, ParallelState
    from engine.runner import ModelRunner

    extra = {"model_signature": runner.signature, "config": config.to_dict(), "algorithm": "bench-refit"}
    trim_memory()
    dist.barrier()
    start = time.perf_counter()
    path = runner.save(root, 1, extra, keep_last=0, with_optimizer=False)
    dist.barrier()
    result: dict[str, Any] = {"save_seconds": max(gather(time.perf_counter() - start)),
                              "checkpoint_bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}
    for size in args.generation_sizes:
        gen_config = load_config(TrainConfig, None, overrides(args, config.run.output_dir, size, 1))
        gen_config.validate(env.world_size)
        parallel = ParallelState.initialize(ParallelLayout.from_config(gen_config.parallel, env.world_size), env,
                                            seed=args.seed)
        frozen = ModelRunner.frozen(gen_config, parallel, (GPTModel, {}))
        trim_memory()
        dist.barrier()
        start = time.perf_counter()
        frozen.load(Path(path))
        dist.barrier()
        seconds = max(gather(time.perf_counter() - start))
        same = all(gather(checksums(frozen.chunks[0]) == refitted[size]))
        result[f"tp{size}"] = {"load_seconds": seconds, "refit_equals_checkpoint_load": same}
        del frozen
        trim_memory()
    return result


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel

    from engine.config import TrainConfig, load_config
    from engine.parallel.generation_layout import GenerationParallelState
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    from engine.runner import ModelRunner

    torch.set_num_threads(args.threads)
    env = read_launch_env()
    with tempfile.TemporaryDirectory(prefix="keel-refit-bench-") as run_dir:
        config = load_config(TrainConfig, None, overrides(args, run_dir, args.train_tensor, args.train_pipeline))
        config.validate(env.world_size)
        parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                            seed=args.seed)
        runner = ModelRunner.trained(config, parallel, (GPTModel, {}))
        cases = {"default_bucket": ("collective", default_bucket_bytes()),
                 "small_bucket": ("collective", int(args.small_bucket_mib * 2**20)),
                 "shared": ("shared", default_bucket_bytes())}
        refit: dict[str, Any] = {}
        refitted: dict[int, dict[str, Any]] = {}
        for size in args.generation_sizes:
            state = GenerationParallelState.initialize(size)
            for name, (transport, bucket) in cases.items():
                record = refit_case(args, config, runner, state, bucket, transport)
                same = refitted.setdefault(size, record["checksums"]) == record["checksums"]
                refit[f"tp{size}_{name}"] = summarise_refit(gather(record), bucket, runner.preset)
                refit[f"tp{size}_{name}"]["equals_first_case"] = all(gather(same))
        checkpoint = measure_checkpoint(args, runner, config, env, str(args.checkpoint_dir), refitted)
        if env.rank == 0:
            args.result_file.write_text(json.dumps({"refit": refit, "checkpoint": checkpoint,
                                                    "parameters": runner.preset.parameter_count(),
                                                    "torch_threads_per_rank": torch.get_num_threads()}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------- summaries (rank 0 / parent)


def run_summary(ranks: list[dict[str, float]], model_bytes: int) -> dict[str, Any]:
    """One collective refit from every rank's record: the slowest rank's time, bytes over all ranks."""
    seconds = max(r["wall_seconds"] for r in ranks)
    landed = sum(r["received_bytes"] + r["copied_bytes"] for r in ranks)
    return {"seconds": round(seconds, 4), "resharder_seconds_max": round(max(r["seconds"] for r in ranks), 4),
            "landed_bytes": int(landed), "sent_bytes": int(sum(r["sent_bytes"] for r in ranks)),
            "refit_gb_per_second": round(landed / seconds / 1e9, 3),
            "model_copy_gb_per_second": round(model_bytes / seconds / 1e9, 3),
            "per_rank_gb_per_second": [round(r["gb_per_second"], 3) for r in ranks]}


def summarise_refit(records: list[dict[str, Any]], bucket: int, preset: Any) -> dict[str, Any]:
    model_bytes = preset.parameter_count() * 4
    warm = [run_summary([r["warm"][i] for r in records], model_bytes) for i in range(len(records[0]["warm"]))]
    median = sorted(warm, key=lambda w: w["seconds"])[(len(warm) - 1) // 2]
    every = [run for r in records for run in (r["cold"], *r["warm"], r["warm_sampled"])]
    return {
        "bucket_bytes": bucket, "plan": records[0]["plan"],
        "transport": records[0]["transport"],
        "backend_weight_bytes_per_rank": records[0]["backend_weight_bytes"],
        "generation_weight_bytes_on_host": records[0]["host_weight_bytes"],
        "median_warm": median, "warm": warm, "cold": run_summary([r["cold"] for r in records], model_bytes),
        "warm_seconds_median": statistics.median(w["seconds"] for w in warm),
        "peak_extra_bytes_max_rank": int(max(run["peak_extra_bytes"] for run in every)),
        "rss_growth_bytes_max_rank": {"cold": int(max(r["cold"]["rss_growth_bytes"] for r in records)),
                                      "warm": int(max(r["warm_sampled"]["rss_growth_bytes"] for r in records))},
        "ru_maxrss_growth_bytes_max_rank": {"cold": int(max(r["cold"]["ru_maxrss_growth_bytes"] for r in records)),
                                            "warm": int(max(r["warm_sampled"]["ru_maxrss_growth_bytes"]
                                                            for r in records))},
    }


def speedups(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    checkpoint = result["checkpoint"]
    out = {}
    for size in args.generation_sizes:
        round_trip = checkpoint["save_seconds"] + checkpoint[f"tp{size}"]["load_seconds"]
        for transport, case in (("collective", "default_bucket"), ("shared", "shared")):
            refit = result["refit"][f"tp{size}_{case}"]["warm_seconds_median"]
            out[f"tp{size}_{transport}"] = {
                "refit_seconds": round(refit, 4), "checkpoint_save_plus_load_seconds": round(round_trip, 3),
                "speedup_over_checkpoint": round(round_trip / refit, 2),
                "speedup_over_load_alone": round(checkpoint[f"tp{size}"]["load_seconds"] / refit, 2),
                "meets_target": round_trip / refit >= TARGET_SPEEDUP}
    return out


def launch(args: argparse.Namespace, result_file: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           str(Path(__file__).resolve()),
           "--worker", "--result-file", str(result_file), "--preset", args.preset,
           "--train-tensor", str(args.train_tensor), "--train-pipeline", str(args.train_pipeline),
           "--generation-tensor", args.generation_tensor, "--small-bucket-mib", str(args.small_bucket_mib),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--rss-interval-ms", str(args.rss_interval_ms), "--seed", str(args.seed)]
    cmd += [x for o in args.model_override for x in ("--model-override", o)]
    cmd += ["--checkpoint-dir", str(args.checkpoint_dir or result_file.parent / "checkpoints")]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return run_child(cmd, f"refit on {args.nproc} ranks", REPO, env, result_file=result_file)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="keel-refit-bench-") as tmp:
        result = launch(args, Path(tmp) / "result.json")
    load_after = load_average()
    report = {
        "benchmark": "refit", "quick": args.quick, "machine": machine_info(), "versions": versions(),
        "shape": {"preset": args.preset, "model_overrides": args.model_override, "parameters": result["parameters"]},
        "dtype": "float32", "device": "cpu", "ranks": args.nproc, "backend": "gloo",
        "torch_threads_per_rank": result["torch_threads_per_rank"],
        "training_layout": f"TP{args.train_tensor} x PP{args.train_pipeline}",
        "generation_tensor_sizes": args.generation_sizes, "timed_warm_refits": args.repeats,
        "method": METHOD,
        "refit": result["refit"], "checkpoint": result["checkpoint"], "speedup": speedups(args, result),
        "target_speedup": TARGET_SPEEDUP,
        "launch": {k: result[k] for k in ("peak_rss_mib", "wall_s")},
        "load_average": {"before": load_before, "after": load_after,
                         "note": f"'after' includes this benchmark's own {args.nproc} ranks"},
        "machine_busy": machine_busy(load_before),
    }
    write_report(args.out, report)
    for name, s in report["speedup"].items():
        size, transport = name.split("_")
        refit = result["refit"][f"{size}_{'shared' if transport == 'shared' else 'default_bucket'}"]
        print(f"generation {size} {transport}: refit {s['refit_seconds']:.3f} s "
              f"({refit['median_warm']['refit_gb_per_second']:.2f} GB/s landed, peak extra "
              f"{refit['peak_extra_bytes_max_rank'] / 2**20:.0f} MiB, generation weights on the host "
              f"{refit['generation_weight_bytes_on_host'] / 2**20:.0f} MiB); checkpoint save+load "
              f"{s['checkpoint_save_plus_load_seconds']:.2f} s -> {s['speedup_over_checkpoint']}x "
              f"(target {TARGET_SPEEDUP:g}x); equal weights: {result['checkpoint'][size]['refit_equals_checkpoint_load']}")
    print(f"machine busy: {report['machine_busy']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
