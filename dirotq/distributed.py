"""Layer-sharded calibration and quantization under torch.distributed (``torchrun``).

Each process (rank) owns a cost-balanced set of shared-input groups. It runs the same 16-bit
pipeline on the same prompts as every other rank but records only its groups' statistics, then
builds the bases and GPTQ weights of only its groups on its own device, and writes them as its
part of the statistics folder and of the checkpoint; rank 0 writes the index. Since every rank sees
exactly the forwards a single process would, the result equals the single-process one bit for bit
(same device kind and thread count).

Optionally (``data_parallel=True``) the prompts are split across ranks instead and the moments are
all-reduced: every rank then records every group, ``world_size``× faster, equal to the
single-process statistics up to float64 summation order.

Nothing here schedules processes: ``torchrun --nproc-per-node N -m dirotq calibrate|quantize``
starts them and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``init_distributed`` reads those.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun worker with more than one process is set."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (idempotent); a single process gets ``DistInfo()``.

    backend: default ``nccl`` when CUDA is available, else ``gloo`` (CPU). device: default
    ``cuda:LOCAL_RANK`` on CUDA, else ``cpu``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if device is None:
        device = f"cuda:{local}" if cuda else "cpu"
    if world <= 1:
        return DistInfo(device=device)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but RANK / MASTER_ADDR are not set: start the processes with "
                           "`torchrun --nproc-per-node N -m dirotq ...`")
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=str(device))
    log.info("rank %d of %d on %s (%s backend)", info.rank, info.world_size, info.device, dist.get_backend())
    return info


def shutdown_distributed(clean: bool = True) -> bool:
    """Leave the process group explicitly, after every process has arrived when ``clean`` (the
    command succeeded here). A process that exits with the group alive, while another rank still
    writes its part, can be aborted by the backend's teardown (a gloo peer closing its
    connection: SIGABRT at exit). Returns whether there was a group to leave."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_worker(status: int) -> None:
    """End a torchrun worker that has left its process group with ``status``, without the
    interpreter's teardown: after a clean run, about one worker exit in 40 (2 gloo processes on a
    loaded 2-core machine) was still aborted by a C++ destructor at exit ("terminate called without
    an active exception", SIGABRT), failing a command whose work was done and written. Python's
    streams and log handlers are flushed first; every file the command wrote is closed by then."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(status)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def prompt_slice(n_prompts: int, info: DistInfo) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n_prompts`` (data-parallel calibration).

    Contiguous, so prompt j keeps its generator seed ``seed + j`` when the rank calibrates its
    slice with ``seed + lo``.
    """
    per, extra = divmod(n_prompts, info.world_size)
    lo = info.rank * per + min(info.rank, extra)
    return lo, lo + per + (1 if info.rank < extra else 0)


def allreduce_stats(stats: Any, info: DistInfo) -> Any:
    """Data-parallel calibration: every rank's ``CalibrationStats`` of the same groups over
    different prompts -> the statistics of all prompts, on every rank (in place, returned).

    Moments and counts are summed, abs-max maximised (exact up to float64 summation order);
    token samples are merged as ``LayerStats.merge`` does (bottom-m keys of the union), which is a
    uniform sample of the union because each rank's key stream is seeded differently.
    """
    if not info.distributed:
        return stats
    import torch.distributed as dist

    for key in sorted(stats.layers):  # the same order on every rank
        st = stats.layers[key]
        for name in ("second_moment", "sum", "sum_sq", "sum_4th"):
            t = getattr(st, name)
            buf = t.to(info.device) if info.device != str(t.device) else t
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            setattr(st, name, buf.to(t.device))
        buf = st.abs_max.to(info.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        st.abs_max = buf.to(st.second_moment.device)
        parts = gather_objects((st.count, st.sample_seen, st.sample.cpu(), st.sample_keys.cpu()), info)
        st.count = sum(p[0] for p in parts)
        st.sample_seen = sum(p[1] for p in parts)
        keys = torch.cat([p[3] for p in parts])
        rows = torch.cat([p[2] for p in parts])
        m = min(st.sample_tokens, keys.numel())
        sel = torch.topk(keys, m, largest=False).indices.sort().values
        st.sample, st.sample_keys = rows[sel].contiguous(), keys[sel].contiguous()
    return stats


# ----------------------------------------------------------------------------------- sharding
def group_costs(targets: Mapping[str, Any]) -> dict[str, float]:
    """Work of each shared-input group, in float64 FLOPs: one d×d eigendecomposition (≈ 9 d³) and
    GPTQ over its members' rows (≈ 2 Σo · d²) plus the statistics accumulation, which is
    proportional to d² per token and so is covered by the d² term's share.

    targets: name -> TargetSpec (``group``, ``in_features``, ``out_features``). Returns
    group key -> cost, in the targets' order of first appearance.
    """
    rows: dict[str, int] = {}
    width: dict[str, int] = {}
    for spec in targets.values():
        rows[spec.group] = rows.get(spec.group, 0) + int(spec.out_features)
        width[spec.group] = int(spec.in_features)
    return {g: 9.0 * width[g] ** 3 + 2.0 * rows[g] * width[g] ** 2 for g in rows}


def assign_groups(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Split groups over ``world_size`` ranks so the largest per-rank cost is small.

    Longest processing time first: groups by decreasing cost, each to the least-loaded rank
    (ties: the lower rank; equal costs keep their input order), so the result is a deterministic
    function of the inputs: every rank computes the same assignment without communicating. The
    largest load is at most 4/3 of the optimum. Each rank's list keeps the input order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    order = {g: i for i, g in enumerate(costs)}
    loads = [0.0] * world_size
    owner: dict[str, int] = {}
    for g in sorted(costs, key=lambda g: (-float(costs[g]), order[g])):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[g] = r
        loads[r] += float(costs[g])
    return [[g for g in costs if owner[g] == r] for r in range(world_size)]


def stats_bytes(width: int, sample_tokens: int = 512) -> int:
    """Bytes one group's statistics hold while recording: the float64 (d, d) second moment, four
    float64 (d,) channel vectors and the float32 (sample_tokens, d) token sample."""
    return 8 * width * width + 4 * 8 * width + 4 * sample_tokens * width


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def split_by_memory(widths: Mapping[str, int], budget_bytes: float, sample_tokens: int = 512) -> list[list[str]]:
    """Groups (key -> input width) split into passes whose statistics fit ``budget_bytes`` each.

    First fit in decreasing size over as few passes as that gives (each pass is one run of the
    pipeline over every prompt, so fewer passes is faster); each pass keeps the input order.
    Raises ValueError when one group alone exceeds the budget.
    """
    size = {g: stats_bytes(int(w), sample_tokens) for g, w in widths.items()}
    too_big = [g for g, b in size.items() if b > budget_bytes]
    if too_big:
        g = too_big[0]
        raise ValueError(f"the statistics of group {g!r} (width {widths[g]}) take {_human(size[g])}, more than "
                         f"the budget of {_human(budget_bytes)}: raise the budget")
    passes: list[list[str]] = []
    free: list[float] = []
    for g in sorted(size, key=lambda g: -size[g]):
        k = next((i for i, f in enumerate(free) if size[g] <= f), None)
        if k is None:
            passes.append([])
            free.append(float(budget_bytes))
            k = len(passes) - 1
        passes[k].append(g)
        free[k] -= size[g]
    order = {g: i for i, g in enumerate(widths)}
    return [sorted(p, key=order.get) for p in passes]


def _restrict(targets: Mapping[str, Any], layers: Sequence[str] | None) -> Mapping[str, Any]:
    """``targets`` limited to the names in ``layers`` (all when None), in the targets' order."""
    if layers is None:
        return targets
    keep = set(layers)
    return {n: s for n, s in targets.items() if n in keep}


def plan_calibration(targets: Mapping[str, Any], info: DistInfo, *, max_stats_bytes: float | None = None,
                     layers: Sequence[str] | None = None, sample_tokens: int = 512) -> list[list[str]]:
    """The passes this rank runs: lists of group keys, each recorded by one run of the pipeline.

    Groups (of ``layers``' targets, default all) are split over ranks by ``assign_groups``, then
    this rank's share into passes of at most ``max_stats_bytes`` of statistics (one pass when
    None). A rank that owns nothing runs no pass.
    """
    targets = _restrict(targets, layers)
    widths = {s.group: int(s.in_features) for s in targets.values()}
    mine = assign_groups(group_costs(targets), info.world_size)[info.rank] if info.distributed else list(widths)
    if not mine:
        return []
    if max_stats_bytes is None:
        return [mine]
    return split_by_memory({g: widths[g] for g in mine}, max_stats_bytes, sample_tokens)


def owned_targets(targets: Mapping[str, Any], info: DistInfo, layers: Sequence[str] | None = None) -> list[str]:
    """The target names whose groups this rank owns (all of them in a single process).

    layers: restrict to these target names first (``--layers``).
    """
    targets = _restrict(targets, layers)
    if not info.distributed:
        return list(targets)
    mine = set(assign_groups(group_costs(targets), info.world_size)[info.rank])
    return [n for n, s in targets.items() if s.group in mine]


def select_layers(targets: Mapping[str, Any], patterns: str | Sequence[str] | None) -> list[str] | None:
    """Target names matching ``patterns`` (comma-separated text or a list): exact names, layer types
    (``attn1.to_q``) or shell globs (``transformer_blocks.1*.ff.*``). None: all.

    Raises ValueError naming a pattern that matches nothing (with close names).
    """
    import difflib
    import fnmatch

    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise ValueError("--layers is empty: give target names, layer types or globs, comma-separated")
    chosen: dict[str, None] = {}
    for pat in patterns:
        hits = [n for n, s in targets.items()
                if n == pat or s.layer_type == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, list(targets), n=3, cutoff=0.5)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"--layers {pat!r} matches no target{hint}; `python -m dirotq quantize --dry-run` "
                             "lists them")
        chosen.update(dict.fromkeys(hits))
    return [n for n in targets if n in chosen]


__all__ = ["DistInfo", "init_distributed", "launched_by_torchrun", "barrier", "shutdown_distributed", "exit_worker",
           "gather_objects", "broadcast_object", "prompt_slice", "allreduce_stats", "stats_bytes", "split_by_memory", "plan_calibration",
           "group_costs", "assign_groups", "owned_targets", "select_layers", "quantize_sharded"]


# ------------------------------------------------------------------------------ orchestration
def quantize_sharded(transformer: Any, config: Any, stats: Any, folder: str | os.PathLike, info: DistInfo, *,
                     layers: Sequence[str] | None = None, max_shard_size: int | str | None = None,
                     **quantize_kw: Any) -> dict:
    """Quantize this rank's share of the targets and write it as its part of the checkpoint at
    ``folder``; rank 0 also writes every non-target tensor, then the index and config.json.

    Every rank holds the whole 16-bit transformer (the forward needs it anyway); only its own
    groups are quantized, so the eigendecompositions and GPTQ run once per group across ranks.
    Returns this rank's ``quantize_`` report (``{"layers": {}}`` for a rank that owns nothing).
    """
    from .checkpoint import finalize_checkpoint, save_quantized_part
    from .models import get_adapter
    from .quantize import quantize_

    adapter = quantize_kw.pop("adapter", None) or get_adapter(transformer)
    targets = adapter.targets(transformer)
    mine = owned_targets(targets, info, layers)
    log.info("rank %d quantizes %d of %d targets", info.rank, len(mine), len(targets) if layers is None else len(layers))
    from .config import KINDS

    report: dict = {"layers": {}, "summary": {"layers": 0, **{k: 0 for k in KINDS}}}
    if mine:
        report = quantize_(transformer, config, stats, adapter=adapter, targets=mine, **quantize_kw)
    everyone = gather_objects(mine, info)
    others = [n for r, names in enumerate(everyone) if r != info.rank for n in names]
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    manifest = save_quantized_part(transformer, folder, targets=mine, include_rest=info.is_main,
                                   part=info.rank, parts=info.world_size,
                                   quantized_elsewhere=others if info.is_main else (), **kw)
    manifests = gather_objects(manifest, info)
    if info.is_main:
        finalize_checkpoint(transformer, folder, manifests)
    barrier(info)
    return report
