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
    # stock timm has no norm after the add: a norm keeps one more tensor per block, but the fused op only one
    post_ln = by_model(results, "rskip_resnet18 post_ln fused")["activation_bytes"]
    assert by_model(results, "rskip_resnet18 rskip_ln K=3 fused")["activation_bytes"] < 1.001 * post_ln
    reference = by_model(results, "rskip_resnet18 rskip_ln K=2 reference")
    assert reference["activation_bytes"] > post_ln
