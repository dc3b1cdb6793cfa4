"""Layer sharding for torchrun (dirotq.distributed): the pure parts here; the 2-process gloo runs
against a single process are in the tests below them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dirotq.distributed import DistInfo, assign_groups, group_costs, owned_targets, select_layers
from dirotq.models import get_adapter


def _flux_targets():
    from dirotq.models.flux import FluxAdapter

    model = FluxAdapter().build_tiny()
    return get_adapter(model).targets(model)


def test_assignment_is_a_partition_balanced_within_lpt_bound():
    costs = {f"g{i}": float(c) for i, c in enumerate([9, 7, 7, 5, 4, 4, 3, 2, 2, 1])}
    for world in (1, 2, 3, 4):
        parts = assign_groups(costs, world)
        flat = [g for p in parts for g in p]
        assert sorted(flat) == sorted(costs) and len(flat) == len(set(flat))
        loads = [sum(costs[g] for g in p) for p in parts]
        # exhaustive optimum of the makespan for this small instance
        best = min(max(sum(costs[g] for g, r in zip(costs, lab) if r == k) for k in range(world))
                   for lab in itertools.product(range(world), repeat=len(costs))) if world <= 3 else None
        if best is not None:
            assert max(loads) <= 4 / 3 * best + 1e-9
        # each rank keeps the input order
        for p in parts:
            assert p == [g for g in costs if g in p]


def test_assignment_is_deterministic_and_spreads_the_widest_groups():
    targets = _flux_targets()
    costs = group_costs(targets)
    assert set(costs) == {s.group for s in targets.values()}
    a, b = assign_groups(costs, 2), assign_groups(dict(costs), 2)
    assert a == b
    widest = sorted(costs, key=costs.get, reverse=True)[:2]
    assert {r for r, p in enumerate(a) for g in widest if g in p} == {0, 1}


def test_owned_targets_cover_every_target_once_and_keep_groups_whole():
    targets = _flux_targets()
    owned = [owned_targets(targets, DistInfo(rank=r, world_size=3)) for r in range(3)]
    flat = [n for o in owned for n in o]
    assert sorted(flat) == sorted(targets) and len(flat) == len(set(flat))
    for o in owned:
        groups = {targets[n].group for n in o}
        assert set(o) == {n for n, s in targets.items() if s.group in groups}
    assert owned_targets(targets, DistInfo()) == list(targets)


def test_select_layers_names_types_globs_and_bad_input():
    targets = _flux_targets()
    name = next(iter(targets))
    assert select_layers(targets, None) is None
    assert select_layers(targets, name) == [name]
    by_type = select_layers(targets, "single:proj_out")
    assert by_type and all(targets[n].layer_type == "single:proj_out" for n in by_type)
    glob = select_layers(targets, "transformer_blocks.0.*")
    assert glob and all(n.startswith("transformer_blocks.0.") for n in glob)
    assert select_layers(targets, f"{name}, {name}") == [name]
    with pytest.raises(ValueError, match="matches no target"):
        select_layers(targets, "transformer_blocks.0.attn.to_qq")
    with pytest.raises(ValueError, match="empty"):
        select_layers(targets, " , ")


def test_split_by_memory_fits_each_pass_and_refuses_a_group_over_budget():
    from dirotq.distributed import split_by_memory, stats_bytes

    widths = {f"g{i}": w for i, w in enumerate([3072] * 6 + [12288] * 2 + [15360] * 2)}
    budget = 4 * 2**30
    passes = split_by_memory(widths, budget)
    assert sorted(g for p in passes for g in p) == sorted(widths)
    assert all(sum(stats_bytes(widths[g]) for g in p) <= budget for p in passes)
    total = sum(stats_bytes(w) for w in widths.values())
    assert len(passes) < 2 * total / budget + 1  # first fit decreasing: never more than twice the bound
    assert split_by_memory(widths, 10 * total) == [list(widths)]
    with pytest.raises(ValueError, match="raise the budget"):
        split_by_memory(widths, 1 * 2**30)


def test_plan_calibration_shards_then_splits_by_memory():
    from dirotq.distributed import plan_calibration, stats_bytes

    targets = _flux_targets()
    groups = {s.group for s in targets.values()}
    single = plan_calibration(targets, DistInfo())
    assert len(single) == 1 and set(single[0]) == groups
    ranks = [plan_calibration(targets, DistInfo(rank=r, world_size=2)) for r in range(2)]
    flat = [g for plan in ranks for p in plan for g in p]
    assert sorted(flat) == sorted(groups)
    budget = 2 * stats_bytes(320)  # the widest tiny group is 320 wide
    passes = plan_calibration(targets, DistInfo(), max_stats_bytes=budget)
    assert len(passes) > 1 and sorted(g for p in passes for g in p) == sorted(groups)
    only = plan_calibration(targets, DistInfo(), layers=["single_transformer_blocks.0.attn.to_k"])
    assert only == [["single_transformer_blocks.0.proj_mlp"]]  # the group of the named layer
    many = [plan_calibration(targets, DistInfo(rank=r, world_size=len(groups) + 3)) for r in range(len(groups) + 3)]
    assert sum(1 for p in many if not p) == 3  # more ranks than groups: the extra ranks run nothing


# ------------------------------------------------------------------ torchrun, 2 gloo processes
REPO = Path(__file__).resolve().parent.parent


def _dirotq(args: list[str], nproc: int | None = None, cwd: Path | None = None):
    """``python -m dirotq ARGS`` (or under torchrun with ``nproc`` CPU processes, gloo), one
    thread per process so the single process sums in the same order as each rank."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc else [sys.executable])
    r = subprocess.run([*launcher, "-m", "dirotq", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    root = tmp_path_factory.mktemp("dist")
    build_tiny_pixart_pipeline(seed=0).save_pretrained(root / "tiny-pixart")
    (root / "calib.txt").write_text("a red circle\na green star on the left\ntwo blue squares\n")
    return root


def _only_stats_folder(parent):
    folders = [p for p in parent.iterdir() if (p / "meta.json").is_file()]
    assert len(folders) == 1, folders
    return folders[0]


def _assert_same_stats(a, b):
    import torch

    assert sorted(a.layers) == sorted(b.layers) and a.groups == b.groups
    for key in a.layers:
        x, y = a.layers[key], b.layers[key]
        assert x.count == y.count and x.sample_seen == y.sample_seen, key
        for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th", "sample", "sample_keys"):
            assert torch.equal(getattr(x, f), getattr(y, f)), (key, f)


def test_two_process_torchrun_calibration_and_quantization_equal_one_process(tiny_folder):
    import json

    import torch

    from dirotq.calibration import CalibrationStats
    from dirotq.checkpoint import load_quantized

    root = tiny_folder
    common = ["--model", str(root / "tiny-pixart"), "--steps", "2"]
    cal = [*common, "--prompts", str(root / "calib.txt")]
    _dirotq(["calibrate", *cal, "--out", str(root / "one" / "cal")])
    _dirotq(["calibrate", *cal, "--out", str(root / "two" / "cal")], nproc=2)
    # a single process in passes of at most ~2 groups' worth of statistics (the widest tiny group,
    # 256 wide, holds 1.06 MB with its 512-token sample): the same numbers
    _dirotq(["calibrate", *cal, "--max-stats-memory", "1.5MB", "--out", str(root / "passes" / "cal")])
    one = _only_stats_folder(root / "one" / "cal")
    two = _only_stats_folder(root / "two" / "cal")
    assert one.name == two.name  # the same cache key: quantize / evaluate find it either way
    s1, s2 = CalibrationStats.load(one), CalibrationStats.load(two)
    _assert_same_stats(s1, s2)
    passes = _only_stats_folder(root / "passes" / "cal")
    assert len(json.loads((passes / "meta.json").read_text())["meta"]["parts"]) > 2
    _assert_same_stats(s1, CalibrationStats.load(passes))

    # data-parallel: the prompts split over the 2 processes, moments all-reduced
    _dirotq(["calibrate", *cal, "--data-parallel", "--out", str(root / "dp" / "cal")], nproc=2)
    dp = CalibrationStats.load(_only_stats_folder(root / "dp" / "cal"))
    assert _only_stats_folder(root / "dp" / "cal").name != one.name  # another recipe, another cache entry
    for key, x in s1.layers.items():
        y = dp.layers[key]
        assert x.count == y.count and x.sample.shape == y.sample.shape
        # other batches (2 + 1 prompts instead of 3) round the float32 activations differently
        for f in ("abs_max", "second_moment", "sum", "sum_sq", "sum_4th"):
            a, b = getattr(x, f), getattr(y, f)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max())), (key, f)

    quant = [*common, "--method", "dirotq-lr", "--rank", "8", "--weights", "gptq", "--allocate", "fixed"]
    _dirotq(["quantize", *quant, "--stats", str(one), "--out", str(root / "one" / "ck"), "--name", "q"])
    _dirotq(["quantize", *quant, "--stats", str(two), "--out", str(root / "two" / "ck"), "--name", "q"], nproc=2)
    c1 = json.loads((root / "one" / "ck" / "q" / "config.json").read_text())["quantization_config"]
    c2 = json.loads((root / "two" / "ck" / "q" / "config.json").read_text())["quantization_config"]
    assert c1["content_hash"] == c2["content_hash"] and c1["targets"] == c2["targets"]
    m1 = load_quantized(root / "one" / "ck" / "q").state_dict()
    m2 = load_quantized(root / "two" / "ck" / "q").state_dict()
    assert m1.keys() == m2.keys() and all(torch_equal(m1[k], m2[k]) for k in m1)


def test_a_worker_exits_with_its_status_and_its_output_flushed():
    """``exit_worker`` (the end of a torchrun worker after it left its group) skips the interpreter's
    teardown but keeps what the command printed, buffered or not, and its exit status."""
    import subprocess
    import sys

    code = ("import sys; from dirotq.distributed import exit_worker; sys.stdout.write('done'); "
            "sys.stderr.write('note'); exit_worker(3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "done", "note")


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_two_process_output_error_allocation_equals_one_process(tiny_folder):
    """`quantize --allocate output` under torchrun: each process calibrates and measures the
    sensitivities of the layers it owns, the measurements are all-gathered, and every process
    allocates the same plan, the single process's one."""
    import json

    root = tiny_folder
    args = ["quantize", "--model", str(root / "tiny-pixart"), "--steps", "2", "--calib-prompts", str(root / "calib.txt"),
            "--calib-steps", "2", "--method", "dirotq-lr", "--rank", "8", "--allocate", "output", "--name", "q"]
    outs = {}
    for name, nproc in (("alloc1", None), ("alloc2", 2)):
        (root / name).mkdir()
        outs[name] = _dirotq([*args, "--out", str(root / name / "ck")], nproc=nproc, cwd=root / name).stdout
    assert "sensitivities measured by 2 processes" in outs["alloc2"] and "processes" not in outs["alloc1"]
    c1 = json.loads((root / "alloc1" / "ck" / "q" / "config.json").read_text())["quantization_config"]
    c2 = json.loads((root / "alloc2" / "ck" / "q" / "config.json").read_text())["quantization_config"]
    ranks = {n: t["rank"] for n, t in c1["targets"].items() if t.get("kind", "w4a4") == "w4a4"}
    assert len(set(ranks.values())) > 1  # an allocation, not the uniform rank
    assert c1["targets"] == c2["targets"] and c1["content_hash"] == c2["content_hash"]
