"""Training layout → generation layout weight resharding: plan, execute, transport.

**Plan** (computed once per pair of models, printable). Both models describe their
shards the way checkpoints do, through megatron's ``sharded_state_dict``: each local
tensor is a box (offset, shape) of a *global*, layout-independent tensor under a key.
That global form already accounts for fused QKV with grouped KV heads (rows grouped per
query group, so a TP split is a contiguous run of groups), SwiGLU's fused ``[gate; up]``
(two boxes per rank, one in each half), the vocabulary-parallel embedding and output
layer, tied embeddings, and the pipeline (layers stacked on a leading axis). Every rank
gathers both descriptions once; the plan intersects each generation box with the
training boxes of the same key and picks, per piece, a source rank among the replicas
that hold it: the destination itself when it can (an in-process copy), else the
least-loaded holder.

**Execute** walks the plan in buckets of whole generation parameters whose bytes stay
under ``bucket_bytes`` (one parameter larger than that is a bucket of its own). In a
bucket each rank posts its sends and receives, copies its in-process pieces, assembles
each generation parameter it owns and hands it to the backend's ``update_weights``. A
backend that exposes its weights is written in place, so only slices that are not
contiguous (column ranges of row-parallel weights) need a buffer. Peak extra memory is
the buffers of one bucket; it is measured and reported.

**Transport** (``transport``): ``collective`` is :func:`exchange_pieces`, point-to-point
sends and receives over the world group (gloo on CPU, NCCL on GPU), one tag per piece of a
bucket. ``shared``, for ranks on one host with weights in host memory, keeps one copy of the
generation weights per generation TP rank in shared memory
(:mod:`engine.generation.host_shared`): the plan then targets those copies instead of
ranks, each piece is written once, in-process, by a rank that holds it, and nothing is sent.
``auto`` (the default) takes ``shared`` where it applies.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) in the global tensor's coordinates


@dataclass(frozen=True)
class Shard:
    """One local tensor of one rank, as a box of a global tensor."""

    key: str
    rank: int
    box: Box
    prepend: int  # leading axes of the global tensor that the local tensor does not have (size 1 in the box)
    index: int  # position of the local tensor in its rank's shard list
    param: str = ""  # generation side: the parameter the tensor is a row range of
    row_start: int = 0


@dataclass(frozen=True)
class Piece:
    """A region of a global tensor that ``src`` sends and ``dst`` writes into parameter ``param``."""

    key: str
    src: int
    src_index: int
    src_slices: tuple[tuple[int, int], ...]  # per local dim of the source tensor
    dst: int
    param: str
    dst_slices: tuple[tuple[int, int], ...]  # per dim of the destination parameter
    numel: int
    region: Box = ((), ())  # the piece in the global tensor's coordinates
    group: int = -1  # shared transport: the generation TP rank whose host-shared copy ``param`` is in


@dataclass
class ReshardPlan:
    """Pieces grouped into buckets of whole generation parameters."""

    buckets: list[list[Piece]]
    bucket_bytes: int
    element_size: int
    stats: dict[str, float] = field(default_factory=dict)

    def pieces(self) -> Iterator[Piece]:
        for bucket in self.buckets:
            yield from bucket

    def describe(self, limit: int = 40) -> str:
        """A readable table: per piece, which rank sends which slice to which rank's parameter."""
        pieces = list(self.pieces())
        moved = sum(p.numel for p in pieces if p.src != p.dst)
        local = sum(p.numel for p in pieces if p.src == p.dst)
        lines = [f"reshard plan: {len(pieces)} pieces in {len(self.buckets)} buckets (<= {self.bucket_bytes} B), "
                 f"{moved * self.element_size / 2**20:.1f} MiB sent between ranks, "
                 f"{local * self.element_size / 2**20:.1f} MiB copied in-process"]
        for piece in pieces[:limit]:
            region = ",".join(f"{o}:{o + n}" for o, n in zip(*piece.region, strict=True))
            dst = ",".join(f"{a}:{b}" for a, b in piece.dst_slices)
            where = f"shared copy of TP rank {piece.group}" if piece.group >= 0 else f"rank {piece.dst}"
            lines.append(f"  {piece.key}[{region}]  rank {piece.src} -> {where}  {piece.param}[{dst}]")
        if len(pieces) > limit:
            lines.append(f"  ... {len(pieces) - limit} more")
        return "\n".join(lines)


def _sharded_tensors(model: Any) -> Iterator[Any]:
    from engine.models.init import _iter_sharded_tensors

    module = getattr(model, "module", model)
    for sharded in _iter_sharded_tensors(module.sharded_state_dict()):
        if isinstance(sharded.data, torch.Tensor):
            yield sharded


def _box(sharded: Any) -> Box:
    prepend = sharded.prepend_axis_num
    offset = tuple(sharded.global_offset)
    shape = (1,) * prepend + tuple(sharded.local_shape)
    return offset, shape


def local_shards(chunks: list[Any], rank: int) -> tuple[list[Shard], list[torch.Tensor]]:
    """(descriptions, tensors) of a training model's local shards (every chunk of this rank)."""
    shards: list[Shard] = []
    tensors: list[torch.Tensor] = []
    for chunk in chunks:
        for sharded in _sharded_tensors(chunk):
            shards.append(Shard(sharded.key, rank, _box(sharded), sharded.prepend_axis_num, len(tensors)))
            tensors.append(sharded.data)
    return shards, tensors


def generation_shards(model: Any, rank: int) -> list[Shard]:
    """Descriptions of a generation model's local shards, each tied to the parameter rows it views."""
    params = {id(param): (name, param) for name, param in model.named_parameters()}
    shards: list[Shard] = []
    for sharded in _sharded_tensors(model):
        data = sharded.data
        base = data if data._base is None else data._base  # SwiGLU's gate and up are views of fc1
        name, param = params[id(base)]
        offset = data.storage_offset() - param.storage_offset()
        if not data.is_contiguous() or tuple(data.shape[1:]) != tuple(param.shape[1:]) or offset % max(param.stride(0), 1):
            raise NotImplementedError(f"{sharded.key}: the generation tensor is not a row range of {name}")
        row_start = offset // param.stride(0) if param.dim() > 1 else offset
        shards.append(Shard(sharded.key, rank, _box(sharded), sharded.prepend_axis_num, len(shards), name, row_start))
    return shards


def _intersect(a: Box, b: Box) -> Box | None:
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    hi = tuple(min(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1], strict=True))
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi, strict=True))


def _local_slices(region: Box, box: Box, prepend: int, row_start: int = 0) -> tuple[tuple[int, int], ...]:
    """``region`` in the coordinates of the local tensor that holds ``box`` (prepended axes dropped)."""
    slices = []
    for dim in range(prepend, len(box[0])):
        start = region[0][dim] - box[0][dim] + (row_start if dim == prepend else 0)
        slices.append((start, start + region[1][dim]))
    return tuple(slices)


def build_plan(train: list[Shard], gen: list[Shard], bucket_bytes: int, element_size: int) -> ReshardPlan:
    """Every generation box covered by pieces of training boxes (see the module docstring)."""
    sources: dict[str, dict[Box, list[Shard]]] = {}
    for shard in train:
        sources.setdefault(shard.key, {}).setdefault(shard.box, []).append(shard)
    load: dict[int, int] = {}
    by_param: dict[str, list[Piece]] = {}
    for target in sorted(gen, key=lambda s: (s.param, s.rank, s.box)):
        covered = 0
        for box, holders in sorted(sources.get(target.key, {}).items()):
            region = _intersect(box, target.box)
            if region is None:
                continue
            numel = int(torch.tensor(region[1]).prod())
            same = [h for h in holders if h.rank == target.rank]
            src = same[0] if same else min(holders, key=lambda h: (load.get(h.rank, 0), h.rank))
            load[src.rank] = load.get(src.rank, 0) + numel * (src.rank != target.rank)
            by_param.setdefault(target.param, []).append(Piece(
                target.key, src.rank, src.index, _local_slices(region, box, src.prepend), target.rank, target.param,
                _local_slices(region, target.box, target.prepend, target.row_start), numel, region))
            covered += numel
        if covered != int(torch.tensor(target.box[1]).prod()):
            raise ValueError(f"reshard: {target.key} box {target.box} of rank {target.rank} is not covered by the "
                             f"training shards ({covered} elements found); the two models differ")
    buckets: list[list[Piece]] = [[]]
    size = 0
    for name in sorted(by_param):
        pieces = by_param[name]
        nbytes = sum(p.numel for p in pieces) * element_size
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].extend(pieces)
        size += nbytes
    return ReshardPlan(buckets, bucket_bytes, element_size)


def _view(tensor: torch.Tensor, slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return tensor[tuple(slice(a, b) for a, b in slices)]


def exchange_pieces(sends: list[tuple[torch.Tensor, int, int]], receives: list[tuple[torch.Tensor, int, int]]) -> None:
    """Transport: post every (tensor, peer rank, tag) send and receive of a bucket, then wait for all."""
    ops = [dist.P2POp(dist.isend, tensor, peer, tag=tag) for tensor, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer, tag=tag) for tensor, peer, tag in receives]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def shared_targets(gen: list[Shard], groups: list[int]) -> list[Shard]:
    """Shared transport: the generation shards of one rank per generation TP rank ``t`` (``groups[rank]``),
    relabelled as the virtual rank ``-1 - t`` so that no training rank is "the destination itself"."""
    first = {group: groups.index(group) for group in set(groups)}
    return [dataclasses.replace(s, rank=-1 - groups[s.rank]) for s in gen if first[groups[s.rank]] == s.rank]


def writer_plan(plan: ReshardPlan) -> ReshardPlan:
    """Shared transport: every piece aimed at a virtual rank is written in-process by its source rank."""
    plan.buckets = [[dataclasses.replace(p, dst=p.src, group=-1 - p.dst) for p in bucket] for bucket in plan.buckets]
    return plan


def make_plan(train: list[Shard], gen: list[Shard], groups: list[int], bucket_bytes: int, element_size: int,
              shared: bool) -> ReshardPlan:
    """The plan over every rank's shards; ``groups[rank]`` is a rank's generation TP rank (used when ``shared``)."""
    start = time.perf_counter()
    plan = build_plan(train, shared_targets(gen, groups) if shared else gen, bucket_bytes, element_size)
    if shared:
        plan = writer_plan(plan)
    plan.stats["plan_seconds"] = time.perf_counter() - start
    return plan


class Resharder:
    """Moves a training model's weights into a generation backend, every iteration, by a plan made once.

    Collective: every rank of the world constructs it and calls :meth:`reshard` together.
    ``transport`` is ``auto``, ``collective`` or ``shared`` (see the module docstring).
    """

    def __init__(self, train_chunks: list[Any], backend: Any, bucket_bytes: int = 64 * 2**20,
                 transport: str = "auto"):
        from engine.generation.host_shared import open_host_shared

        rank = dist.get_rank() if dist.is_initialized() else 0
        train, self.train_tensors = local_shards(train_chunks, rank)
        gen = generation_shards(backend.model, rank)  # before the weights may be rebound to shared views
        self.shared = open_host_shared(backend, transport)
        groups = [self.shared.tp_rank if self.shared else 0]
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (train, gen, groups[0]))
            train = [s for part, _, _ in gathered for s in part]
            gen = [s for _, part, _ in gathered for s in part]
            groups = [group for _, _, group in gathered]
        element_size = self.train_tensors[0].element_size() if self.train_tensors else 4
        self.plan = make_plan(train, gen, groups, bucket_bytes, element_size, self.shared is not None)
        self.transport = "shared" if self.shared else "collective"
        self.backend = backend
        self.rank = rank
        logger.info("%s (transport: %s)", self.plan.describe(limit=0).splitlines()[0], self.transport)

    @torch.no_grad()
    def reshard(self) -> dict[str, float]:
        """Execute the plan; returns seconds, bytes sent/received/copied, peak extra bytes and GB/s."""
        start = time.perf_counter()
        totals = {"sent_bytes": 0.0, "received_bytes": 0.0, "copied_bytes": 0.0, "peak_extra_bytes": 0.0}
        if self.shared:
            self._run_shared(totals)
        else:
            for bucket in self.plan.buckets:
                extra = self._run_bucket(bucket, totals)
                totals["peak_extra_bytes"] = max(totals["peak_extra_bytes"], float(extra))
        seconds = time.perf_counter() - start
        moved = totals["received_bytes"] + totals["copied_bytes"]
        return {**totals, "seconds": seconds, "gb_per_second": moved / max(seconds, 1e-9) / 1e9}

    def _run_shared(self, totals: dict[str, float]) -> None:
        """Shared transport: a barrier (no replica still reads the old weights), this rank's writes, a barrier."""
        assert self.shared is not None
        dist.barrier()
        for piece in self.plan.pieces():
            if piece.src == self.rank:
                source = _view(self.train_tensors[piece.src_index], piece.src_slices)
                _view(self.shared.views[piece.group][piece.param], piece.dst_slices).copy_(source)
                totals["copied_bytes"] += source.numel() * source.element_size()
        dist.barrier()
        self.backend.update_weights(self.backend.weights_in_place().items())

    def _run_bucket(self, bucket: list[Piece], totals: dict[str, float]) -> int:
        """One bucket: sends, receives and in-process copies; returns the extra bytes it allocated.

        A backend that exposes its weights (``weights_in_place()``, the native backend) is written
        directly: contiguous destination slices receive in place and only non-contiguous ones (a
        column range of a row-parallel weight) go through a buffer. Contiguous sources are sent as
        they are.
        """
        in_place = getattr(self.backend, "weights_in_place", None)
        params = in_place() if in_place is not None else self.backend.params
        targets: dict[str, torch.Tensor] = {}
        for piece in bucket:
            if piece.dst == self.rank and piece.param not in targets:
                targets[piece.param] = params[piece.param] if in_place is not None else torch.empty_like(params[piece.param])
        extra = 0 if in_place is not None else sum(t.numel() * t.element_size() for t in targets.values())
        sends, receives, pending = [], [], []
        for tag, piece in enumerate(bucket):
            if piece.src == self.rank:
                source = _view(self.train_tensors[piece.src_index], piece.src_slices)
                if piece.dst == self.rank:
                    _view(targets[piece.param], piece.dst_slices).copy_(source)
                    totals["copied_bytes"] += source.numel() * source.element_size()
                    continue
                dtype = params[piece.param].dtype
                buffer = source if source.is_contiguous() and source.dtype == dtype else source.to(dtype).contiguous()
                extra += 0 if buffer is source else buffer.numel() * buffer.element_size()
                sends.append((buffer, piece.dst, tag))
                totals["sent_bytes"] += buffer.numel() * buffer.element_size()
            elif piece.dst == self.rank:
                target = _view(targets[piece.param], piece.dst_slices)
                buffer = target if target.is_contiguous() else torch.empty(target.shape, dtype=target.dtype,
                                                                           device=target.device)
                if buffer is not target:
                    pending.append((target, buffer))
                    extra += buffer.numel() * buffer.element_size()
                receives.append((buffer, piece.src, tag))
                totals["received_bytes"] += buffer.numel() * buffer.element_size()
        exchange_pieces(sends, receives)
        for target, buffer in pending:
            target.copy_(buffer)
        self.backend.update_weights(targets.items())
        return extra
