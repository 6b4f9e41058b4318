"""`from_pretrained` of rskip's models names a truncated or corrupt `*.safetensors` file (safetensors' own error names
none): a single file, one shard of a sharded checkpoint, and a folder loaded as remote code."""

import re

import pytest
import torch
from transformers import AutoModelForImageClassification

from rskip import (
    CorruptWeightsFileError,
    RSkipMarianConfig,
    RSkipMarianMTModel,
    RSkipResNetConfig,
    RSkipResNetForImageClassification,
    RSkipResNetModel,
)

TINY_MARIAN = dict(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32)


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def saved_resnet(folder, **save_kwargs):
    RSkipResNetForImageClassification(RSkipResNetConfig(backbone="preact_resnet20", num_labels=3)).save_pretrained(
        folder, **save_kwargs)
    return folder


@pytest.mark.parametrize("model_class, save", [
    (RSkipResNetForImageClassification, saved_resnet),
    (RSkipResNetModel, saved_resnet),
    (RSkipMarianMTModel, lambda folder: RSkipMarianMTModel(RSkipMarianConfig(**TINY_MARIAN)).save_pretrained(folder)),
], ids=["resnet-classifier", "resnet-headless", "marian"])
def test_a_truncated_weights_file_is_named(tmp_path, model_class, save):
    save(tmp_path)
    weights = tmp_path / "model.safetensors"
    truncate(weights)
    with pytest.raises(CorruptWeightsFileError, match=r"model\.safetensors is truncated or corrupt \(\d+ bytes; "
                                                      r"safetensors: .*\); save or download the checkpoint again"):
        model_class.from_pretrained(tmp_path)
    with pytest.raises(CorruptWeightsFileError) as error:
        model_class.from_pretrained(tmp_path, dtype="auto")
    assert error.value.path == str(weights) and str(weights) in str(error.value)
    assert isinstance(error.value, OSError)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    weights = saved_resnet(tmp_path) / "model.safetensors"
    weights.write_bytes(b"\x05not a safetensors file")
    with pytest.raises(CorruptWeightsFileError, match=r"model\.safetensors is truncated or corrupt \(23 bytes; "):
        RSkipResNetForImageClassification.from_pretrained(tmp_path)


def test_the_truncated_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    saved_resnet(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    truncate(shards[1], keep=0.9)
    with pytest.raises(CorruptWeightsFileError) as error:
        RSkipResNetForImageClassification.from_pretrained(tmp_path)
    assert error.value.path == str(shards[1])


def test_remote_code_loading_names_the_file_too(tmp_path):
    weights = saved_resnet(tmp_path) / "model.safetensors"
    truncate(weights)
    # The folder's own copy of the code raises its own copy of the error class.
    with pytest.raises(OSError, match="^" + re.escape(f"{weights} is truncated or corrupt")) as error:
        AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(error.value).__name__ == "CorruptWeightsFileError"


def test_an_intact_checkpoint_loads_unchanged(tmp_path):
    model = RSkipResNetForImageClassification(RSkipResNetConfig(backbone="preact_resnet20", num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    loaded = RSkipResNetForImageClassification.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
