"""Export a model for serving: `torch.export` programs (``*.pt2``) and ONNX files, optionally int8.

    rskip-export runs/demo/rskip_ln --output_dir exported/rskip_ln --int8
    rskip-export Helsinki-NLP/opus-mt-en-de --skip_variant rskip_ln --skip_recursions 2 --output_dir exported/opus
    rskip-export resnet50 --skip_variant rskip_ln --output_dir exported/resnet50-rskip

A translation model (RSkipMarian or stock Marian; a folder, a Hub id, or a stock Marian checkpoint patched with
--skip_*) becomes ``encoder`` and ``decoder_step`` (with its key/value cache as inputs and outputs), plus its config,
generation config and tokenizer: `rskip.onnx_translation.OnnxTranslator` translates from the folder. A ResNet
(an rskip_resnet folder, a timm save_for_hf folder, or a timm ResNet name, patched with --skip_*) becomes ``model``.
After writing, the ONNX files are run once with ONNX Runtime and compared with PyTorch (max |Δ logits| printed).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from rskip.export import (
    DEFAULT_OPSET,
    ExportError,
    export_image_classifier,
    export_translation_model,
    load_for_export,
    onnx_path,
    require_onnx,
    resolve_source,
)
from rskip.skip_options import ConfigFieldError, ResNetSkipOptions
from rskip.training.cli import (CommandParser, add_skip_arguments, bounded, check_skip_arguments, output_folder,
                                run_main)

OPSET = bounded(int, 18, 23)
IMAGE_SIZE = bounded(int, 16)


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(prog="rskip-export", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path", help="A model folder, a Hub model id or a timm ResNet name.")
    parser.add_argument("--output_dir", type=output_folder, required=True)
    parser.add_argument("--int8", action="store_true",
                        help="Also write *_int8.onnx with ONNX Runtime's dynamic int8 quantisation.")
    parser.add_argument("--opset", type=OPSET, default=DEFAULT_OPSET, help="The ONNX opset.")
    parser.add_argument("--image_size", type=IMAGE_SIZE,
                        help="Height and width of an image classifier's input (default: its timm input size).")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Load a folder's or Hub repository's own model code (rskip folders carry theirs).")
    add_skip_arguments(parser, ResNetSkipOptions, default="the model's own; for a stock checkpoint, unchanged")
    args = parser.parse_args(argv)
    check_skip_arguments(parser, args, ResNetSkipOptions)
    try:
        require_onnx()
    except ImportError as error:
        parser.error(str(error))
    try:
        args.source = resolve_source(args.model_name_or_path, ResNetSkipOptions.given(args) or None,
                                     args.trust_remote_code)
    except ConfigFieldError as error:
        parser.error(f"argument --{error.field}: {error}")
    except ExportError as error:
        parser.error(f"argument model_name_or_path: {error}")
    if args.image_size is not None and args.source.task != "image-classification":
        parser.error(f"argument --image_size: {args.image_size} is for image classifiers; "
                     f"{args.model_name_or_path} is a {args.source.task} model")
    return args


def compare_translation(model, output_dir, int8: bool) -> dict:
    """Max |Δ logits| between PyTorch and ONNX Runtime for one padded batch and two decoding steps."""
    from rskip.onnx_translation import OnnxTranslator

    config = model.config
    input_ids = torch.tensor([[5, 6, 7, 8, config.eos_token_id], [9, 10, config.eos_token_id, config.pad_token_id,
                                                                 config.pad_token_id]]) % config.vocab_size
    attention_mask = (input_ids != config.pad_token_id).long()
    decoder_input_ids = torch.tensor([[config.decoder_start_token_id, 11], [config.decoder_start_token_id, 12]])
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids).logits.numpy()
    differences = {}
    for quantised in (False, True) if int8 else (False,):
        translator = OnnxTranslator(output_dir, int8=quantised)
        cross = translator.encode(input_ids.numpy(), attention_mask.numpy())[1:]
        past = translator.empty_cache(2)
        steps = []
        for position in range(decoder_input_ids.shape[1]):
            logits, past = translator.decode_step(decoder_input_ids[:, position].numpy(), attention_mask.numpy(), past,
                                            cross)
            steps.append(logits)
        differences["int8" if quantised else "fp32"] = float(np.abs(np.stack(steps, 1) - expected).max())
    return differences


def compare_image(model, output_dir, image_size, int8: bool) -> dict:
    import onnxruntime

    from rskip.export import ImageClassifier

    pixel_values = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ImageClassifier(model)(pixel_values).numpy()
    differences = {}
    for quantised in (False, True) if int8 else (False,):
        session = onnxruntime.InferenceSession(str(onnx_path(output_dir, "model", quantised)),
                                               providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"pixel_values": pixel_values.numpy()})
        differences["int8" if quantised else "fp32"] = float(np.abs(logits - expected).max())
    return differences


def main(argv=None) -> dict:
    args = parse_args(argv)
    skip_options = ResNetSkipOptions.given(args)
    model, tokenizer = load_for_export(args.source, skip_options, args.trust_remote_code)
    if args.source.task == "translation":
        manifest = export_translation_model(model, args.output_dir, tokenizer, opset=args.opset, int8=args.int8)
        manifest["max_abs_logits_difference"] = compare_translation(model, args.output_dir, args.int8)
    else:
        image_size = (args.image_size, args.image_size) if args.image_size else None
        manifest = export_image_classifier(model, args.output_dir, image_size, opset=args.opset, int8=args.int8)
        manifest["max_abs_logits_difference"] = compare_image(model, args.output_dir, manifest["input_size"][1:],
                                                              args.int8)
    files = sorted(path.name for path in Path(args.output_dir).iterdir())
    print(f"wrote {args.output_dir}: {', '.join(files)}")
    for precision, difference in manifest["max_abs_logits_difference"].items():
        print(f"ONNX Runtime {precision} against PyTorch: max |Δ logits| = {difference:.2e}")
    return manifest


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
