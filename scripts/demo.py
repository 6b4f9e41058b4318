"""`make demo`: post-LN against rSkip+LN (K = 2), side by side, offline, in a few minutes on a CPU.

The task needs no download: English number words into German ones, generated with num2words (`rskip.experiments.number_task`), e.g.
"seven thousand, three hundred and forty-two" -> "siebentausenddreihundertzweiundvierzig".
German says the units before the tens ("zweiundvierzig" is two-and-forty) and writes a number as one word,
so the model must reorder, not just look words up.

Both models are trained by `train_translation.py` from the same seed, data, tokenizer and number of steps; they
differ only in `--skip_variant`. The script prints a table, a few translations, and plots the validation curves
to `<output_dir>/comparison.png`.

What it shows: that the two variants train end to end on the same footing, and how one seed of each compares at
6+6 layers, a moderate rate (1e-3) and a sixth of the run as warm-up -- a regime where post-LN trains well, so
nothing here is expected to favour rSkip+LN (on our machine post-LN led). What it does not show: seed noise, deep
stacks, large rates or short warm-up, where the variants differ; `rskip-reproduce gradients` and
`rskip-reproduce stability` measure those (README, "Results").
"""

import argparse
import contextlib
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rskip.experiments.number_task import write_number_pairs, write_number_tokenizer
from rskip.training import TrainingError
from rskip.training.cli import COUNT, SEED, CommandParser, output_folder, parse_translation_args, run_main
from rskip.training.reporting import plot_curves
from rskip.training.translation import MODEL_PRESETS

SCRIPTS = Path(__file__).resolve().parent
VARIANTS = {"post_ln": ["--skip_variant", "post_ln"],
            "rskip_ln": ["--skip_variant", "rskip_ln", "--skip_recursions", "2"]}


def parse_args(argv=None):
    """The command line (`sys.argv[1:]` when `argv` is None), checked: a bad value stops here, before any data is
    written, with usage and one line naming the flag."""
    parser = CommandParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", type=output_folder, default="runs/demo")
    parser.add_argument("--largest_number", type=COUNT, default=9999)
    parser.add_argument("--train_size", type=COUNT, default=8000)
    parser.add_argument("--eval_size", type=COUNT, default=200, help="Validation and test pairs each.")
    parser.add_argument("--max_train_steps", type=COUNT, default=500)
    parser.add_argument("--eval_steps", type=COUNT, default=125)
    parser.add_argument("--model_preset", choices=sorted(MODEL_PRESETS), default="transformer-tiny")
    parser.add_argument("--config_overrides", default="encoder_layers=6,decoder_layers=6",
                        help="A deeper stack than the preset's: where the skip connection matters.")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--extra_args", default="", help="More train_translation.py flags, for both runs.")
    args = parser.parse_args(argv)
    if args.train_size + 2 * args.eval_size > args.largest_number:
        parser.error(f"argument --largest_number: the numbers are distinct, so it must be at least --train_size + 2 x "
                     f"--eval_size = {args.train_size + 2 * args.eval_size}, got {args.largest_number}")
    # Both training command lines, checked as train_translation.py checks them (--config_overrides, --extra_args).
    data, tokenizer = Path(args.output_dir) / "data", Path(args.output_dir) / "tokenizer"
    for variant in VARIANTS:
        checked = io.StringIO()
        try:
            with contextlib.redirect_stderr(checked):
                parse_translation_args(training_flags(variant, data, tokenizer, Path(args.output_dir), args))
        except SystemExit:
            problem = checked.getvalue().strip().splitlines()[-1].split(" error: ", 1)[-1]
            parser.error(problem if problem.startswith("argument --config_overrides:")
                         else f"argument --extra_args: {problem}")
    return args


def training_flags(variant: str, data: Path, tokenizer: Path, output_dir: Path, args) -> list[str]:
    """The train_translation.py flags of one variant's run."""
    return [
        "--train_file", str(data / "train"), "--validation_file", str(data / "valid"),
        "--test_file", str(data / "test"),
        "--source_lang", "en", "--target_lang", "de", "--tokenizer_name", str(tokenizer),
        "--model_preset", args.model_preset, "--config_overrides", args.config_overrides,
        "--learning_rate", "1e-3", "--num_warmup_steps", str(max(1, args.max_train_steps // 6)),
        "--max_tokens", "2048", "--max_train_steps", str(args.max_train_steps), "--eval_steps", str(args.eval_steps),
        "--num_beams", "4", "--val_max_target_length", "24", "--bleu_tokenize", "char", "--seed", str(args.seed),
        "--output_dir", str(output_dir / variant), *VARIANTS[variant], *shlex.split(args.extra_args),
    ]


def train(variant: str, data: Path, tokenizer: Path, output_dir: Path, args) -> dict:
    """One `train_translation.py` run in a fresh process; returns its results.json."""
    command = [sys.executable, str(SCRIPTS / "train_translation.py"),
               *training_flags(variant, data, tokenizer, output_dir, args)]
    print(f"\n=== {variant}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command).returncode
    if status != 0:  # the run printed its own error above
        raise TrainingError(f"the {variant} run failed (exit status {status}); its message is above")
    return json.loads((output_dir / variant / "results.json").read_text())


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    started = time.time()
    data = write_number_pairs(output_dir / "data", args.largest_number, args.train_size, args.eval_size, args.seed)
    tokenizer = write_number_tokenizer(data, output_dir / "tokenizer", args.seed)
    results = {variant: train(variant, data, tokenizer, output_dir, args) for variant in VARIANTS}

    sources = (data / "test.en").read_text().splitlines()
    references = (data / "test.de").read_text().splitlines()
    predictions = {variant: (output_dir / variant / "predictions_test.txt").read_text().splitlines()
                   for variant in VARIANTS}

    print(f"\nEnglish number words -> German, {args.model_preset} ({args.config_overrides}), "
          f"{args.max_train_steps} steps, seed {args.seed}; {time.time() - started:.0f} s in all")
    print(f"{'variant':<10} {'best step':>9} {'valid BLEU':>10} {'valid chrF':>10} {'valid loss':>10} "
          f"{'test BLEU':>9} {'test chrF':>9} {'test exact':>10} {'train s':>8}")
    for variant, result in results.items():
        valid, test = result["validation"], result["test"]
        exact = 100 * sum(map(str.__eq__, predictions[variant], references)) / len(references)
        print(f"{variant:<10} {result['best_step']:>9} {valid['bleu']:>10.2f} {valid['chrf']:>10.2f} "
              f"{valid['loss']:>10.3f} {test['bleu']:>9.2f} {test['chrf']:>9.2f} {exact:>9.1f}% "
              f"{result['train_runtime_s']:>8.0f}")
    print(f"BLEU {results['rskip_ln']['test']['bleu_signature']} (character BLEU: a German number is one word); "
          f"chrF {results['rskip_ln']['test']['chrf_signature']}; exact: whole number right")
    for index in range(3):
        print(f"\n  {sources[index]}\n  reference: {references[index]}")
        for variant in VARIANTS:
            print(f"  {variant + ':':<10} {predictions[variant][index]}")

    figure = plot_curves({variant: result["history"] for variant, result in results.items()}, ["loss", "bleu", "chrf"],
                         output_dir / "comparison.png")
    print(f"\nValidation curves: {figure}")
    print("One seed in a regime where post-LN trains well: not evidence either way. Where the variants differ: "
          "rskip-reproduce gradients | stability (README, \"Results\").")
    return results


if __name__ == "__main__":
    run_main(main)
