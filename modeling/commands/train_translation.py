"""Train a translation Transformer whose residual connections come from the family of Liu et al., "Rethinking
Skip Connection with Layer Normalization in Transformers and ResNets" (COLING 2020) -- by default rSkip+LN,
y = LN_2(x + LN_1(x + F(x))) -- with Accelerate: one process, many GPUs or many machines.

    # from scratch, on a Hub dataset or on local files
    accelerate launch rskip-train-translation --dataset_name bentrevett/multi30k \
        --source_lang en --target_lang de --model_preset transformer-small \
        --skip_variant rskip_ln --skip_recursions 2 --output_dir runs/m30k-rskip
    rskip-train-translation --train_file ../shared/data/multi30k/train \
        --validation_file ../shared/data/multi30k/val --source_lang en --target_lang de ...
    # fine-tune a stock Marian checkpoint patched with rSkip+LN
    accelerate launch rskip-train-translation --model_name_or_path Helsinki-NLP/opus-mt-en-de \
        --skip_variant rskip_ln --skip_recursions 2 ...

The flags are in `rskip.training.cli`, the task (data, model, loss, evaluation) in `rskip.training.translation`, the
run in `rskip.training.train`. The output folder ends up a Hub-ready model folder (the best checkpoint by validation
BLEU, with its tokenizer, custom code and generation config) plus `results.json`; `checkpoints/` holds resumable
training states.
"""

from rskip.training import TrainingConfig, train
from rskip.training.cli import command_line, parse_translation_args, run_main
from rskip.training.translation import TranslationTask


def main(argv=None):
    args = parse_translation_args(argv)
    return train(TranslationTask(args), TrainingConfig.from_args(args), command_line("rskip-train-translation", argv))


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
