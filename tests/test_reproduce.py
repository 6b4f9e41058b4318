"""scripts/reproduce.py: every experiment's plumbing at a miniature size (`--mini`), on a few lines of the offline
data; and `--diagnostics_steps` on the training scripts."""

import json

import pytest
from datasets import load_dataset

from conftest import SHARED_DATA, read_lines
from translation_helpers import tiny_args, write_pairs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, multi30k_dir):
    """A data folder laid out as ../shared/data, with 48 training pairs and 48 CIFAR-10 images."""
    folder = tmp_path_factory.mktemp("data")
    write_pairs(folder / "multi30k", multi30k_dir, sizes=(("train", "train", 48), ("val", "val", 8),
                                                          ("test_2016_flickr", "test_2016_flickr", 8)))
    (folder / "cifar10").mkdir()
    images = load_dataset("parquet", data_files=str(SHARED_DATA / "cifar10" / "train.parquet"), split="train[:48]")
    images.to_parquet(str(folder / "cifar10" / "train.parquet"))
    return folder


def run(experiment, data_dir, tmp_path, *extra):
    from rskip.commands import reproduce

    output_dir = tmp_path / experiment
    results = reproduce.main([experiment, "--mini", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
                              *extra])
    assert json.loads((output_dir / "results.json").read_text())["experiment"] == experiment
    report = (output_dir / "results.md").read_text()
    assert "wall time" in report and "CPU" in report or "GPU" in report
    for figure in results["figures"]:
        assert (output_dir / figure).stat().st_size > 0 and f"]({figure})" in report
    return results, report


def test_gradients(data_dir, tmp_path):
    results, report = run("gradients", data_dir, tmp_path)
    assert {record["family"] for record in results["records"]} == {"transformer", "resnet"}
    assert "xskip λ=0.5" in report and "first / last sublayer gradient norm" in report
    deep = [r["gradient_ratio"] for r in results["records"]
            if (r["family"], r["stack"], r["variant"], r["depth"]) == ("transformer", "encoder", "xskip λ=0.5", 6)]
    assert len(deep) == 1 and all(ratio < 0.1 for ratio in deep)  # about 0.5^11 over 12 sublayers


def test_stability(data_dir, tmp_path):
    results, report = run("stability", data_dir, tmp_path)
    assert {cell["outcome"] for cell in results["cells"]} <= {"trains", "stalls", "diverges"}
    assert len(results["cells"]) == 2 and "| 1+1 | 0.001 | 1 |" in report


def test_translation(data_dir, tmp_path):
    results, report = run("translation", data_dir, tmp_path, "--seeds", "2")
    assert len(results["runs"]) == 4 and all("test_bleu" in run_ for run_ in results["runs"])
    assert "±" in report and "test BLEU vs post_ln" in report


def test_cifar(data_dir, tmp_path):
    results, report = run("cifar", data_dir, tmp_path, "--seeds", "1")
    assert [run_["variant"] for run_ in results["runs"]] == ["plain", "rskip_ln K=2"]
    assert "preact_resnet20" in report


def test_bn(data_dir, tmp_path):
    results, report = run("bn", data_dir, tmp_path, "--seeds", "1")
    assert "### Translation" in report and "### CIFAR-10" in report and "xskip_bn" in report


def test_verdict_calls_a_gap_within_the_seeds_spread_no_difference():
    from rskip.commands import reproduce

    assert reproduce.verdict([30.0, 31.0, 32.0], [30.5, 31.5, 32.5]) == "no difference"
    assert reproduce.verdict([35.0, 35.1, 35.2], [30.0, 30.1, 30.2]) == "better"
    assert reproduce.verdict([20.0, 20.1, 20.2], [30.0, 30.1, 30.2]) == "worse"
    assert reproduce.verdict([35.0], [30.0]) == "no difference"  # one seed: no spread to compare with


def test_diagnostics_steps_are_logged_and_leave_the_run_unchanged(tmp_path, data_dir, multi30k_dir):
    from rskip.commands import train_translation
    from rskip.tokenization import train_marian_tokenizer

    data = data_dir / "multi30k"
    tokenizer = tmp_path / "tokenizer"
    train_marian_tokenizer(read_lines(multi30k_dir / "train.en.gz", 300), read_lines(multi30k_dir / "train.de.gz", 300),
                           tokenizer, vocab_size=400, source_lang="en", target_lang="de")
    (data / "valid.en").write_text((data / "val.en").read_text())
    (data / "valid.de").write_text((data / "val.de").read_text())
    plain = train_translation.main(tiny_args(data, tmp_path / "plain", tokenizer))
    measured = train_translation.main(tiny_args(data, tmp_path / "measured", tokenizer,
                                                "--diagnostics_steps", "0,2"))
    assert measured["validation"]["loss"] == plain["validation"]["loss"]
    diagnostics = json.loads((tmp_path / "measured" / "diagnostics.json").read_text())
    assert set(diagnostics) == {"0", "2"} and diagnostics["0"]["layers"][0]["stack"] == "encoder"
    assert (tmp_path / "measured" / "diagnostics.png").is_file()
