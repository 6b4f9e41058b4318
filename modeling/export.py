"""Deployment: `torch.export` programs and ONNX files for RSkipMarian (and stock Marian) and the rskip ResNets.

A translation model becomes two programs, as in transformers' `Seq2SeqLMExportableModule`, but with the key/value
cache as explicit inputs and outputs so that a runtime without PyTorch can run beam search (which reorders the cache
between steps) over a padded batch:

- ``encoder``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state`` and, per decoder layer, the
  cross-attention keys and values (``present.{i}.encoder.{key,value}``), computed once per source;
- ``decoder_step``: ``decoder_input_ids`` (one token per row), ``encoder_attention_mask``, the self-attention cache
  so far (``past_key_values.{i}.decoder.{key,value}``, length 0 at the first step) and the cross-attention cache
  (``past_key_values.{i}.encoder.{key,value}``) -> ``logits`` and the grown self-attention cache
  (``present.{i}.decoder.{key,value}``).

transformers' own `Seq2SeqLMExportableModule` keeps a static cache *inside* the program (mutated buffers) for one
batch size and its encoder takes no attention mask: it fits ExecuTorch's greedy loop, not ONNX beam search over
padded batches, so it is not used here. An image classifier becomes one program, ``pixel_values`` -> ``logits``.

Every program is traced with the skip connections' reference computation (`rskip.use_fused_skip(False)`): the fused
op is a custom op that ONNX does not know, and its reference is plain ``LayerNormalization`` nodes with the same
outputs. `torch.onnx.export(..., dynamo=True)` turns each `torch.export` program into ONNX; `quantize_int8` applies
ONNX Runtime's dynamic int8 quantisation.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import get_arch_name, is_model, is_model_in_modules
from torch import nn
from transformers import AutoModelForImageClassification, AutoModelForSeq2SeqLM, AutoTokenizer, PretrainedConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.marian.modeling_marian import MarianMTModel

from .fused_skip import use_fused_skip
from .modeling_rskip_marian import RSkipMarianMTModel
from .modeling_rskip_resnet import RSkipResNetForImageClassification
from .skip_options import ResNetSkipOptions, SkipOptions
from .timm_resnets import patch_timm_resnet

ENCODER = "encoder"
DECODER_STEP = "decoder_step"
IMAGE_CLASSIFIER = "model"
MANIFEST = "export.json"
INT8_SUFFIX = "_int8"
DEFAULT_OPSET = 18
TRANSLATION_MODEL_TYPES = ("marian", "rskip_marian")
IMAGE_MODEL_TYPES = ("rskip_resnet",)


class ExportError(ValueError):
    """A source that cannot be exported: the message names it, says why and what is supported."""


TIMM_RESNET_MODULES = ("resnet", "timm_resnets")  # timm's ResNets and rskip's (ResNets and PreAct-ResNets)
SUPPORTED = ("a model folder or Hub id of model_type marian, rskip_marian or rskip_resnet, a timm save_for_hf folder "
             "of a ResNet, or a timm ResNet name (resnet50, rskip_resnet50, preact_resnet56, ...)")


@dataclass
class ExportSource:
    """What `resolve_source` found: the task and how to build the model, checked before anything is loaded."""

    source: str
    task: str  # "translation" or "image-classification"
    kind: str  # "folder" (transformers), "timm-folder" (save_for_hf) or "timm-name"
    model_type: str | None = None


def resolve_source(source: str, skip_options: dict | None = None, trust_remote_code: bool = False) -> ExportSource:
    """Check `source` (and the `skip_*` options meant to patch a stock model) without loading any weights; raise
    `ExportError` naming what is wrong and what is supported."""
    skip_options = dict(skip_options or {})
    folder = Path(source)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ExportError(f"{source}: the folder has no config.json, so it is not a model folder; expected "
                              f"{SUPPORTED}")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise ExportError(f"{config_file}: cannot be read as JSON ({error})") from error
        model_type = config.get("model_type")
        if model_type is None and "architecture" in config:
            result = _timm_source(source, get_arch_name(config["architecture"]), "timm-folder")
        else:
            result = _folder_source(source, model_type)
    elif source.startswith(("./", "../", "/", "~")) or source.count("/") > 1:
        raise ExportError(f"{source}: no such folder; expected {SUPPORTED}")
    elif is_model(get_arch_name(source)):
        result = _timm_source(source, get_arch_name(source), "timm-name")
    else:
        try:  # a Hub id: only its config is fetched here
            config = PretrainedConfig.get_config_dict(source, trust_remote_code=trust_remote_code)[0]
        except (OSError, ValueError) as error:
            raise ExportError(f"{source}: neither a folder, a timm model name nor a Hub model id that could be "
                              f"loaded ({error}); expected {SUPPORTED}") from error
        result = _folder_source(source, config.get("model_type"))
    if skip_options:
        _check_skip_options(result, skip_options)
    return result


def _folder_source(source: str, model_type: str | None) -> ExportSource:
    if model_type in TRANSLATION_MODEL_TYPES:
        return ExportSource(source, "translation", "folder", model_type)
    if model_type in IMAGE_MODEL_TYPES:
        return ExportSource(source, "image-classification", "folder", model_type)
    raise ExportError(f"{source}: model_type {model_type!r} is not supported; expected {SUPPORTED}")


def _timm_source(source: str, architecture: str, kind: str) -> ExportSource:
    if not is_model_in_modules(architecture, TIMM_RESNET_MODULES):
        raise ExportError(f"{source}: timm architecture {architecture!r} is not a ResNet; expected {SUPPORTED}")
    return ExportSource(source, "image-classification", kind)


def _check_skip_options(source: ExportSource, skip_options: dict) -> None:
    """`skip_*` options patch a stock model: a Marian checkpoint or a timm ResNet, whose variant is valid."""
    if source.model_type not in ("marian", None) or source.kind == "timm-folder":
        raise ExportError(f"{source.source}: skip options ({', '.join(skip_options)}) patch a stock Marian checkpoint "
                          "or a timm ResNet name; this model has its own skip connection in its config")
    options_class = SkipOptions if source.task == "translation" else ResNetSkipOptions
    unknown = sorted(set(skip_options) - {spec.name for spec in dataclasses.fields(options_class)})
    if unknown:
        raise ExportError(f"{source.source}: {', '.join(unknown)} is for image classifiers; this is a translation "
                          "model")
    options_class(**skip_options)  # ConfigFieldError naming the field if a value is bad


def load_for_export(source: ExportSource, skip_options: dict | None = None, trust_remote_code: bool = False):
    """The model (in eval mode) and its tokenizer (None where there is none) for a resolved source."""
    skip_options = dict(skip_options or {})
    if source.kind == "timm-name":
        architecture = get_arch_name(source.source)
        if skip_options and not is_model_in_modules(architecture, ("timm_resnets",)):
            return patch_timm_resnet(timm.create_model(source.source), **skip_options).eval(), None
        return timm.create_model(source.source, **skip_options).eval(), None
    if source.kind == "timm-folder":
        return timm.create_model(f"local-dir:{source.source}", pretrained=True).eval(), None
    if source.task == "image-classification":
        return AutoModelForImageClassification.from_pretrained(source.source,
                                                               trust_remote_code=trust_remote_code).eval(), None
    if skip_options:
        model = RSkipMarianMTModel.from_pretrained(source.source, **skip_options)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(source.source, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):  # a folder without tokenizer files exports all the same
        tokenizer = None
    return model.eval(), tokenizer


def onnx_path(folder, program: str, int8: bool = False) -> Path:
    return Path(folder) / f"{program}{INT8_SUFFIX if int8 else ''}.onnx"


# Translation --------------------------------------------------------------------------------------------------------


def cache_names(num_layers: int, prefix: str, side: str) -> list[str]:
    """``{prefix}.{i}.{side}.key``, ``...value`` for every layer: optimum's names for the cache tensors."""
    return [f"{prefix}.{i}.{side}.{part}" for i in range(num_layers) for part in ("key", "value")]


def _heads(projection: nn.Linear, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, length, d_model) -> (batch, heads, length, head_dim), as `MarianAttention` lays out its cache."""
    return projection(states).view(*states.shape[:-1], -1, head_dim).transpose(1, 2)


class TranslationEncoder(nn.Module):
    """The encoder, plus each decoder layer's cross-attention keys and values, which stay fixed for a source."""

    def __init__(self, model: MarianMTModel):
        super().__init__()
        self.encoder = model.get_encoder()
        self.cross_attentions = nn.ModuleList(layer.encoder_attn for layer in model.get_decoder().layers)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cross = []
        for attention in self.cross_attentions:
            cross += [_heads(attention.k_proj, hidden, attention.head_dim),
                      _heads(attention.v_proj, hidden, attention.head_dim)]
        return (hidden, *cross)


class TranslationDecoderStep(nn.Module):
    """One decoding step with the cache as tensors: the model's own decoder and `EncoderDecoderCache`, so that the
    step computes exactly what `generate` computes."""

    def __init__(self, model: MarianMTModel):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.lm_head
        self.final_logits_bias = model.final_logits_bias
        self.num_layers = len(self.decoder.layers)

    def forward(self, decoder_input_ids, encoder_attention_mask, caches):
        n = self.num_layers
        past = [(caches[2 * i], caches[2 * i + 1]) for i in range(n)]
        cross = [(caches[2 * n + 2 * i], caches[2 * n + 2 * i + 1]) for i in range(n)]
        cache = EncoderDecoderCache(DynamicCache(past), DynamicCache(cross))  # cross layers count as computed
        # The decoder reads only the batch size and dtype of `encoder_hidden_states` once the cross keys are cached.
        encoder_shape_stand_in = cross[0][0][:, 0]
        hidden = self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_shape_stand_in,
                              encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=True)[0]
        logits = self.lm_head(hidden) + self.final_logits_bias
        present = []
        for layer in cache.self_attention_cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


@dataclass
class TranslationPrograms:
    encoder: torch.export.ExportedProgram
    decoder_step: torch.export.ExportedProgram
    encoder_inputs: list[str]
    encoder_outputs: list[str]
    decoder_inputs: list[str]
    decoder_outputs: list[str]


def export_translation_programs(model: MarianMTModel) -> TranslationPrograms:
    """`torch.export` the encoder and the decoder step, with dynamic batch, source and cache lengths."""
    if not isinstance(model, MarianMTModel):
        raise ExportError(f"{type(model).__name__} is not a Marian translation model; supported: MarianMTModel, "
                          "RSkipMarianMTModel")
    model = model.eval()
    config = model.config
    n = config.decoder_layers
    head_dim = config.d_model // config.decoder_attention_heads
    batch, source = torch.export.Dim("batch"), torch.export.Dim("source_length")
    past_length = torch.export.Dim("past_length", min=0)
    # Example inputs of sizes other than 0 and 1, which torch.export would specialise on.
    input_ids = torch.full((2, 3), config.eos_token_id, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    encoder = TranslationEncoder(model).eval()
    step = TranslationDecoderStep(model).eval()
    with torch.no_grad(), use_fused_skip(False):
        encoder_program = torch.export.export(encoder, (input_ids, attention_mask),
                                              dynamic_shapes=({0: batch, 1: source}, {0: batch, 1: source}))
        cross = list(encoder(input_ids, attention_mask)[1:])
        past = [torch.zeros(2, config.decoder_attention_heads, 2, head_dim) for _ in range(2 * n)]
        decoder_input_ids = torch.full((2, 1), config.decoder_start_token_id, dtype=torch.long)
        step_program = torch.export.export(
            step, (decoder_input_ids, attention_mask, (*past, *cross)),
            dynamic_shapes=({0: batch}, {0: batch, 1: source},
                            (*[{0: batch, 2: past_length}] * (2 * n), *[{0: batch, 2: source}] * (2 * n))))
    cross_names = cache_names(n, "present", "encoder")
    return TranslationPrograms(
        encoder=encoder_program, decoder_step=step_program,
        encoder_inputs=["input_ids", "attention_mask"], encoder_outputs=["last_hidden_state", *cross_names],
        decoder_inputs=["decoder_input_ids", "encoder_attention_mask", *cache_names(n, "past_key_values", "decoder"),
                        *cache_names(n, "past_key_values", "encoder")],
        decoder_outputs=["logits", *cache_names(n, "present", "decoder")],
    )


def export_translation_model(model: MarianMTModel, output_dir, tokenizer=None, opset: int = DEFAULT_OPSET,
                             int8: bool = False) -> dict:
    """Write ``encoder.pt2``/``decoder_step.pt2`` (`torch.export.save`), ``encoder.onnx``/``decoder_step.onnx``
    (and their ``_int8`` versions if `int8`), the config, the generation config, the tokenizer if given and
    ``export.json``; returns the manifest."""
    require_onnx()
    programs = export_translation_programs(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_program(programs.encoder, output_dir, ENCODER, programs.encoder_inputs, programs.encoder_outputs, opset)
    _write_program(programs.decoder_step, output_dir, DECODER_STEP, programs.decoder_inputs, programs.decoder_outputs,
                   opset)
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    config = model.config
    manifest = {
        "task": "translation",
        "model_class": type(model).__name__,
        "skip_options": _skip_options(config),
        "programs": {ENCODER: {"inputs": programs.encoder_inputs, "outputs": programs.encoder_outputs},
                     DECODER_STEP: {"inputs": programs.decoder_inputs, "outputs": programs.decoder_outputs}},
        "decoder_layers": config.decoder_layers,
        "decoder_attention_heads": config.decoder_attention_heads,
        "head_dim": config.d_model // config.decoder_attention_heads,
        **_versions(opset),
    }
    if int8:
        manifest["int8"] = [quantize_int8(onnx_path(output_dir, name)).name for name in (ENCODER, DECODER_STEP)]
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# Image classification -----------------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """``pixel_values`` -> ``logits`` for a timm network or an `RSkipResNetForImageClassification`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        outputs = self.model(pixel_values)
        return outputs.logits if isinstance(self.model, RSkipResNetForImageClassification) else outputs


def timm_network(model: nn.Module) -> nn.Module:
    return model.timm_model if isinstance(model, RSkipResNetForImageClassification) else model


def export_image_program(model: nn.Module, image_size: tuple[int, int]) -> torch.export.ExportedProgram:
    """`torch.export` ``pixel_values`` -> ``logits`` with a dynamic batch size (image size fixed)."""
    wrapper = ImageClassifier(model.eval()).eval()
    example = torch.randn(2, 3, *image_size)
    with torch.no_grad(), use_fused_skip(False):
        return torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def export_image_classifier(model: nn.Module, output_dir, image_size: tuple[int, int] | None = None,
                            opset: int = DEFAULT_OPSET, int8: bool = False) -> dict:
    """Write ``model.pt2``, ``model.onnx`` (and ``model_int8.onnx`` if `int8`) and ``export.json`` (with timm's
    preprocessing: input size, mean, std); returns the manifest."""
    require_onnx()
    network = timm_network(model)
    data_config = dict(getattr(network, "pretrained_cfg", {}) or {})
    if image_size is None:
        image_size = tuple(data_config.get("input_size", (3, 224, 224))[1:])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    program = export_image_program(model, image_size)
    _write_program(program, output_dir, IMAGE_CLASSIFIER, ["pixel_values"], ["logits"], opset)
    manifest = {
        "task": "image-classification",
        "model_class": type(model).__name__,
        "architecture": data_config.get("architecture"),
        "skip_options": _skip_options(getattr(model, "config", None)),
        "programs": {IMAGE_CLASSIFIER: {"inputs": ["pixel_values"], "outputs": ["logits"]}},
        "input_size": [3, *image_size],
        "mean": list(data_config.get("mean", ())),
        "std": list(data_config.get("std", ())),
        **_versions(opset),
    }
    if isinstance(model, RSkipResNetForImageClassification):
        model.config.save_pretrained(output_dir)
    if int8:
        manifest["int8"] = [quantize_int8(onnx_path(output_dir, IMAGE_CLASSIFIER)).name]
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# Shared -------------------------------------------------------------------------------------------------------------


def require_onnx() -> None:
    """The `onnx` extra, checked before any work: torch's ONNX exporter needs onnx and onnxscript."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting to ONNX needs {', '.join(missing)}: pip install 'rskip[onnx]'")


def _write_program(program: torch.export.ExportedProgram, output_dir: Path, name: str, inputs: list[str],
                   outputs: list[str], opset: int) -> None:
    torch.export.save(program, output_dir / f"{name}.pt2")
    onnx_program = torch.onnx.export(program, (), input_names=inputs, output_names=outputs, opset_version=opset,
                                     dynamo=True, verbose=False)
    onnx_program.save(str(onnx_path(output_dir, name)))


def quantize_int8(model_path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation (weights int8, activations quantised per call):
    ``x.onnx`` -> ``x_int8.onnx``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_path = Path(model_path)
    target = model_path.with_name(model_path.stem + INT8_SUFFIX + ".onnx")
    quantize_dynamic(model_path, target, weight_type=QuantType.QInt8)
    return target


def _skip_options(config) -> dict | None:
    if config is None or not hasattr(config, "skip_options"):
        return {"skip_variant": "post_ln"} if getattr(config, "model_type", None) == "marian" else None
    return config.skip_options().used()


def _versions(opset: int) -> dict:
    import onnx
    import onnxscript
    import transformers

    return {"opset": opset, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                         "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}}


__all__ = [
    "ExportError",
    "require_onnx",
    "ExportSource",
    "resolve_source",
    "load_for_export",
    "TranslationEncoder",
    "TranslationDecoderStep",
    "export_translation_programs",
    "export_translation_model",
    "export_image_program",
    "export_image_classifier",
    "quantize_int8",
    "onnx_path",
]
