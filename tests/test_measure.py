"""The one before/after measurement: exact counts and sizes, and the same speed-up in every command."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save
from torch import nn

from dlkit import artifacts
from dlkit.api import TrainRequest, train_model
from dlkit.compare import CompareOptions, compare_artifacts
from dlkit.compress.prune import PruneOptions, prune_artifact
from dlkit.malloc import keep_freed_memory
from dlkit.profiling import Subject, measure_models, weights_bytes

# Latency is timed with one thread and enough alternating repeats for stable medians on a shared,
# loaded 2-core machine; the same pair then gives the same speed-up within this factor.
REPEATS = 40
TOLERANCE = 1.5


def test_counts_size_and_layout_of_tiny_models():
    lin = nn.Linear(6, 4)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        lin.weight[0].zero_()
    a, b = measure_models([Subject(lin, torch.randn(5, 6)), Subject(conv, torch.randn(5, 1, 6, 6))],
                          batches=(1, 32), repeats=2)
    assert (a.params, a.macs, a.zeros) == (28, 24, 6)
    assert (b.params, b.macs) == (20 + 99, 2 * 9 * 16 + 96)
    assert a.size_bytes == len(save(lin.state_dict())) and a.size_bytes > 28 * 4
    assert not a.channels_last and b.channels_last
    assert set(a.latency_ms) == {1, 32} and a.repeats == {1: 8, 32: 2} and min(a.latency_ms.values()) > 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A cnn trained one epoch on digits (no download) and the same cnn pruned at ratio 0.5.

    Freed memory is kept in the process, as the dlkit command and the benchmarks do: otherwise
    page faults depend on what ran before (an evaluation at batch 1024 raises glibc's mmap
    threshold), and the two timings would measure the allocator, not the models."""
    keep_freed_memory()
    root = tmp_path_factory.mktemp("measure")
    base = train_model(TrainRequest(model="cnn", dataset="digits", options={"epochs": 1}, out=root / "cnn",
                                    device="cpu")).artifact
    res = prune_artifact(base, PruneOptions(ratio=0.5, out=root / "pruned", device="cpu",
                                            latency_repeats=REPEATS, latency_threads=1))
    return base, res


def test_compare_and_prune_report_the_same_pair_alike(pair):
    base, pruned = pair
    cmp = compare_artifacts([base, pruned.artifact], CompareOptions(rounds=REPEATS, threads=1))
    first, second = cmp.rows
    # counts and sizes: the same numbers, and the size is the weights file on disk
    assert (first.params, first.macs, first.size_bytes) == (pruned.before.params, pruned.before.macs,
                                                            pruned.before.size_bytes)
    assert (second.params, second.macs, second.size_bytes) == (pruned.after.params, pruned.after.macs,
                                                               pruned.after.size_bytes)
    assert second.size_bytes == (pruned.artifact / artifacts.WEIGHTS).stat().st_size
    assert pruned.before.channels_last and pruned.after.channels_last  # prepared as evaluate runs them
    # speed: two separate timing runs of the same pair through the same preparation
    by_prune, by_compare = pruned.ratios()["speedup_b256"], second.ratios["speedup_b256"]
    assert by_prune > 1.2 and by_compare > 1.2
    assert 1 / TOLERANCE < by_compare / by_prune < TOLERANCE, (by_prune, by_compare)


def test_int8_size_is_the_codec_bytes(pair, tmp_path):
    from dlkit.compress.quantize import QuantizeOptions, quantize_artifact

    base, _ = pair
    res = quantize_artifact(base, QuantizeOptions("dynamic", out=tmp_path / "q", repeats=1, eval_samples=64))
    assert res.after.size_bytes == (tmp_path / "q" / artifacts.WEIGHTS).stat().st_size
    assert res.before.size_bytes == (base / artifacts.WEIGHTS).stat().st_size
    model = artifacts.load_model(artifacts.read_artifact(tmp_path / "q"))
    assert weights_bytes(model, artifacts.read_artifact(tmp_path / "q").manifest["model"]["transforms"][-1]) \
        == res.after.size_bytes
