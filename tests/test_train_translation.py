"""scripts/train_translation.py: a complete run's output folder, the data formats, batching, loss normalisation,
stop-and-resume equality, fine-tuning a stock Marian checkpoint."""

import json
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, MarianConfig, MarianMTModel

from rskip.commands import train_translation
from rskip.training import translation
from rskip.training.cli import parse_translation_args
from conftest import REPO, read_lines
from rskip import RSkipMarianConfig, RSkipMarianMTModel
from rskip.training.checkpoints import list_checkpoints
from translation_helpers import tiny_args, write_pairs

PIPELINE = """
import json, sys
from transformers import pipeline
translator = pipeline("translation", model=sys.argv[1], trust_remote_code=True)
print(json.dumps(translator(json.loads(sys.argv[2]))))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory, multi30k_dir):
    return write_pairs(tmp_path_factory.mktemp("pairs"), multi30k_dir)


@pytest.fixture(scope="module")
def tokenizer_dir(marian_tokenizer):
    return marian_tokenizer.name_or_path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, multi30k_dir):
    """A whole run on Multi30k's gzipped files: tokenizer trained on the training data, tracking on, test set,
    a mocked push to the Hub."""
    output_dir = tmp_path_factory.mktemp("run") / "m30k-rskip"
    args = [
        "--train_file", str(multi30k_dir / "train"), "--validation_file", str(multi30k_dir / "val"),
        "--test_file", str(multi30k_dir / "test_2016_flickr"), "--max_train_samples", "64",
        "--max_eval_samples", "8", "--max_predict_samples", "6", "--source_lang", "en", "--target_lang", "de",
        "--vocab_size", "300", "--model_preset", "transformer-tiny", "--skip_variant", "rskip_ln",
        "--skip_recursions", "2", "--max_tokens", "256", "--max_train_steps", "4", "--num_warmup_steps", "2",
        "--eval_steps", "2", "--num_beams", "2", "--val_max_target_length", "8", "--checkpointing_steps", "2",
        "--with_tracking", "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "someone/m30k-rskip",
        "--output_dir", str(output_dir),
    ]
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://hub/someone/m30k-rskip") as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder") as upload, \
            mock.patch("huggingface_hub.HfApi.auth_check"), mock.patch.dict("os.environ", {"HF_TOKEN": "hf_test"}):
        results = train_translation.main(args)
    return output_dir, results, create, upload


def test_output_folder_is_a_hub_ready_model(finished_run):
    output_dir, results, _, _ = finished_run
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "rskip_marian"
    assert config["skip_variant"] == "rskip_ln" and config["skip_recursions"] == 2
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_rskip_marian.RSkipMarianMTModel"
    for code in ("configuration_rskip_marian.py", "modeling_rskip_marian.py", "residual.py", "pipeline_translation.py"):
        assert (output_dir / code).is_file()
    generation = json.loads((output_dir / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_new_tokens"]) == (2, 8)
    assert type(AutoTokenizer.from_pretrained(output_dir)).__name__ == "MarianTokenizer"
    assert (output_dir / "validation_curves.png").stat().st_size > 0
    assert len((output_dir / "predictions_test.txt").read_text().splitlines()) == 6
    assert len((output_dir / "predictions_validation.txt").read_text().splitlines()) == 8


def test_results_hold_scores_with_their_sacrebleu_signatures(finished_run):
    output_dir, results, _, _ = finished_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["best_step"] in (2, 4) and [record["step"] for record in saved["history"]] == [2, 4]
    for split in ("validation", "test"):
        scores = saved[split]
        assert {"bleu", "chrf", "loss"} <= set(scores)
        assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        assert "version:2.6.0" in scores["chrf_signature"]
    assert saved["validation"]["bleu"] == max(record["bleu"] for record in saved["history"])
    assert saved["test"] == results["test"]


def test_the_best_model_is_the_one_saved(finished_run):
    output_dir, results, _, _ = finished_run
    best = load_file(output_dir / "checkpoints" / f"step_{results['best_step']}" / "model.safetensors")
    saved = load_file(output_dir / "model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, best[name], rtol=0, atol=0, msg=name)


def test_the_trained_tokenizer_is_a_joint_sentencepiece_marian_tokenizer(finished_run):
    output_dir, *_ = finished_run
    assert (output_dir / "source.spm").read_bytes() == (output_dir / "target.spm").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert 250 < len(tokenizer) < 350
    assert tokenizer.pad_token_id == len(tokenizer) - 1 and tokenizer.eos_token_id == 0


def test_pipeline_in_a_fresh_process_translates_as_the_model_does(finished_run, run_python, multi30k_dir):
    output_dir, *_ = finished_run
    sources = read_lines(multi30k_dir / "test_2016_flickr.en.gz", 2)
    result = run_python(PIPELINE, output_dir, json.dumps(sources))
    translations = [output["translation_text"] for output in json.loads(result.stdout.strip().splitlines()[-1])]

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = RSkipMarianMTModel.from_pretrained(output_dir).eval()
    expected = [tokenizer.decode(model.generate(**tokenizer(text, return_tensors="pt"))[0], skip_special_tokens=True)
                for text in sources]
    assert translations == expected


def test_tracking_writes_tensorboard_events(finished_run):
    output_dir, *_ = finished_run
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))


def test_checkpoints_are_complete_and_temporary_folders_gone(finished_run):
    output_dir, *_ = finished_run
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2", "step_4"]
    assert sorted(path.name for path in (output_dir / "checkpoints" / "step_4").iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "run_state.json", "scheduler.bin",
        "tokenizer"]
    assert not list(output_dir.rglob(".tmp-*")) and not list(output_dir.rglob(".old-*"))


# ------------------------------------------------------------------------------------------------- data

def load(*args):
    return translation.load_raw_datasets(parse_translation_args([
        "--source_lang", "en", "--target_lang", "de", "--model_preset", "transformer-tiny", "--output_dir", "x",
        *args]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


PAIRS = [("A dog runs.", "Ein Hund rennt."), ("Two men sit.", "Zwei Männer sitzen."), ("A cat.", "Eine Katze.")]


def test_reads_json_lines_in_the_translation_format(tmp_path):
    rows = [{"translation": {"en": en, "de": de, "fr": "x"}} for en, de in PAIRS]
    raw = load("--train_file", str(write_jsonl(tmp_path / "train.jsonl", rows)),
               "--validation_file", str(write_jsonl(tmp_path / "valid.json", rows[:1])))
    assert raw["train"]["source"][:] == [en for en, _ in PAIRS] and raw["train"]["target"][:] == [de for _, de in PAIRS]
    assert raw["validation"]["target"][:] == [PAIRS[0][1]] and "test" not in raw


@pytest.mark.parametrize("layout", ["translation", "columns"])
def test_reads_a_dataset_folder_as_from_the_hub(tmp_path, layout):
    """`--dataset_name` goes through `load_dataset(name)`, as for bentrevett/multi30k (one column per language)
    or WMT-style datasets (a 'translation' column)."""
    for split in ("train", "validation", "test"):
        rows = [{"translation": {"en": en, "de": de}} if layout == "translation" else {"en": en, "de": de, "id": i}
                for i, (en, de) in enumerate(PAIRS)]
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    raw = load("--dataset_name", str(tmp_path), "--max_eval_samples", "2")
    assert set(raw) == {"train", "validation", "test"}
    assert raw["train"].column_names == ["source", "target"]
    assert raw["test"]["target"][:] == [de for _, de in PAIRS] and len(raw["validation"]) == 2


def test_reads_plain_and_gzipped_parallel_text(data, multi30k_dir):
    raw = load("--train_file", str(data / "train"), "--validation_file", str(multi30k_dir / "val"),
               "--max_eval_samples", "5")
    assert len(raw["train"]) == 48 and len(raw["validation"]) == 5
    assert raw["validation"]["source"][:] == read_lines(multi30k_dir / "val.en.gz", 5)
    assert raw["train"]["target"][:] == (data / "train.de").read_text().splitlines()


# --------------------------------------------------------------------------------------------- batching

def test_token_batches_group_similar_lengths_within_the_budget():
    lengths = list(torch.randint(1, 40, (500,), generator=torch.Generator().manual_seed(0)).tolist())
    sampler = translation.LengthBatchSampler(lengths, max_tokens=128, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert len(batches) == len(sampler)
    # In length order (full batches before a remainder), each batch is followed by the one it could not take.
    spans = sorted((min(lengths[i] for i in batch), max(lengths[i] for i in batch), -len(batch)) for batch in batches)
    spans = [(shortest, longest, -size) for shortest, longest, size in spans]
    for (_, longest, size), (next_shortest, _, _) in zip(spans, spans[1:]):
        assert longest * size <= 128  # within the budget...
        assert longest * (size + 1) > 128 or next_shortest * (size + 1) > 128  # ...and full
        assert longest <= next_shortest  # batches are runs of the length-sorted examples
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(list(sampler)) == len(batches)
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_sentence_batches_are_random_and_complete():
    sampler = translation.LengthBatchSampler([5] * 10, batch_size=4, seed=0)
    batches = list(sampler)
    assert [len(batch) for batch in batches] == [4, 4, 2] and len(sampler) == 3
    assert sorted(i for batch in batches for i in batch) == list(range(10)) and batches[0] != [0, 1, 2, 3]


def test_loss_is_averaged_over_the_tokens_of_the_whole_update(tmp_path, data, tokenizer_dir):
    """Two micro-batches of 4 sentences, accumulated, give the update of one batch of 8: each micro-batch's loss is
    summed over its tokens and divided by the update's token count (a mean per micro-batch would differ, as the
    micro-batches hold different numbers of target tokens)."""
    runs = {}
    for name, batch_size, accumulation in (("accumulated", 4, 2), ("one_batch", 8, 1)):
        args = tiny_args(data, tmp_path / name, tokenizer_dir, "--config_overrides", "dropout=0.0",
                         "--checkpointing_steps", "4")
        args = [a for a in args if a not in ("--max_tokens", "256")]
        train_translation.main([*args, "--per_device_train_batch_size", str(batch_size),
                                "--gradient_accumulation_steps", str(accumulation)])
        runs[name] = load_file(tmp_path / name / "checkpoints" / "step_4" / "model.safetensors")
    for name, tensor in runs["accumulated"].items():
        torch.testing.assert_close(tensor, runs["one_batch"][name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------- resume

def test_a_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path, data, tokenizer_dir):
    """Run A trains 6 updates; run B stops after 3 (mid-epoch), then resumes from its checkpoint. Dropout is on, so
    RNG states matter; updates 4-6 cross into the next epoch, so the data position and reshuffling matter."""
    common = ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--eval_steps", "3"]
    train_translation.main([*tiny_args(data, tmp_path / "a", tokenizer_dir, *common), "--max_train_steps", "6"])
    train_translation.main([*tiny_args(data, tmp_path / "b", tokenizer_dir, *common), "--max_train_steps", "3"])
    train_translation.main([*tiny_args(data, tmp_path / "b", tokenizer_dir, *common), "--max_train_steps", "6",
                            "--resume_from_checkpoint", "latest"])

    states = {run: json.loads((tmp_path / run / "checkpoints" / "step_6" / "run_state.json").read_text())
              for run in "ab"}
    middle = json.loads((tmp_path / "b" / "checkpoints" / "step_3" / "run_state.json").read_text())
    assert middle["epoch"] == 0 and 0 < middle["batches_in_epoch"] and states["a"]["epoch"] >= 1
    # The same state but for the seconds trained, which the resumed run adds up over its sittings.
    seconds = {run: states[run].pop("train_seconds") for run in "ab"}
    assert states["a"] == states["b"]
    assert seconds["b"] > middle["train_seconds"] > 0
    weights = {run: load_file(tmp_path / run / "checkpoints" / "step_6" / "model.safetensors") for run in "ab"}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]), name
    optimizers = {run: torch.load(tmp_path / run / "checkpoints" / "step_6" / "optimizer.bin") for run in "ab"}
    for index, state in optimizers["a"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], optimizers["b"]["state"][index]["exp_avg_sq"])
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in "ab"}
    assert results["a"]["history"] == results["b"]["history"]
    assert results["a"]["best_step"] == results["b"]["best_step"]


# ---------------------------------------------------------------------------------------------- models

@pytest.fixture
def stock_marian(tmp_path, marian_tokenizer):
    """A stock (transformers) Marian checkpoint with its tokenizer, as on the Hub."""
    tok = marian_tokenizer
    config = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                          decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    MarianMTModel(config).save_pretrained(tmp_path / "opus-mt-en-de")
    tok.save_pretrained(tmp_path / "opus-mt-en-de")
    return tmp_path / "opus-mt-en-de"


def build(*args):
    args = parse_translation_args(["--train_file", "x", "--validation_file", "y", "--source_lang", "en",
                                         "--target_lang", "de", "--output_dir", "out", *args])
    return translation.build_model(args, AutoTokenizer.from_pretrained(args.tokenizer_name or
                                                                             args.model_name_or_path))


def test_a_stock_marian_checkpoint_is_patched_with_rskip(stock_marian):
    model = build("--model_name_or_path", str(stock_marian), "--skip_variant", "rskip_ln", "--skip_recursions", "3")
    stock = MarianMTModel.from_pretrained(stock_marian)
    assert isinstance(model, RSkipMarianMTModel) and model.config.skip_recursions == 3
    layer = model.model.encoder.layers[1]
    torch.testing.assert_close(layer.fc1.weight, stock.model.encoder.layers[1].fc1.weight)
    torch.testing.assert_close(layer.final_layer_norm.weight, stock.model.encoder.layers[1].final_layer_norm.weight)
    assert len(layer.final_layer_norm.recursion_norms) == 2


def test_a_new_skip_variant_resets_the_checkpoints_other_skip_options(stock_marian, tmp_path):
    build("--model_name_or_path", str(stock_marian), "--skip_recursions", "3").save_pretrained(tmp_path / "k3")
    AutoTokenizer.from_pretrained(stock_marian).save_pretrained(tmp_path / "k3")
    assert build("--model_name_or_path", str(tmp_path / "k3")).config.skip_recursions == 3
    post_ln = build("--model_name_or_path", str(tmp_path / "k3"), "--skip_variant", "post_ln").config
    assert (post_ln.skip_variant, post_ln.skip_recursions) == ("post_ln", 2)


def test_fine_tunes_a_stock_marian_checkpoint_end_to_end(tmp_path, data, stock_marian):
    args = tiny_args(data, tmp_path / "fine-tuned", None, "--max_train_steps", "2")
    args[args.index("--model_preset"):args.index("--model_preset") + 2] = ["--model_name_or_path", str(stock_marian)]
    train_translation.main([*args, "--skip_variant", "rskip_ln"])
    config = AutoConfig.from_pretrained(tmp_path / "fine-tuned", trust_remote_code=True)
    assert (config.model_type, config.skip_variant, config.d_model) == ("rskip_marian", "rskip_ln", 32)


def test_mixed_precision_bf16_trains(tmp_path, data, tokenizer_dir):
    """In its own process: Accelerate keeps one precision per process."""
    command = [sys.executable, str(REPO / "scripts" / "train_translation.py"),
               *tiny_args(data, tmp_path / "bf16", tokenizer_dir, "--mixed_precision", "bf16",
                          "--max_train_steps", "2")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert results["args"]["mixed_precision"] == "bf16" and results["validation"]["loss"] < 10


@pytest.mark.parametrize("preset, millions", [("transformer-base", 65), ("transformer-big", 213)])
def test_vaswani_presets_have_the_papers_size(preset, millions):
    """With a 37k joint vocabulary, as in Vaswani et al. (2017), Table 3: 65M and 213M parameters."""
    config = translation.MODEL_PRESETS[preset]
    assert (config["activation_function"], config["scale_embedding"], config["tie_word_embeddings"]) == \
        ("relu", True, True)
    with torch.device("meta"):
        model = RSkipMarianMTModel(RSkipMarianConfig(**config, vocab_size=37000, pad_token_id=36999,
                                                     skip_variant="post_ln"))
    assert abs(model.num_parameters() / 1e6 - millions) < 0.03 * millions
