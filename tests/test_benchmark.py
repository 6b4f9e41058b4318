"""The benchmark script runs, writes its table, CSV and plot, and its memory measure holds what it promises.

Times are printed as ratios by the script; no test asserts on them.
"""

import json

import pytest
import torch

from rskip.commands import benchmark


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The script sets torch's thread count (`--threads`); later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def by_model(results, name):
    return next(r for r in results if r["model"] == name)


def test_marian_benchmark_ratios_against_stock(tmp_path):
    results = benchmark.main(["--family", "marian", "--d_model", "16", "--heads", "2", "--layers", "2",
                              "--vocab_size", "50", "--batch_size", "2", "--seq_len", "6", "--min_run_time", "0.01", "--rounds", "1", "--threads", "1",
                              "--output_dir", str(tmp_path)])
    assert results[0]["model"] == "MarianMTModel (stock)" and results[0]["time_ratio"] == 1.0
    assert all(r["infer_ratio"] > 0 for r in results)
    # post_ln is Marian: the same parameters and the same tensors saved for backward, on either path
    for path in ("fused", "reference"):
        post_ln = by_model(results, f"RSkipMarian post_ln {path}")
        assert post_ln["activation_ratio"] == 1.0 and post_ln["parameters"] == results[0]["parameters"]
    # the reference loop keeps one more normalised tensor per sublayer and step ...
    k2 = by_model(results, "RSkipMarian rskip_ln K=2 reference")
    k3 = by_model(results, "RSkipMarian rskip_ln K=3 reference")
    assert 1.0 < k2["activation_ratio"] < k3["activation_ratio"]
    # ... the fused op only its per-token statistics and the stacked affine, whatever K
    stock_bytes = results[0]["activation_bytes"]
    for k in (2, 3):
        fused = by_model(results, f"RSkipMarian rskip_ln K={k} fused")
        extra = fused["activation_bytes"] - stock_bytes
        sublayers, tokens, width = 2 * 2 + 2 * 3, 2 * 6, 16
        small = sublayers * k * (2 * tokens * 4 + 2 * width * 4)  # fp32 mean and rstd per token, weight and bias
        assert 0 < extra <= small
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["model"] for r in saved["results"]] == [r["model"] for r in results]
    assert (tmp_path / "benchmark.csv").read_text().count("\n") == len(results) + 1
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_resnet_benchmark_plain_costs_what_timm_costs(tmp_path):
    results = benchmark.main(["--family", "resnet", "--image_model", "resnet18", "--batch_size", "2",
                              "--image_size", "32", "--min_run_time", "0.01", "--rounds", "1", "--threads", "1", "--output_dir", str(tmp_path)])
    assert results[0]["model"] == "timm resnet18 (stock)"
    plain = by_model(results, "rskip_resnet18 plain")
    assert plain["activation_ratio"] == 1.0 and plain["parameters"] == results[0]["parameters"]
    # stock timm has no norm after the add: a norm keeps one more tensor per block (K = 1 runs the norm itself, so
    # both paths keep the same); the fused op keeps that much whatever K, plus x where nothing else keeps it (the
    # shortcut of a downsampling block), the loop one more tensor per step
    post_ln = by_model(results, "rskip_resnet18 post_ln fused")["activation_bytes"]
    assert post_ln == by_model(results, "rskip_resnet18 post_ln reference")["activation_bytes"]
    fused = [by_model(results, f"rskip_resnet18 rskip_ln K={k} fused")["activation_bytes"] for k in (2, 3)]
    assert post_ln < fused[0] < 1.03 * post_ln
    assert 0 < fused[1] - fused[0] < 0.001 * post_ln  # one more step: its (C,) affine and per-sample statistics
    reference = by_model(results, "rskip_resnet18 rskip_ln K=2 reference")
    assert reference["activation_bytes"] > fused[0]


def test_the_op_alone_against_the_eager_loop(tmp_path):
    """--op only: forward + backward of the op on each path and of the loop, per (d, K), with bandwidth figures."""
    rows = benchmark.main(["--op", "only", "--op_rows", "64", "--op_features", "16", "32", "--op_recursions", "1", "2",
                           "--min_run_time", "0.01", "--threads", "1", "--output_dir", str(tmp_path)])
    expected = {"op (PyTorch)", "eager loop"}  # no GPU: no Triton row; no --compile: no compiled loop
    for features in (16, 32):
        for k in (1, 2):
            cell = {r["path"]: r for r in rows if r["features"] == features and r["recursions"] == k}
            assert set(cell) == expected
            assert cell["eager loop"]["vs_eager_loop"] == 1.0
            op = cell["op (PyTorch)"]
            assert op["ms"] > 0 and op["vs_compiled_loop"] is None
            # bytes the op must move over its time, and that against the measured copy bandwidth
            moved = (8 + (k > 1)) * 64 * features * 4
            assert op["gb_per_s"] == pytest.approx(moved / (op["ms"] / 1e3) / 1e9)
    # every share is against the one measured copy bandwidth
    bandwidths = [r["gb_per_s"] / r["copy_bandwidth_share"] for r in rows]
    assert bandwidths[0] > 0 and bandwidths == pytest.approx([bandwidths[0]] * len(rows))
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["results"] == [] and len(saved["op"]) == len(rows) == 8
    assert (tmp_path / "benchmark_op.png").stat().st_size > 0


def test_the_benchmark_needs_only_the_model_package(run_python):
    """scripts/gpu_check.sh carries the model package's dependencies, not the training library's (datasets, pyarrow,
    evaluate, sacrebleu): the benchmark and its command line must not import them."""
    run_python("""
import sys
for name in ("datasets", "pyarrow", "evaluate", "sacrebleu"):
    sys.modules[name] = None  # importing them fails from here on
from rskip.commands import benchmark
assert benchmark.parse_args(["--op", "only", "--op_rows", "8", "--op_features", "16"]).op_rows == 8
""")
