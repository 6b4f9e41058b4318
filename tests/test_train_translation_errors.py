"""scripts/train_translation.py on bad input: one clear message naming what is wrong, and nothing lost."""

import gzip
import json
import subprocess
import sys

import pytest

from rskip.commands import train_translation
from rskip.training import translation
from rskip.training.cli import parse_translation_args
from conftest import REPO
from rskip.training import TrainingError
from rskip.training.checkpoints import list_checkpoints
from translation_helpers import tiny_args, write_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory, multi30k_dir):
    return write_pairs(tmp_path_factory.mktemp("pairs"), multi30k_dir)


def load(*args):
    return translation.load_raw_datasets(parse_translation_args([
        "--source_lang", "en", "--target_lang", "de", "--model_preset", "transformer-tiny", "--output_dir", "x",
        *args]))


def parallel(folder, name, en_lines, de_lines):
    (folder / f"{name}.en").write_text("".join(line + "\n" for line in en_lines))
    (folder / f"{name}.de").write_text("".join(line + "\n" for line in de_lines))
    return str(folder / name)


def test_missing_files_are_named(tmp_path, data):
    with pytest.raises(TrainingError, match=r"no file .*/nowhere/train\.en or .*train\.en\.gz .*'en'.*no file st"):
        (tmp_path / "nowhere").mkdir()
        load("--train_file", str(tmp_path / "nowhere" / "train"), "--validation_file", str(data / "valid"))
    with pytest.raises(TrainingError, match=r"missing\.jsonl: no such file"):
        load("--train_file", str(tmp_path / "missing.jsonl"), "--validation_file", str(data / "valid"))


def test_an_unreadable_file_is_named(tmp_path, data):
    (tmp_path / "train.en.gz").write_bytes(b"not gzip at all")
    (tmp_path / "train.de.gz").write_bytes(gzip.compress(b"Hallo\n"))
    with pytest.raises(TrainingError, match=r"cannot read .*train\.en\.gz"):
        load("--train_file", str(tmp_path / "train"), "--validation_file", str(data / "valid"))


def test_a_line_count_mismatch_names_both_files_and_counts(tmp_path, data):
    prefix = parallel(tmp_path, "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(TrainingError, match=r"train\.en has 3 lines but .*train\.de has 2"):
        load("--train_file", prefix, "--validation_file", str(data / "valid"))


def test_an_empty_line_is_located_and_can_be_dropped(tmp_path, data):
    prefix = parallel(tmp_path, "train", ["a", "b", "c", "d"], ["w", "x", " ", "z"])
    with pytest.raises(TrainingError, match=r"train\.en / .*train\.de: line 3 has an empty target sentence"):
        load("--train_file", prefix, "--validation_file", str(data / "valid"))
    raw = load("--train_file", prefix, "--validation_file", str(data / "valid"), "--drop_empty_pairs")
    assert raw["train"]["source"][:] == ["a", "b", "d"]


def test_an_unknown_language_lists_the_available_ones(tmp_path, data):
    with pytest.raises(TrainingError, match=r"language 'fr'.*files with this prefix: train\.de, train\.en "
                                            r"\(languages: de, en\)"):
        load("--train_file", str(data / "train"), "--validation_file", str(data / "valid"), "--target_lang", "fr")
    rows = [{"translation": {"en": "a", "de": "b"}}]
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(TrainingError, match=r"train\.jsonl has no language 'fr'; its translations are in: de, en"):
        load("--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "train.jsonl"),
             "--target_lang", "fr")
    hub = tmp_path / "hub"
    hub.mkdir()
    for split in ("train", "validation"):
        (hub / f"{split}.jsonl").write_text(json.dumps({"en": "a", "cs": "b"}) + "\n")
    with pytest.raises(TrainingError, match=r"\[train\] has no language 'de'; its columns are: en, cs"):
        load("--dataset_name", str(hub))
    with pytest.raises(TrainingError, match=r"has no 'dev' split; it has: train, validation"):
        load("--dataset_name", str(hub), "--validation_split_name", "dev")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path, marian_tokenizer):
    from rskip import RSkipMarianConfig, RSkipMarianMTModel

    RSkipMarianMTModel(RSkipMarianConfig(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8,
                                         decoder_ffn_dim=8, pad_token_id=98)).save_pretrained(tmp_path / "model")
    args = parse_translation_args(["--train_file", "x", "--validation_file", "y", "--source_lang", "en",
                                         "--target_lang", "de", "--output_dir", "out",
                                         "--model_name_or_path", str(tmp_path / "model")])
    with pytest.raises(TrainingError, match=rf"tokenizer \({len(marian_tokenizer)} tokens, pad id "
                                            rf"{marian_tokenizer.pad_token_id}\) does not match the model \(99 "
                                            rf"embeddings, pad id 98\)"):
        translation.build_model(args, marian_tokenizer)


@pytest.mark.parametrize("flags, message", [
    (["--skip_recursions", "0"], "argument --skip_recursions: skip_recursions=0 is not a valid recursion depth K; allowed: an integer >= 1"),
    (["--skip_variant", "post_ln", "--skip_recursions", "3"],
     "argument --skip_recursions: skip_recursions=3 is set but skip_variant='post_ln' does not use it"),
    (["--skip_variant", "xskip", "--skip_scale", "-1"], "argument --skip_scale: skip_scale=-1.0 is not a valid λ for skip_variant='xskip'; allowed: a number > 0"),
    (["--skip_variant", "rskip"], "argument --skip_variant: invalid choice: 'rskip' (choose from 'plain', 'post_ln'"),
    (["--checkpointing_steps", "often"], "argument --checkpointing_steps: expected a number of steps or 'epoch'"),
])
def test_bad_command_lines_name_the_flag_value_and_allowed_values(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_translation_args(["--train_file", "x", "--validation_file", "y", "--source_lang", "en",
                                      "--target_lang", "de", "--model_preset", "transformer-tiny",
                                      "--output_dir", "out", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_resume_path_that_is_not_a_checkpoint_is_refused(tmp_path, data, marian_tokenizer):
    (tmp_path / "not-a-checkpoint").mkdir()
    for path, message in [(tmp_path / "not-a-checkpoint", r"is not a checkpoint of this project \(it has no "
                                                          r"run_state\.json\)"),
                          (tmp_path / "nowhere", "nowhere: no such folder")]:
        with pytest.raises(TrainingError, match=message):
            train_translation.main(tiny_args(data, tmp_path / "run", marian_tokenizer.name_or_path,
                                             "--resume_from_checkpoint", path))


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, data, marian_tokenizer):
    args = tiny_args(data, tmp_path / "run", marian_tokenizer.name_or_path, "--checkpointing_steps", "2",
                     "--max_train_steps", "2")
    train_translation.main(args)
    with pytest.raises(TrainingError, match=r"checkpoint .*step_2 belongs to another configuration.*\n"
                                            r"  learning_rate: 0\.0005 in the checkpoint, 0\.001 now"):
        train_translation.main([*args, "--learning_rate", "1e-3", "--resume_from_checkpoint",
                                str(tmp_path / "run" / "checkpoints" / "step_2")])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, marian_tokenizer):
    """An absurd learning rate makes the loss NaN at the third update (the first runs at warmup's zero rate)."""
    output_dir = tmp_path / "run"
    args = tiny_args(data, output_dir, marian_tokenizer.name_or_path, "--learning_rate", "1e30",
                     "--num_warmup_steps", "1", "--checkpointing_steps", "1", "--max_train_steps", "6")
    with pytest.raises(TrainingError, match=r"the training loss is nan at step 3; .*the last good checkpoint is "
                                            r".*checkpoints/step_2\)"):
        train_translation.main(args)
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_1", "step_2"]
    assert json.loads((output_dir / "checkpoints" / "step_2" / "run_state.json").read_text())["step"] == 2
    assert not (output_dir / "results.json").exists()


def test_the_command_line_reports_errors_without_a_traceback(tmp_path, data):
    command = [sys.executable, str(REPO / "scripts" / "train_translation.py"),
               *tiny_args(data, tmp_path / "run", None, "--target_lang", "fr")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1].startswith("error: no file ")
    assert "Traceback" not in completed.stderr
