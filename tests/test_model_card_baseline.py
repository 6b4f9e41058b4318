"""A model card's comparison with a baseline run (`--baseline`): only a run of the same task, and the card says
"the same command with only the residual connection changed" only when the two commands differ in nothing else
(the recorded settings of results.json, bookkeeping such as --output_dir aside); otherwise it lists the settings.

The runs are recorded by hand (results.json and config.json as the training scripts write them), so these tests
need no training; tests/test_run_reports.py checks the cards of real runs."""

import json

import pytest

from rskip.commands import model_card
from rskip.training.model_card import setting_differences, write_model_card

SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
TRANSLATION_ARGS = {
    "source_lang": "en", "target_lang": "de", "train_file": "data/train.json", "model_preset": "transformer-small",
    "model_name_or_path": None, "learning_rate": 0.0005, "label_smoothing": 0.1, "num_beams": 4, "seed": 42,
    "max_train_steps": 1000, "per_device_train_batch_size": 64,
}
IMAGE_ARGS = {
    "train_dir": "data/cifar10/train", "model": "preact_resnet20", "optimizer": "sgd", "learning_rate": 0.1,
    "lr_scheduler_type": "multistep", "per_device_train_batch_size": 128, "seed": 42, "augmentation": "cifar",
}


def record_run(folder, task, skip_variant, command_flags="", **args):
    """A finished run's output folder: results.json (with the command and its settings) and config.json."""
    folder.mkdir(parents=True)
    skip = {"skip_variant": skip_variant, "skip_scale": 1.0, "skip_recursions": 2, "skip_share_norm": False,
            "skip_learnable_scale": False}
    if task == "translation":
        script, config = "rskip-train-translation", {
            "model_type": "rskip_marian", "encoder_layers": 3, "decoder_layers": 3, "d_model": 256}
        args = {**TRANSLATION_ARGS, **args}
        validation = {"loss": 2.5, "bleu": 30.1 if skip_variant == "rskip_ln" else 29.4, "chrf": 55.0,
                      "bleu_signature": f"BLEU {SIGNATURE}", "chrf_signature": "chrF2 nrefs:1"}
    else:
        skip["skip_norm_dims"] = "chw"
        script, config = "rskip-train-image-classification", {
            "model_type": "rskip_resnet", "backbone": "preact_resnet20",
            "id2label": {str(i): str(i) for i in range(10)}}
        args = {**IMAGE_ARGS, **args}
        validation = {"loss": 0.9, "top1": 71.5 if skip_variant == "rskip_ln" else 70.2}
    args = {**args, **{key: value for key, value in skip.items()}, "output_dir": str(folder), "hub_token": None}
    results = {
        "skip": skip, "num_parameters": 1_000_000, "best_step": 900, "validation": validation, "steps": 1000,
        "train_runtime_s": 600.0, "hardware": "1 process on 2 CPU cores (x86_64), 2 threads each", "history": [],
        "args": args,
        "command": f"/somewhere/{script} --output_dir {folder} --skip_variant {skip_variant} {command_flags}".strip(),
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def comparison_section(card_text):
    return card_text[card_text.index("### Against"):card_text.index("## Limitations")]


@pytest.mark.parametrize("task", ["translation", "image_classification"])
def test_a_baseline_of_the_same_command_is_said_to_differ_only_in_the_residual_connection(tmp_path, task):
    ours = record_run(tmp_path / "rskip", task, "rskip_ln")
    baseline = record_run(tmp_path / "post", task, "post_ln")
    text = comparison_section(write_model_card(ours, baseline=baseline).read_text())
    assert "The same command with only the residual connection changed:" in text
    assert "| setting |" not in text and "Not the same command" not in text
    assert "| baseline (post_ln) |" in text


def test_a_baseline_of_the_same_command_and_variant_is_called_another_run(tmp_path):
    ours = record_run(tmp_path / "one", "translation", "rskip_ln")
    baseline = record_run(tmp_path / "two", "translation", "rskip_ln")
    text = comparison_section(write_model_card(ours, baseline=baseline).read_text())
    assert "The same command and the same residual connection (another run):" in text
    assert "only the residual connection changed" not in text


@pytest.mark.parametrize("task", ["translation", "image_classification"])
def test_a_baseline_with_other_settings_lists_every_difference(tmp_path, task):
    ours = record_run(tmp_path / "rskip", task, "rskip_ln", learning_rate=0.001, seed=7)
    baseline = record_run(tmp_path / "post", task, "post_ln", per_device_train_batch_size=32, seed=None)
    text = comparison_section(write_model_card(ours, baseline=baseline).read_text())
    assert "only the residual connection changed:" not in text.replace("Not the same command with only", "")
    assert text.startswith("### Against the post_ln baseline\n\nNot the same command with only the residual "
                           "connection changed: these\nsettings differ too, so the scores do not compare")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    base_rate = {"translation": TRANSLATION_ARGS, "image_classification": IMAGE_ARGS}[task]["learning_rate"]
    base_batch = {"translation": 64, "image_classification": 128}[task]
    assert table == [
        f"| `learning_rate` | `0.001` | `{base_rate}` |",
        f"| `per_device_train_batch_size` | `{base_batch}` | `32` |",
        "| `seed` | `7` | (not set) |",
    ]


def test_differences_cover_the_script_and_settings_one_run_lacks_but_not_skip_options_or_bookkeeping(tmp_path):
    ours = json.loads((record_run(tmp_path / "a", "translation", "rskip_ln", num_beams=4, joint_vocab=True,
                                  report_to="wandb", hub_model_id="me/a", skip_recursions=3)
                       / "results.json").read_text())
    base = json.loads((record_run(tmp_path / "b", "translation", "post_ln") / "results.json").read_text())
    base["command"] = base["command"].replace("rskip-train-translation", "python scripts/trainer_translation.py")
    assert setting_differences(ours, base) == [
        {"setting": "script", "run": "rskip-train-translation", "baseline": "trainer_translation.py"},
        {"setting": "joint_vocab", "run": "`true`", "baseline": "(not recorded)"},
    ]
    assert setting_differences(ours, ours) == []


def test_a_value_with_a_pipe_keeps_the_table_intact(tmp_path):
    ours = record_run(tmp_path / "a", "translation", "rskip_ln", config_overrides="a|b")
    baseline = record_run(tmp_path / "b", "translation", "post_ln")
    text = write_model_card(ours, baseline=baseline).read_text()
    assert '| `config_overrides` | `"a\\|b"` | (not recorded) |' in text


@pytest.mark.parametrize("ours_task, base_task", [("translation", "image_classification"),
                                                  ("image_classification", "translation")])
def test_a_baseline_of_another_task_is_refused(tmp_path, capsys, ours_task, base_task):
    ours = record_run(tmp_path / "ours", ours_task, "rskip_ln")
    baseline = record_run(tmp_path / "other", base_task, "post_ln")
    message = (f"the baseline {baseline} is a {base_task} run and {ours} a {ours_task} run; a baseline must be a run "
               f"of the same task ({ours_task})")
    with pytest.raises(ValueError) as error:
        write_model_card(ours, baseline=baseline)
    assert str(error.value) == message
    assert not (ours / "README.md").exists()
    with pytest.raises(SystemExit):
        model_card.main([str(ours), "--baseline", str(baseline)])
    assert message in capsys.readouterr().err


def test_a_baseline_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    ours = record_run(tmp_path / "ours", "translation", "rskip_ln")
    with pytest.raises(SystemExit):
        model_card.main([str(ours), "--baseline", str(tmp_path / "missing")])
    assert "is not a finished training run's output folder" in capsys.readouterr().err
