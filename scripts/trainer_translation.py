"""Train RSkipMarian with transformers' `Seq2SeqTrainer` instead of our Accelerate loop.

The data, tokenizer and model flags are `train_translation.py`'s (`rskip.training.cli`) (`--train_file`, `--dataset_name`,
`--source_lang`, `--model_preset`, `--skip_variant`, `--num_beams`...); every other flag is a
`Seq2SeqTrainingArguments` field. For example, the Transformer recipe on Multi30k:

    python scripts/trainer_translation.py --train_file ../shared/data/multi30k/train \
        --validation_file ../shared/data/multi30k/val --source_lang en --target_lang de \
        --model_preset transformer-small --skip_variant rskip_ln --skip_recursions 2 \
        --output_dir runs/m30k-trainer --max_steps 2000 --per_device_train_batch_size 64 \
        --learning_rate 5e-4 --lr_scheduler_type inverse_sqrt --warmup_steps 400 --adam_beta2 0.98 \
        --label_smoothing_factor 0.1 --max_grad_norm 1.0 --eval_strategy steps --eval_steps 500 \
        --predict_with_generate --generation_num_beams 4 --report_to none

The Trainer's batches are sentence-based and its loss is the mean over each micro-batch's tokens, divided by the
gradient-accumulation steps. RSkipMarianMTModel sets `accepts_loss_kwargs = False` so that the Trainer does that
division (Marian's loss ignores the `num_items_in_batch` the Trainer would otherwise rely on).
"""

import numpy as np
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from rskip.training.cli import parse_trainer_args, parse_translation_args, run_main
from rskip.training.translation import build_model, load_raw_datasets, load_tokenizer, load_translation_metric, tokenize


def main(argv=None):
    training_args, args = parse_trainer_args(Seq2SeqTrainingArguments, parse_translation_args, argv)

    with training_args.main_process_first():
        raw = load_raw_datasets(args)
        tokenizer = load_tokenizer(args, raw, None, training_args.process_index == 0)
        tokenized = tokenize(raw, tokenizer, args)
    model = build_model(args, tokenizer)
    metric = load_translation_metric()  # BLEU and chrF with their sacreBLEU signatures, through `evaluate`

    def compute_metrics(prediction):
        # Generated ids, padded with -100 by the Trainer; references are the raw target sentences.
        ids = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        hypotheses = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return metric.compute(predictions=hypotheses, references=raw["validation"]["target"][:],
                              bleu_tokenize=args.bleu_tokenize)

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
