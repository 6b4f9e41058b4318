"""CPU serving latency: PyTorch eager against ONNX Runtime (fp32 and dynamic int8), stock models against rSkip+LN.

    rskip-benchmark-deploy --output_dir runs/benchmark-deploy \\
        --bleu_model runs/demo/rskip_ln --bleu_data runs/demo/data/test

Translation: beam search (--num_beams 4) at each of --batch_sizes for a stock `MarianMTModel` and `rskip_ln` with
K = 2 and 3 of the same shape (--model_preset, default transformer-base, the size of the opus-mt models) and the same
weights (the extra norms start as the identity). Every run generates exactly --new_tokens tokens (min = max new
tokens), so that the models do the same number of decoding steps whatever their weights say. Image classification:
one forward pass of --resnet (default resnet50) at 224×224, stock (timm) and rskip_ln K = 2, 3. Each figure is the
median of --repeats rounds, each round timing every configuration of a task once (after one warm-up run of each),
all in this one process, with --threads threads for PyTorch and ONNX Runtime alike; ratios are against the stock
model on the same backend and batch size.

With --bleu_model (a trained translation folder, e.g. `scripts/demo.py`'s `runs/demo/rskip_ln`) and --bleu_data
(the prefix of PREFIX.<src> and PREFIX.<tgt>, e.g. the demo's `runs/demo/data/test`), the model is also exported and
its test BLEU (sacreBLEU, `char` tokenisation as in the demo) reported for PyTorch `generate`, ONNX Runtime fp32 and
int8, with its own generation config: what int8 costs in quality.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from sacrebleu.metrics import BLEU
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianConfig, MarianMTModel

from rskip import RSkipMarianConfig, RSkipMarianMTModel
from rskip.export import export_image_classifier, export_translation_model, onnx_path
from rskip.onnx_translation import OnnxTranslator
from rskip.training.cli import COUNT, CommandParser, bounded, output_folder, run_main
from rskip.training.translation import MODEL_PRESETS

VARIANTS = {"stock": None, "rskip_ln K=2": 2, "rskip_ln K=3": 3}
BACKENDS = ("PyTorch eager", "ONNX Runtime fp32", "ONNX Runtime int8")
THREADS = bounded(int, 1, 256)


def count_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(prog="rskip-benchmark-deploy", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=output_folder, default="runs/benchmark-deploy",
                        help="Exported models and results.json.")
    parser.add_argument("--tasks", choices=["all", "translation", "image-classification"], default="all")
    parser.add_argument("--model_preset", choices=list(MODEL_PRESETS), default="transformer-base")
    parser.add_argument("--vocab_size", type=bounded(int, 16), default=8000)
    parser.add_argument("--num_beams", type=COUNT, default=4)
    parser.add_argument("--batch_sizes", type=count_list, default=(1, 16), help="Comma-separated, e.g. 1,16.")
    parser.add_argument("--source_length", type=COUNT, default=16, help="Source tokens per sentence.")
    parser.add_argument("--new_tokens", type=COUNT, default=16, help="Tokens generated per sentence (exactly).")
    parser.add_argument("--resnet", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                        default="resnet50")
    parser.add_argument("--image_size", type=bounded(int, 32), default=224)
    parser.add_argument("--repeats", type=COUNT, default=3)
    parser.add_argument("--threads", type=THREADS, default=torch.get_num_threads())
    parser.add_argument("--bleu_model", type=Path, help="A trained translation folder (the int8 BLEU cost).")
    parser.add_argument("--bleu_data", help="PREFIX of PREFIX.<source_lang> and PREFIX.<target_lang>.")
    parser.add_argument("--source_lang", default="en")
    parser.add_argument("--target_lang", default="de")
    args = parser.parse_args(argv)
    if (args.bleu_model is None) != (args.bleu_data is None):
        parser.error("argument --bleu_model/--bleu_data: give both or neither")
    if args.bleu_model is not None:
        if not (args.bleu_model / "config.json").is_file():
            parser.error(f"argument --bleu_model: {str(args.bleu_model)!r} has no config.json; expected a trained "
                         "translation folder")
        for lang in (args.source_lang, args.target_lang):
            if not Path(f"{args.bleu_data}.{lang}").is_file():
                parser.error(f"argument --bleu_data: {args.bleu_data}.{lang} does not exist; expected a prefix of "
                             f"PREFIX.{args.source_lang} and PREFIX.{args.target_lang}")
    return args


def session_options(threads: int) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


# Translation --------------------------------------------------------------------------------------------------------


def translation_models(args) -> dict:
    """Stock Marian and RSkipMarian K = 2, 3 of one shape, with the stock model's weights."""
    shape = dict(MODEL_PRESETS[args.model_preset], vocab_size=args.vocab_size, pad_token_id=args.vocab_size - 1,
                 decoder_start_token_id=args.vocab_size - 1, eos_token_id=0, forced_eos_token_id=0)
    torch.manual_seed(0)
    stock = MarianMTModel(MarianConfig(**shape)).eval()
    models = {}
    for name, recursions in VARIANTS.items():
        if recursions is None:
            models[name] = stock
        else:
            model = RSkipMarianMTModel(RSkipMarianConfig(**shape, skip_variant="rskip_ln",
                                                         skip_recursions=recursions))
            model.load_state_dict(stock.state_dict(), strict=False)
            models[name] = model.eval()
    for model in models.values():
        model.generation_config.update(num_beams=args.num_beams, min_new_tokens=args.new_tokens,
                                       max_new_tokens=args.new_tokens, max_length=None, bad_words_ids=None)
    return models


def benchmark_translation(args, results: dict) -> None:
    models = translation_models(args)
    options = session_options(args.threads)
    calls = {}
    for name, model in models.items():
        folder = Path(args.output_dir) / "translation" / name.replace(" ", "-").replace("=", "")
        export_translation_model(model, folder, int8=True)
        translators = {"ONNX Runtime fp32": OnnxTranslator(folder, session_options=options),
                       "ONNX Runtime int8": OnnxTranslator(folder, int8=True, session_options=options)}
        for batch_size in args.batch_sizes:
            input_ids = torch.randint(1, args.vocab_size - 1, (batch_size, args.source_length),
                                      generator=torch.Generator().manual_seed(batch_size))
            attention_mask = torch.ones_like(input_ids)

            def eager(model=model, input_ids=input_ids, attention_mask=attention_mask):
                with torch.no_grad():
                    return model.generate(input_ids, attention_mask=attention_mask)

            calls[name, "PyTorch eager", batch_size] = eager
            for backend, translator in translators.items():
                calls[name, backend, batch_size] = (
                    lambda translator=translator, input_ids=input_ids, attention_mask=attention_mask:
                    translator.generate(input_ids.numpy(), attention_mask.numpy()))
    results["translation"] = with_ratios(time_interleaved(calls, args.repeats, "translation"))


# Image classification -----------------------------------------------------------------------------------------------


def benchmark_resnet(args, results: dict) -> None:
    options = session_options(args.threads)
    calls = {}
    torch.manual_seed(0)
    stock = timm.create_model(args.resnet).eval()
    for name, recursions in VARIANTS.items():
        if recursions is None:
            model = stock
        else:
            model = timm.create_model(f"rskip_{args.resnet}", skip_variant="rskip_ln", skip_recursions=recursions)
            model.load_state_dict(stock.state_dict(), strict=False)
            model.eval()
        folder = Path(args.output_dir) / "image-classification" / name.replace(" ", "-").replace("=", "")
        export_image_classifier(model, folder, (args.image_size, args.image_size), int8=True)
        sessions = {backend: onnxruntime.InferenceSession(str(onnx_path(folder, "model", int8)), options,
                                                          providers=["CPUExecutionProvider"])
                    for backend, int8 in (("ONNX Runtime fp32", False), ("ONNX Runtime int8", True))}
        for batch_size in args.batch_sizes:
            pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size,
                                       generator=torch.Generator().manual_seed(batch_size))

            def eager(model=model, pixel_values=pixel_values):
                with torch.no_grad():
                    return model(pixel_values)

            calls[name, "PyTorch eager", batch_size] = eager
            for backend, session in sessions.items():
                calls[name, backend, batch_size] = (
                    lambda session=session, pixel_values=pixel_values:
                    session.run(None, {"pixel_values": pixel_values.numpy()}))
    results["image_classification"] = with_ratios(time_interleaved(calls, args.repeats, args.resnet))


def time_interleaved(calls: dict, repeats: int, label: str) -> list[dict]:
    """Median seconds of each call over `repeats` rounds, each round timing every call once after a warm-up of
    all: on a shared machine, load that drifts over minutes then weighs on every configuration alike."""
    for call in calls.values():
        call()
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    rows = []
    for (name, backend, batch_size), seconds in times.items():
        rows.append({"model": name, "backend": backend, "batch_size": batch_size,
                     "seconds": statistics.median(seconds), "all_seconds": seconds})
        print(f"  {label} {name:<13} {backend:<18} batch {batch_size:>3}: {rows[-1]['seconds'] * 1000:9.1f} ms",
              flush=True)
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's time over the stock model's (same backend and batch), and over its own fp32 ONNX Runtime time."""
    def seconds(model, backend, batch_size):
        return next(row["seconds"] for row in rows
                    if (row["model"], row["backend"], row["batch_size"]) == (model, backend, batch_size))

    for row in rows:
        row["vs_stock"] = row["seconds"] / seconds("stock", row["backend"], row["batch_size"])
        row["vs_onnxruntime_fp32"] = row["seconds"] / seconds(row["model"], "ONNX Runtime fp32", row["batch_size"])
    return rows


# BLEU of int8 -------------------------------------------------------------------------------------------------------


def bleu_cost(args, results: dict) -> None:
    sources = Path(f"{args.bleu_data}.{args.source_lang}").read_text().splitlines()
    references = Path(f"{args.bleu_data}.{args.target_lang}").read_text().splitlines()
    model = AutoModelForSeq2SeqLM.from_pretrained(args.bleu_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.bleu_model)
    folder = Path(args.output_dir) / "bleu-model"
    export_translation_model(model, folder, tokenizer, int8=True)
    bleu = BLEU(tokenize="char")
    batches = [sources[start:start + 32] for start in range(0, len(sources), 32)]

    def eager(texts):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)

    systems = {"PyTorch eager": eager,
               "ONNX Runtime fp32": OnnxTranslator(folder, session_options=session_options(args.threads)).translate,
               "ONNX Runtime int8": OnnxTranslator(folder, int8=True,
                                                   session_options=session_options(args.threads)).translate}
    scores = {}
    for backend, translate in systems.items():
        hypotheses = [line for texts in batches for line in translate(texts)]
        scores[backend] = {"bleu": bleu.corpus_score(hypotheses, [references]).score,
                           "exact": 100 * float(np.mean([h == r for h, r in zip(hypotheses, references)]))}
        print(f"  BLEU {backend:<18}: {scores[backend]['bleu']:.2f} (exact {scores[backend]['exact']:.1f} %)",
              flush=True)
    results["bleu"] = {"model": str(args.bleu_model), "data": args.bleu_data, "sentences": len(sources),
                       "signature": str(bleu.get_signature()), "scores": scores}


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print("| model | batch | PyTorch eager ms | ORT fp32 ms | ORT int8 ms | ORT fp32 vs stock | ORT int8 vs stock "
          "| eager / ORT fp32 | ORT fp32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(row["batch_size"], row["model"]) for row in rows}, key=lambda k: (k[0], list(VARIANTS).index(k[1])))
    for batch_size, model in keys:
        cells = {row["backend"]: row for row in rows if (row["model"], row["batch_size"]) == (model, batch_size)}
        eager, fp32, int8 = (cells[backend] for backend in BACKENDS)
        print(f"| {model} | {batch_size} | {eager['seconds'] * 1000:.1f} | {fp32['seconds'] * 1000:.1f} | "
              f"{int8['seconds'] * 1000:.1f} | {fp32['vs_stock']:.3f}× | {int8['vs_stock']:.3f}× | "
              f"{eager['vs_onnxruntime_fp32']:.2f}× | {1 / int8['vs_onnxruntime_fp32']:.2f}× |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    results = {"arguments": {key: (str(value) if isinstance(value, Path) else value)
                             for key, value in vars(args).items()},
               "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
               "cpu_threads": args.threads}
    if args.tasks in ("all", "translation"):
        print(f"Translation: {args.model_preset}, vocabulary {args.vocab_size}, beam {args.num_beams}, "
              f"{args.source_length} source and {args.new_tokens} new tokens per sentence, {args.threads} threads")
        benchmark_translation(args, results)
    if args.tasks in ("all", "image-classification"):
        print(f"Image classification: {args.resnet} at {args.image_size}×{args.image_size}, {args.threads} threads")
        benchmark_resnet(args, results)
    if args.bleu_model is not None:
        print(f"BLEU of {args.bleu_model} on {args.bleu_data}")
        bleu_cost(args, results)
    if "translation" in results:
        print_table(results["translation"], f"Beam-{args.num_beams} translation, {args.model_preset}, median seconds "
                                            f"of {args.repeats} runs")
    if "image_classification" in results:
        print_table(results["image_classification"], f"{args.resnet} forward at {args.image_size}×{args.image_size}")
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {Path(args.output_dir) / 'results.json'}")
    return results


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
