"""Save the folders of `test_compatibility.py` with this environment's rskip: tiny models with random norms, their
expected outputs beside them (`expected.pt`). Run as a script: `python tests/compat_save_folders.py FOLDER`."""

import gzip
import itertools
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from rskip import RSkipMarianConfig, RSkipMarianMTModel, RSkipResNetConfig, RSkipResNetForImageClassification
from rskip.tokenization import train_marian_tokenizer

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
SENTENCES = ["A man rides a bike.", "Two dogs play in the snow."]
MARIAN = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=12, decoder_ffn_dim=12, max_position_embeddings=64, dropout=0.0)
# Each model class, each skip variant family (norm, scaled, batch-norm) and both kinds of timm ResNet.
MARIAN_FOLDERS = {
    "marian-rskip_ln": dict(skip_variant="rskip_ln", skip_recursions=2),
    "marian-xskip_ln": dict(skip_variant="xskip_ln", skip_scale=1.5, skip_learnable_scale=True),
}
RESNET_FOLDERS = {
    "resnet-preact_resnet20-rskip_ln": dict(backbone="preact_resnet20", skip_variant="rskip_ln", skip_recursions=2),
    "resnet-rskip_resnet18-xskip_bn": dict(backbone="rskip_resnet18", skip_variant="xskip_bn", skip_scale=0.8),
    "resnet-rskip_resnet18-pre_ln": dict(backbone="rskip_resnet18", skip_variant="pre_ln", skip_norm_dims="c"),
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm affines, biases and statistics, so that a norm or bias loaded wrongly shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and (tensor.ndim <= 1):
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator).abs())
    return model.eval()


def read_lines(path: Path, limit: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in itertools.islice(handle, limit)]


def save_marian(folder: Path, tokenizer, options: dict) -> None:
    torch.manual_seed(0)
    config = RSkipMarianConfig(**MARIAN, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                               forced_eos_token_id=None, **options)
    model = randomize_(RSkipMarianMTModel(config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    batch = tokenizer(SENTENCES, text_target=SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=6)
    translations = [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]
    torch.save(dict(batch=dict(batch), logits=logits, tokens=tokens, translations=translations),
               folder / "expected.pt")


def save_resnet(folder: Path, options: dict) -> None:
    torch.manual_seed(0)
    model = randomize_(RSkipResNetForImageClassification(RSkipResNetConfig(num_labels=5, **options)))
    model.save_pretrained(folder)
    images = [Image.new("RGB", (40, 36), color) for color in ((200, 30, 60), (10, 220, 90))]
    pixel_values = model.create_image_processor()(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
        features = model(pixel_values, output_hidden_states=True).hidden_states
    probabilities = logits.softmax(-1)
    labels = [model.config.id2label[index] for index in probabilities.argmax(-1).tolist()]
    torch.save(dict(pixel_values=pixel_values, logits=logits, hidden_states=features, labels=labels,
                    scores=probabilities.max(-1).values, colors=[image.getpixel((0, 0)) for image in images]),
               folder / "expected.pt")


def save_folders(root: Path) -> list[Path]:
    source, target = (read_lines(MULTI30K / f"train.{lang}.gz", 200) for lang in ("en", "de"))
    tokenizer = train_marian_tokenizer(source, target, root / "tokenizer", vocab_size=300,
                                       source_lang="en", target_lang="de")
    for name, options in MARIAN_FOLDERS.items():
        save_marian(root / name, tokenizer, options)
    for name, options in RESNET_FOLDERS.items():
        save_resnet(root / name, options)
    return [root / name for name in (*MARIAN_FOLDERS, *RESNET_FOLDERS)]


if __name__ == "__main__":
    for path in save_folders(Path(sys.argv[1])):
        print(path)
