"""scripts/reproduce.py: every experiment's plumbing at a miniature size (`--mini`), on a few lines of the offline
data, a second sitting of a training experiment, the command line's choice of preset; and `--diagnostics_steps` on
the training scripts."""

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


def test_stability_and_its_second_sitting(data_dir, tmp_path, capsys):
    """The second sitting runs nothing (every run finished in the first) and rebuilds the same table."""
    results, report = run("stability", data_dir, tmp_path)
    assert {row["outcome"] for row in results["rows"]} <= {"trains", "stalls", "diverges"}
    assert len(results["rows"]) == 2 and "| 1+1 | 0.001 | 1 |" in report and "n=1)" in report
    assert all(row["command"].startswith("rskip-train-translation ") and "--overwrite_output_dir" not in row["command"]
               for row in results["rows"])
    capsys.readouterr()
    again, report_again = run("stability", data_dir, tmp_path)
    assert "2 runs: 2 finished before, 0 to run" in capsys.readouterr().out
    assert [row["final_loss"] for row in again["rows"]] == [row["final_loss"] for row in results["rows"]]
    table = report.split("| depth |")[1].split("A difference")[0]
    assert table == report_again.split("| depth |")[1].split("A difference")[0]
    assert len(again["sittings"]) == 2


def test_translation(data_dir, tmp_path):
    results, report = run("translation", data_dir, tmp_path, "--seeds", "2")
    assert len(results["rows"]) == 4 and all("test_bleu" in row for row in results["rows"])
    assert "±" in report and "test BLEU vs post_ln" in report and "| rskip_ln K=2 | 2 of 2 |" in report


def test_cifar(data_dir, tmp_path):
    results, report = run("cifar", data_dir, tmp_path, "--seeds", "1")
    assert [row["variant"] for row in results["rows"]] == ["plain", "rskip_ln K=2"]
    assert "| preact_resnet20 | rskip_ln K=2 | 1 of 1 |" in report


def test_bn(data_dir, tmp_path):
    results, report = run("bn", data_dir, tmp_path, "--seeds", "1")
    assert "### Translation" in report and "### CIFAR-10" in report and "xskip_bn" in report
    assert {(row["part"], row["variant"]) for row in results["rows"]} == {
        (part, variant) for part in ("translation", "cifar") for variant in ("xskip_ln λ=2", "xskip_bn λ=2")}
    assert "bn_translation_curves.png" in results["figures"] and "bn_cifar_preact_resnet20_curves.png" in results["figures"]


def test_the_command_line_chooses_the_preset(data_dir):
    """The Hub data's own model and schedule, with --variants over them; --models into bn's CIFAR part; no run's
    flags ask to overwrite its folder (the runner resumes it)."""
    from pathlib import Path

    from rskip.commands import reproduce
    from rskip.experiments import translation

    args = reproduce.parse_args(["translation", "--full", "--translation_preset", "wmt14", "--variants", "post_ln",
                                 "rskip_ln K=2"])
    preset = reproduce.chosen_preset(args)
    assert (preset["model"], preset["variants"], preset["data"]) == ("transformer-base", ["post_ln", "rskip_ln K=2"],
                                                                     "wmt14")
    assert args.output_dir == Path("runs/reproduce/translation-wmt14-full")
    specs = translation.run_specs(preset, 1, Path("data"), None)
    assert [spec.name for spec in specs] == ["post_ln-seed0", "rskip_ln_K2-seed0"]
    assert specs[0].argv[:4] == ("--dataset_name", "wmt/wmt14", "--dataset_config_name", "de-en")
    args = reproduce.parse_args(["bn", "--mini", "--models", "preact_resnet56", "--data_dir", str(data_dir)])
    assert reproduce.chosen_preset(args)["cifar"]["models"] == ["preact_resnet56"]
    for experiment in ("stability", "translation", "cifar", "bn"):
        module = reproduce.EXPERIMENTS[experiment]
        for name, preset in module.PRESETS.items():
            prepared = {"stability": (Path("data"), Path("tokenizer")), "translation": (Path("data"), Path("tok")),
                        "cifar": (Path("train.parquet"),),
                        "bn": ((Path("data"), Path("tok")), (Path("train.parquet"),))}[experiment]
            for spec in module.run_specs(preset, 2, *prepared):
                assert "--overwrite_output_dir" not in spec.argv and "--output_dir" not in spec.argv, (experiment, name)


def test_verdict_calls_a_gap_within_the_seeds_spread_no_difference():
    from rskip.experiments.summaries import verdict

    assert verdict([30.0, 31.0, 32.0], [30.5, 31.5, 32.5]) == "no difference"
    assert verdict([35.0, 35.1, 35.2], [30.0, 30.1, 30.2]) == "better"
    assert verdict([20.0, 20.1, 20.2], [30.0, 30.1, 30.2]) == "worse"
    assert verdict([35.0], [30.0]) == "no difference"  # one seed: no spread to compare with


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
