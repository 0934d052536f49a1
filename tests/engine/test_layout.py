"""Invalid layouts fail with one readable message before any process group exists."""

from __future__ import annotations

import pytest

from engine.config import ParallelConfig, TrainConfig, load_config
from engine.models.presets import PRESETS, resolve_preset
from engine.parallel.layout import LayoutError, ParallelLayout, _first_slurm_host, read_launch_env


def _validate(world: int, *overrides: str) -> None:
    load_config(TrainConfig, None, list(overrides)).validate(world)


def test_world_size_not_a_product() -> None:
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by parallel.tensor \(4\) x parallel.pipeline \(1\)"):
        _validate(6, "parallel.tensor=4")
    with pytest.raises(LayoutError, match=r"world size 4 != parallel.tensor \(2\) x parallel.pipeline \(1\) x parallel.data \(1\)"):
        _validate(4, "parallel.tensor=2", "parallel.data=1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor=3"], r"num_attention_heads=4 is not divisible by parallel.tensor=3"),
        (["parallel.tensor=4"], r"num_query_groups \(KV heads\)=2 is not divisible by parallel.tensor=4"),
        (["parallel.tensor=2", "model.vocab_size=511"], r"vocab_size=511 is not divisible by parallel.tensor=2"),
        (["parallel.pipeline=3"], r"num_layers=4 is not divisible by parallel.pipeline=3"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=4"],
         r"num_layers=4 is not divisible by parallel.pipeline x parallel.virtual_pipeline=8"),
    ],
)
def test_model_shape_not_divisible(overrides: list[str], message: str) -> None:
    extra: list[str] = []
    world = 1
    for item in overrides:
        if item.startswith(("parallel.tensor=", "parallel.pipeline=")):
            world *= int(item.split("=")[1])
    with pytest.raises(LayoutError, match=message):
        _validate(world, *overrides, *extra)


def test_micro_batches_incompatible() -> None:
    with pytest.raises(LayoutError, match=r"global_batch_size=10 is not divisible by data.micro_batch_size \(2\) x data-parallel size \(2\)"):
        _validate(2, "data.global_batch_size=10")
    with pytest.raises(LayoutError, match=r"interleaved pipeline schedule needs the number of micro-batches \(3\)"):
        _validate(2, "parallel.pipeline=2", "parallel.virtual_pipeline=2", "data.global_batch_size=6")
    with pytest.raises(LayoutError, match=r"sequence_parallel needs data.seq_length \(127\) divisible by parallel.tensor \(2\)"):
        _validate(2, "parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_length=127")


def test_sequence_longer_than_model() -> None:
    with pytest.raises(Exception, match=r"data.seq_length=512 exceeds the model's max_sequence_length=256"):
        _validate(1, "data.seq_length=512")


def test_layout_describe_and_data_derivation() -> None:
    layout = ParallelLayout.from_config(ParallelConfig(tensor=2, pipeline=2, virtual_pipeline=2, distributed_optimizer=True), 8)
    assert layout.data == 2 and layout.world_size == 8
    assert layout.describe() == "TP2×PP2×DP2+VP2+dist-opt"


def test_launch_env_from_torchrun_and_slurm() -> None:
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (3, 4, 1, "h0", "torchrun")
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "77"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "gpu003", "slurm")
    assert env.master_port == 20077
    assert _first_slurm_host("login1,gpu[7,9]") == "login1"
    assert read_launch_env({}).launcher == "single"


def test_a_one_rank_world_meets_in_memory_without_a_port() -> None:
    """A port probed free and bound later can be taken in between (EADDRINUSE when tests run side by side)."""
    import datetime

    from engine.parallel.layout import rendezvous_store

    store = rendezvous_store(read_launch_env({}), datetime.timedelta(seconds=5))
    store.set("probe", "1")
    assert store.get("probe") == b"1"
    assert read_launch_env({"MASTER_PORT": "1"}).master_port == 0  # nothing listens, so no port is named


def test_the_test_launcher_retries_only_a_first_rendezvous_that_could_not_bind() -> None:
    from tests.helpers import _store_port_taken, ephemeral_ports, free_port

    low, high = ephemeral_ports()
    if low > 15001:
        assert all(free_port() < low for _ in range(20))  # outside the range connections draw from
    first = "in _invoke_run\n in _initialize_workers\n in _rendezvous\n TCPStore(... EADDRINUSE"
    assert _store_port_taken(first)
    assert not _store_port_taken("in _restart_workers\n" + first)  # workers had run: not a clean retry
    assert not _store_port_taken("ValueError: bad config")


def test_presets_published_shapes() -> None:
    assert resolve_preset(load_config(TrainConfig, None, ["model.preset=llama3-70b"]).model).num_layers == 80
    nemotron = PRESETS["nemotron4-340b"]
    assert (nemotron.num_layers, nemotron.hidden_size, nemotron.num_attention_heads, nemotron.num_query_groups,
            nemotron.ffn_hidden_size, nemotron.vocab_size) == (96, 18432, 96, 8, 73728, 256000)
    assert abs(nemotron.parameter_count() / 341e9 - 1) < 0.01
    assert PRESETS["tiny-nemotron"].activation == "squared_relu" and not PRESETS["tiny-nemotron"].tie_embeddings
    with pytest.raises(Exception, match=r"model.preset='gpt5' is unknown"):
        _validate(1, "model.preset=gpt5")


def test_nccl_without_cuda_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """parallel.backend=nccl on a machine without GPUs was a RuntimeError traceback from torch.distributed."""
    import torch

    from engine.errors import ConfigError
    from tests.helpers import single_process_parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^parallel.backend=nccl needs CUDA GPUs .* use parallel.backend=auto"):
        with single_process_parallel(backend="nccl"):
            pass
