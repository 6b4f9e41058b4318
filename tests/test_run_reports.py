"""Reports on finished runs: the model card every run's output folder gets, filled from its own results with the
command, and the comparison of several runs (table and curves)."""

import json

import pytest
from huggingface_hub import ModelCard

from rskip.commands import compare_runs, model_card, train_image_classification, train_translation
from rskip.library_versions import TESTED_VERSIONS
from rskip.training import reporting
from rskip.training.cli import run_main
from rskip.training.model_card import write_model_card
from image_helpers import cifar_parquet, one_torch_thread, tiny_args as image_args  # noqa: F401
from translation_helpers import tiny_args as translation_args
from translation_helpers import write_pairs


@pytest.fixture(scope="module")
def translation_runs(tmp_path_factory, multi30k_dir, marian_tokenizer):
    """Two tiny runs of the same command, post_ln and rskip_ln, with a test split."""
    data = write_pairs(tmp_path_factory.mktemp("pairs"), multi30k_dir)
    runs = {}
    for variant in ("post_ln", "rskip_ln"):
        output_dir = tmp_path_factory.mktemp("runs") / f"m30k-{variant}"
        train_translation.main(translation_args(data, output_dir, marian_tokenizer.name_or_path,
                                                "--test_file", data / "test", "--skip_variant", variant))
        runs[variant] = output_dir
    return runs


def results_of(folder):
    return json.loads((folder / "results.json").read_text())


def test_a_translation_run_writes_its_card(translation_runs):
    folder = translation_runs["rskip_ln"]
    results = results_of(folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "translation" and card.data.library_name == "transformers"
    assert card.data.language == ["en", "de"]
    assert {"rskip", "custom_code", "rskip_ln"} <= set(card.data.tags)
    scores = {(result.dataset_split, result.metric_type): (result.metric_value, result.metric_config)
              for result in card.data.eval_results}
    for split in ("validation", "test"):
        for metric in ("bleu", "chrf"):
            assert scores[(split, metric)] == (results[split][metric], results[split][f"{metric}_signature"])
    assert f"\n{results['command']}\n" in card.text
    assert results["command"].startswith("rskip-train-translation ") and "--skip_variant rskip_ln" in results["command"]
    assert "rSkip+LN) with K = 2" in card.text and "LN_k(x + y_{k-1})" in card.text
    assert 'pipeline("translation", model="m30k-rskip_ln", trust_remote_code=True)' in card.text
    assert results["validation"]["bleu_signature"] in card.text
    assert results["hardware"] in card.text and "CPU cores" in results["hardware"]
    oldest, newest = TESTED_VERSIONS["transformers"]
    assert json.loads((folder / "config.json").read_text())["rskip_compatibility"] == {
        "transformers": f">={oldest},<={newest}"}
    assert f"Tested with transformers >={oldest}, <={newest} (`rskip_compatibility` in `config.json`)" in card.text


def test_a_card_compares_against_a_baseline_run(translation_runs):
    path = write_model_card(translation_runs["rskip_ln"], repo_id="someone/m30k-rskip",
                                       baseline=translation_runs["post_ln"])
    text = path.read_text()
    baseline, ours = results_of(translation_runs["post_ln"]), results_of(translation_runs["rskip_ln"])
    assert "### Against the post_ln baseline\n\nThe same command with only the residual connection changed:" in text
    assert (f"| someone/m30k-rskip (rskip_ln K=2) | {ours['validation']['bleu']} | {ours['validation']['chrf']} | "
            f"{ours['test']['bleu']} | {ours['test']['chrf']} |") in text
    assert (f"| baseline (post_ln) | {baseline['validation']['bleu']} | {baseline['validation']['chrf']} | "
            f"{baseline['test']['bleu']} | {baseline['test']['chrf']} |") in text
    assert ModelCard.load(path).data.model_name == "someone/m30k-rskip"


def test_an_image_run_writes_its_card(tmp_path, cifar_parquet):  # noqa: F811
    output_dir = tmp_path / "c10-rskip"
    train_image_classification.main(image_args(cifar_parquet, output_dir, "--skip_variant", "xskip_ln",
                                               "--skip_scale", "2.0"))
    results = results_of(output_dir)
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "timm" in card.data.tags
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", results["validation"]["top1"])
    assert "with λ = 2.0" in card.text and "LN(λ·x + F(x))" in card.text
    assert "`preact_resnet20` image classifier" in card.text and "10 classes" in card.text
    ranges = {library: ">={},<={}".format(*TESTED_VERSIONS[library]) for library in ("transformers", "timm")}
    assert json.loads((output_dir / "config.json").read_text())["rskip_compatibility"] == ranges
    assert (f"Tested with transformers {ranges['transformers'].replace(',', ', ')} and timm "
            f"{ranges['timm'].replace(',', ', ')} (`rskip_compatibility` in `config.json`)") in card.text
    assert f"\n{results['command']}\n" in card.text


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="has no results.json or config.json"):
        write_model_card(tmp_path)
    with pytest.raises(SystemExit):
        model_card.main([str(tmp_path)])
    assert "is not a finished training run's output folder" in capsys.readouterr().err


def test_compare_runs_prints_a_table_and_plots_the_curves(translation_runs, tmp_path, capsys):
    png = tmp_path / "comparison.png"
    compare_runs.main([str(translation_runs["post_ln"]), str(translation_runs["rskip_ln"]), "--output", str(png)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "best", "step", "valid", "loss", "valid", "bleu", "valid", "chrf",
                                "test", "bleu", "test", "chrf", "train", "min"]
    for line, variant in zip(lines[1:3], ("post_ln", "rskip_ln K=2")):
        results = results_of(translation_runs[variant.split()[0]])
        assert line.startswith(f"{variant} (m30k-{variant.split()[0]})")
        assert line.split()[-6:-1] == [f"{value:.2f}" for value in (
            results["validation"]["loss"], results["validation"]["bleu"], results["validation"]["chrf"],
            results["test"]["bleu"], results["test"]["chrf"])]
    assert lines[3].startswith("BLEU nrefs:1|")
    assert png.stat().st_size > 0


def test_compare_runs_refuses_a_folder_without_results(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_runs.main([str(tmp_path)])
    assert "has no results.json" in capsys.readouterr().err


def test_a_card_that_fails_costs_nothing_and_names_the_command_that_writes_it(tmp_path, multi30k_dir,
                                                                              marian_tokenizer, monkeypatch, capsys):
    data = write_pairs(tmp_path / "pairs", multi30k_dir)
    output_dir = tmp_path / "run"

    def broken_card(*args, **kwargs):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(reporting, "write_model_card", broken_card)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train_translation.main(translation_args(data, output_dir, marian_tokenizer.name_or_path,
                                                                 "--diagnostics_steps", "0", "--checkpointing_steps", "2")))
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the run finished, but writing its model card {output_dir / 'README.md'} failed "
                      f"(OSError: disk quota exceeded); the model, results.json and checkpoints are saved: write the "
                      f"card with `rskip-model-card {output_dir}`"]
    for name in ("results.json", "model.safetensors", "config.json", "diagnostics.json", "validation_curves.png"):
        assert (output_dir / name).is_file(), name
    assert list((output_dir / "checkpoints").iterdir()) and not (output_dir / "README.md").exists()

    monkeypatch.undo()
    model_card.main([str(output_dir)])
    assert ModelCard.load(output_dir / "README.md").data.model_name == "run"
