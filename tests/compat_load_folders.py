"""Load the folders saved by `compat_save_folders.py` with `trust_remote_code=True`, where rskip is not installed,
and check their outputs and pipelines against the saving environment's. Run as a script by `test_compatibility.py`
in an environment with other versions of transformers and timm: `python compat_load_folders.py FOLDER...`."""

import importlib.util
import sys

import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoModelForSeq2SeqLM, pipeline

if importlib.util.find_spec("rskip") is not None:
    raise SystemExit("rskip is importable here: this check needs an environment without it")


def check_marian(folder: str) -> None:
    expected = torch.load(f"{folder}/expected.pt")
    batch = expected["batch"]
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=6)
    assert torch.equal(tokens, expected["tokens"]), (tokens, expected["tokens"])
    translator = pipeline("translation", model=folder, trust_remote_code=True, num_beams=2, max_new_tokens=6)
    sentences = [translator.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    translations = [output["translation_text"] for output in translator(sentences)]
    assert translations == expected["translations"], (translations, expected["translations"])


def check_resnet(folder: str) -> None:
    expected = torch.load(f"{folder}/expected.pt")
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        output = model(expected["pixel_values"], output_hidden_states=True)
    assert torch.equal(output.logits, expected["logits"]), (output.logits - expected["logits"]).abs().max()
    assert all(torch.equal(a, b) for a, b in zip(output.hidden_states, expected["hidden_states"], strict=True))
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True, top_k=1)
    images = [Image.new("RGB", (40, 36), color) for color in expected["colors"]]
    predictions = [prediction[0] for prediction in classifier(images)]
    assert [prediction["label"] for prediction in predictions] == expected["labels"], predictions
    assert all(abs(prediction["score"] - score) < 1e-6 for prediction, score in zip(predictions, expected["scores"]))


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        (check_marian if "marian" in folder.rpartition("/")[2] else check_resnet)(folder)
        print("ok", folder, flush=True)
