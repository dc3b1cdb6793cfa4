"""Calibration statistics (docs/DESIGN.md §2): streamed float64 moments equal a direct
float64 recomputation, merging equals a joint pass, the reservoir is bounded and seeded, the disk
format round-trips exactly, and the on-disk cache means a calibration never runs twice."""

import json

import pytest
import torch

from dirotq import calibration
from dirotq.calibration import (CalibrationStats, LayerStats, LazyGroups, calibrate, calibrate_transformer,
                                capture_inputs, combine_calibration_parts, part_folder, stats_cache_key)
from dirotq.models import ADAPTERS
from dirotq.pipelines import DEFAULT_MODEL, load_pipeline, load_transformer
from tiny_pipelines import build_tiny_pixart_pipeline

PROMPTS = ["a red circle on the left", "two blue squares"]
PIPE_KW = dict(max_sequence_length=16, clean_caption=False)


def _heavy(n, d, seed):
    """Tokens with a few outlier channels, a nonzero mean and a bfloat16 part (dtype handling)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + 0.3
    x[:, :3] *= 25.0
    return x


def _reference(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return dict(second_moment=x.T @ x, abs_max=x.abs().amax(0), sum=x.sum(0), sum_sq=(x**2).sum(0),
                sum_4th=(x**4).sum(0), count=x.shape[0])


def _assert_stats(st, ref):
    assert st.count == ref["count"]
    for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th"):
        torch.testing.assert_close(getattr(st, f), ref[f], rtol=1e-12, atol=1e-9, msg=f)


def test_update_equals_float64_recomputation():
    st = LayerStats.empty(64, sample_tokens=32, seed=3)
    parts = [_heavy(50, 64, 0), _heavy(7, 64, 1).reshape(1, 7, 64), _heavy(30, 64, 2).bfloat16()]
    for p in parts:
        st.update(p)
    _assert_stats(st, _reference(torch.cat([p.reshape(-1, 64).double() for p in parts])))
    x = torch.cat([p.reshape(-1, 64).double() for p in parts])
    torch.testing.assert_close(st.mean(), x.mean(0))
    torch.testing.assert_close(st.covariance(), torch.cov(x.T, correction=0))
    torch.testing.assert_close(st.kurtosis(), (x**4).mean(0) / (x**2).mean(0) ** 2)
    with pytest.raises(ValueError, match="width"):
        st.update(torch.zeros(3, 32))


def test_gaussian_kurtosis_is_three():
    st = LayerStats.empty(8, sample_tokens=0)
    st.update(torch.randn(50_000, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(st.kurtosis(), torch.full((8,), 3.0, dtype=torch.float64), atol=0.1)


def test_merge_equals_joint_update():
    a, b, joint = (LayerStats.empty(64, 40, seed=s) for s in (1, 2, 1))
    xa, xb = _heavy(100, 64, 5), _heavy(60, 64, 6)
    a.update(xa)
    b.update(xb)
    joint.update(xa)
    joint.update(xb)
    m = a.merge(b)
    _assert_stats(m, _reference(torch.cat([xa, xb])))
    torch.testing.assert_close(m.second_moment, joint.second_moment)
    assert a.count == 100  # merge leaves its inputs alone
    assert m.sample.shape == (40, 64)
    pool = torch.cat([xa, xb])
    assert all((pool == row).all(1).any() for row in m.sample)  # sampled rows are real tokens


def test_reservoir_is_bounded_uniform_and_seeded():
    x = torch.arange(5000, dtype=torch.float32)[:, None].repeat(1, 4)  # row i holds value i

    def run(seed, chunks):
        st = LayerStats.empty(4, sample_tokens=100, seed=seed)
        for c in x.split(chunks):
            st.update(c)
        return st

    s1, s2, s3 = run(0, 700), run(0, 700), run(1, 700)
    assert s1.sample.shape == (100, 4)
    assert torch.equal(s1.sample, s2.sample)  # deterministic for a seed
    assert not torch.equal(s1.sample, s3.sample)
    ids = s1.sample[:, 0].long()
    assert ids.unique().numel() == 100  # without replacement
    # uniform over the whole stream, not just the first or last chunk: the mean index is near 2500
    means = torch.stack([run(s, 700).sample[:, 0].mean() for s in range(10)])
    assert abs(means.mean().item() - 2499.5) < 200  # sd of the mean over 10 × 100 draws ≈ 45
    small = LayerStats.empty(4, sample_tokens=100)
    small.update(x[:30])
    assert small.sample.shape == (30, 4)


@pytest.fixture(scope="module")
def pixart_stats():
    adapter = ADAPTERS["pixart"]
    model = adapter.build_tiny(0)
    g = torch.Generator().manual_seed(0)
    inputs = [adapter.example_inputs(model, 2, g) for _ in range(3)]
    targets = adapter.targets(model)
    with capture_inputs(model, list(targets)) as seen:
        stats = calibrate_transformer(model, inputs, sample_tokens=16, seed=0)
    return model, targets, stats, seen


def test_transformer_stats_match_captured_inputs_and_groups_are_shared(pixart_stats):
    model, targets, stats, seen = pixart_stats
    assert set(stats.groups) == set(targets)
    assert set(stats.layers) == {s.group for s in targets.values()}
    for name, spec in targets.items():
        st = stats.for_layer(name)
        assert st is stats.layers[spec.group]  # q/k/v share one object
        _assert_stats(st, _reference(torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[spec.group]])))
    q = stats.for_layer("transformer_blocks.0.attn1.to_q")
    assert q.count == 3 * 2 * 16  # 3 forwards × batch 2 × 16 tokens: the group was recorded once
    assert stats.for_layer("transformer_blocks.0.ff.net.2").dim == 256
    with pytest.raises(KeyError, match="close names.*attn1.to_q"):
        stats.for_layer("transformer_blocks.0.attn1.to_qq")


def test_layer_subset_records_whole_groups():
    adapter = ADAPTERS["pixart"]
    model = adapter.build_tiny(0)
    kw = adapter.example_inputs(model, 1, torch.Generator().manual_seed(0))
    stats = calibrate_transformer(model, [kw], layers=["transformer_blocks.1.attn1.to_v", "transformer_blocks.0.ff.net.2"])
    assert set(stats.layers) == {"transformer_blocks.1.attn1.to_q", "transformer_blocks.0.ff.net.2"}
    assert stats.for_layer("transformer_blocks.1.attn1.to_k").count == 16
    with pytest.raises(KeyError, match="not targets"):
        calibrate_transformer(model, [kw], layers=["proj_out"])
    # passes over subsets combine into one; common groups add their tokens
    more = calibrate_transformer(model, [kw, kw], layers=["transformer_blocks.1.attn1.to_q"])
    both = stats.merge(more)
    assert both.for_layer("transformer_blocks.1.attn1.to_v").count == 3 * 16
    assert both.for_layer("transformer_blocks.0.ff.net.2") is stats.layers["transformer_blocks.0.ff.net.2"]


def test_save_load_roundtrip_is_exact(tmp_path, pixart_stats):
    stats = pixart_stats[2]
    stats.save(tmp_path / "s")
    back = CalibrationStats.load(tmp_path / "s")
    assert back.groups == stats.groups and back.meta == json.loads(json.dumps(stats.meta, default=str))
    for key, st in stats.layers.items():
        b = back.layers[key]
        assert (b.count, b.sample_tokens, b.seed) == (st.count, st.sample_tokens, st.seed)
        for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th", "sample", "sample_keys"):
            assert torch.equal(getattr(b, f), getattr(st, f)), f
    # a loaded object keeps streaming exactly as the original would
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(9))
    a, b = stats.layers["transformer_blocks.0.attn1.to_q"], back.layers["transformer_blocks.0.attn1.to_q"]
    a2, b2 = a.merge(LayerStats.empty(64, a.sample_tokens)), b.merge(LayerStats.empty(64, b.sample_tokens))
    a2.update(x)
    b2.update(x)
    assert torch.equal(a2.sample, b2.sample) and torch.equal(a2.second_moment, b2.second_moment)


def _equal(a, b):
    return (a.count, a.sample_seen, a.seed) == (b.count, b.sample_seen, b.seed) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in calibration._FIELDS)


def test_load_reads_a_group_only_when_it_is_used(tmp_path, pixart_stats, monkeypatch):
    stats = pixart_stats[2]
    stats.save(tmp_path / "s")
    reads = []
    real = calibration._read_group
    monkeypatch.setattr(calibration, "_read_group", lambda src, key: reads.append(key) or real(src, key))
    back = CalibrationStats.load(tmp_path / "s")
    assert isinstance(back.layers, LazyGroups) and list(back.layers) == list(stats.layers)
    key = "transformer_blocks.0.attn1.to_q"
    # keys, membership, length and widths come from the index and the file header
    assert key in back.layers and len(back.layers) == len(stats.layers) and back.group_width(key) == 64
    assert back.group_key("transformer_blocks.0.attn1.to_v") == key and not reads
    st = back.for_layer("transformer_blocks.0.attn1.to_k")
    assert reads == [key] and back.is_loaded(key) and _equal(st, stats.layers[key])
    assert back.for_layer(key) is st and reads == [key]  # read once, then kept
    assert back.release(key) and not back.is_loaded(key)
    assert _equal(back.layers[key], st) and reads == [key, key]  # read again after a release
    assert not stats.release(key)  # in-memory statistics are never dropped
    with pytest.raises(KeyError, match="close names"):
        back.group_key("transformer_blocks.0.attn1.to_qq")
    merged = back.merge(CalibrationStats(layers={}, groups={}, meta={}))
    assert isinstance(merged.layers, LazyGroups) and len(reads) == 2  # merging reads nothing it does not combine


def test_parts_saved_by_separate_calibrations_combine_into_one_folder(tmp_path):
    """Two passes over disjoint group sets (two ranks of a distributed calibration) saved as parts
    and indexed by combine_calibration_parts load as the statistics of one joint pass, bit for bit,
    and no tensor file is copied."""
    adapter = ADAPTERS["pixart"]
    model = adapter.build_tiny(0)
    g = torch.Generator().manual_seed(0)
    inputs = [adapter.example_inputs(model, 2, g) for _ in range(2)]
    joint = calibrate_transformer(model, inputs, adapter=adapter, sample_tokens=32)
    keys = list(joint.layers)
    out = tmp_path / "combined"
    for rank, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        part_stats = calibrate_transformer(model, inputs, adapter=adapter, sample_tokens=32, layers=part)
        part_stats.save(part_folder(out, rank))
    assert combine_calibration_parts(out) == out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == [
        "part-00000/stats.safetensors", "part-00001/stats.safetensors"]
    back = CalibrationStats.load(out)
    assert list(back.layers) == keys and back.groups == joint.groups
    assert [p["folder"] for p in back.meta["parts"]] == ["part-00000", "part-00001"]
    assert all(_equal(back.layers[k], joint.layers[k]) for k in keys)
    # a combined folder is itself a part of a larger one
    outer = tmp_path / "outer"
    outer.mkdir()
    out.rename(outer / "part-00000")
    combine_calibration_parts(outer)
    assert all(_equal(CalibrationStats.load(outer).layers[k], joint.layers[k]) for k in keys)


def test_combining_bad_parts_is_a_clear_error_and_writes_nothing(tmp_path, pixart_stats):
    stats = pixart_stats[2]
    out = tmp_path / "c"
    stats.save(part_folder(out, 0))
    stats.save(part_folder(out, 1))
    with pytest.raises(ValueError, match="in both part-00000 and part-00001.*merge"):
        combine_calibration_parts(out)
    assert not (out / "meta.json").exists()
    stats.save(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not inside"):
        combine_calibration_parts(out, [part_folder(out, 0), tmp_path / "elsewhere"])
    with pytest.raises(ValueError, match="single-file statistics"):
        combine_calibration_parts(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no parts"):
        combine_calibration_parts(tmp_path / "empty")
    combine_calibration_parts(out, ["part-00000"])
    (out / "part-00000" / "stats.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="part-00000/stats.safetensors"):
        CalibrationStats.load(out)


def test_saved_statistics_get_the_users_file_mode(tmp_path, pixart_stats):
    """The cache folder comes from tempfile.mkdtemp (0700) and the tensors from safetensors (0600)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        pixart_stats[2].save(tmp_path / "s")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "s", *(tmp_path / "s").iterdir()]}
    assert modes == {"s": 0o755, "stats.safetensors": 0o644, "meta.json": 0o644}


def test_corrupt_or_missing_files_give_clear_errors(tmp_path, pixart_stats):
    stats = pixart_stats[2]
    stats.save(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        CalibrationStats.load(tmp_path / "nothing")
    p = tmp_path / "s" / "stats.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt calibration tensors.*stats.safetensors"):
        CalibrationStats.load(tmp_path / "s")
    stats.save(tmp_path / "s")  # overwrite is allowed (atomic replace)
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt calibration metadata"):
        CalibrationStats.load(tmp_path / "s")


def test_cache_key_is_stable_and_sensitive():
    k = stats_cache_key("m", PROMPTS, 20, [0, 5], 4.5, 0, torch.float32)
    assert k == stats_cache_key("m", PROMPTS, 20, [5, 0], 4.5, 0, "torch.float32") and len(k) == 64
    assert k != stats_cache_key("m", PROMPTS[::-1], 20, [0, 5], 4.5, 0, torch.float32)
    assert k != stats_cache_key("m", PROMPTS, 20, None, 4.5, 0, torch.float32)
    assert k != stats_cache_key("m", PROMPTS, 20, [0, 5], 4.5, 1, torch.float32)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pixart_pipeline(0)


def test_calibrate_pipeline_records_chosen_steps_and_caches(tiny_pipe, tmp_path):
    calls = []
    h = tiny_pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    seen = []
    try:
        stats = calibrate(tiny_pipe, PROMPTS, num_inference_steps=3, steps=[0, 2], batch_size=1,
                          cache_dir=tmp_path, progress=lambda f, msg: seen.append((f, msg)), pipe_kwargs=PIPE_KW)
        assert len(calls) == 2 * 3  # 2 prompts (batch 1) × 3 steps; CFG is batched into one forward
        # 2 recorded steps × 2 prompts × 2 CFG branches × 16 image tokens, pooled
        assert stats.for_layer("transformer_blocks.1.attn1.to_v").count == 2 * 2 * 2 * 16
        assert stats.meta["steps"] == [0, 2] and stats.meta["num_prompts"] == 2 and stats.meta["family"] == "pixart"
        assert seen and seen[-1][0] == pytest.approx(1.0)
        assert [p.name for p in tmp_path.iterdir()] == [stats.meta["cache_key"]]

        again = calibrate(tiny_pipe, PROMPTS, num_inference_steps=3, steps=[0, 2], batch_size=2,
                          cache_dir=tmp_path, pipe_kwargs=PIPE_KW)
        assert len(calls) == 6  # served from the cache: the model did not run
        for k, st in stats.layers.items():
            assert torch.equal(again.layers[k].second_moment, st.second_moment)
    finally:
        h.remove()


def test_calibrate_step_selection_and_batch_invariance(tiny_pipe):
    one = calibrate(tiny_pipe, PROMPTS, num_inference_steps=2, steps=[1], batch_size=2, pipe_kwargs=PIPE_KW)
    per_prompt = calibrate(tiny_pipe, PROMPTS, num_inference_steps=2, steps=[1], batch_size=1, pipe_kwargs=PIPE_KW)
    k = "transformer_blocks.0.attn1.to_q"
    assert one.for_layer(k).count == 2 * 2 * 16
    # per-prompt generators: the batch size does not change what is measured
    c1, c2 = one.for_layer(k).second_moment, per_prompt.for_layer(k).second_moment
    assert (c1 - c2).norm() / c1.norm() < 1e-5  # float32 GEMM blocking differs with the batch size
    # steps=n (the README's calibrate(pipe, prompts, steps=20)) means every step of an n-step schedule
    all2 = calibrate(tiny_pipe, PROMPTS[:1], steps=2, pipe_kwargs=PIPE_KW)
    assert all2.meta["steps"] == [0, 1] and all2.meta["num_inference_steps"] == 2
    with pytest.raises(ValueError, match="outside"):
        calibrate(tiny_pipe, PROMPTS, num_inference_steps=2, steps=[2], pipe_kwargs=PIPE_KW)


def test_load_pipeline_missing_path_is_clear(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*nothing is downloaded"):
        load_pipeline(str(missing))
    with pytest.raises(FileNotFoundError, match="not-cached/model.*nothing is downloaded"):
        load_transformer("not-cached/model")
    assert DEFAULT_MODEL.endswith("assets/tiny-pixart")


def test_load_pipeline_roundtrip_from_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    tr = load_transformer(str(tmp_path / "p"))
    sd, ref = tr.state_dict(), tiny_pipe.transformer.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_holdout_prompts_feed_only_the_sample(tiny_pipe, tmp_path):
    prompts = PROMPTS + ["a green triangle at the top"]
    held = calibrate(tiny_pipe, prompts, num_inference_steps=2, steps=[1], batch_size=2, holdout_prompts=1,
                     pipe_kwargs=PIPE_KW, sample_tokens=10_000)
    moments_only = calibrate(tiny_pipe, prompts[:2], num_inference_steps=2, steps=[1], batch_size=2,
                             pipe_kwargs=PIPE_KW)
    # the same prompt index gets the same generator, so the moments are those of the first two prompts
    holdout_only = calibrate(tiny_pipe, prompts, num_inference_steps=2, steps=[1], batch_size=2,
                             pipe_kwargs=PIPE_KW, sample_tokens=10_000)
    assert held.meta["holdout_prompts"] == 1
    for key, st in held.layers.items():
        ref = moments_only.layers[key]
        assert st.count == ref.count
        torch.testing.assert_close(st.second_moment, ref.second_moment, rtol=1e-12, atol=1e-9)
        # every held-out sample row is a token of the third prompt, none of the first two
        everything = holdout_only.layers[key].sample
        calib_rows = ref.sample
        assert st.sample.shape[0] == st.sample_seen == everything.shape[0] - calib_rows.shape[0]
        if "attn2.to_out" in key:
            continue  # the unconditional branch's cross-attention output is the same for every prompt
        assert not any(bool((calib_rows == row).all(1).any()) for row in st.sample[:20])
        assert all(bool((everything == row).all(1).any()) for row in st.sample[:20])
    held.save(tmp_path / "h")
    back = CalibrationStats.load(tmp_path / "h")
    assert all(back.layers[k].sample_seen == held.layers[k].sample_seen for k in held.layers)
    with pytest.raises(ValueError, match="holdout_prompts"):
        calibrate(tiny_pipe, PROMPTS, holdout_prompts=2, pipe_kwargs=PIPE_KW)


def test_update_can_feed_moments_or_sample_alone():
    st = LayerStats.empty(8, sample_tokens=4, seed=1)
    x = torch.randn(6, 8)
    st.update(x, sample=False)
    assert st.count == 6 and st.sample.shape[0] == 0 and st.sample_seen == 0
    st.update(x * 2, moments=False)
    assert st.count == 6 and st.sample_seen == 6 and st.sample.shape[0] == 4
    torch.testing.assert_close(st.second_moment, x.double().T @ x.double())
