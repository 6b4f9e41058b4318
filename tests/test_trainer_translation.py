"""scripts/trainer_translation.py: RSkipMarian trained by Seq2SeqTrainer, with train_translation.py's data and model."""

import json

import trainer_translation
from rskip import RSkipMarianMTModel
from translation_helpers import write_pairs


def test_seq2seq_trainer_trains_evaluates_and_saves_an_rskip_model(tmp_path, multi30k_dir, marian_tokenizer):
    data = write_pairs(tmp_path / "data", multi30k_dir)
    metrics = trainer_translation.main([
        "--train_file", str(data / "train"), "--validation_file", str(data / "valid"), "--source_lang", "en",
        "--target_lang", "de", "--model_preset", "transformer-tiny", "--skip_variant", "rskip_ln",
        "--skip_recursions", "3", "--tokenizer_name", marian_tokenizer.name_or_path, "--num_beams", "2",
        "--val_max_target_length", "8", "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
        "--lr_scheduler_type", "inverse_sqrt", "--warmup_steps", "2", "--adam_beta2", "0.98",
        "--label_smoothing_factor", "0.1", "--eval_strategy", "steps", "--eval_steps", "2",
        "--predict_with_generate", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    ])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["eval_bleu"] == metrics["eval_bleu"] and 0 <= saved["eval_chrf"] <= 100
    assert saved["eval_bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    model = RSkipMarianMTModel.from_pretrained(tmp_path / "out")
    assert (model.config.skip_variant, model.config.skip_recursions) == ("rskip_ln", 3)
    assert model.generation_config.num_beams == 2
