"""Shared by the translation-script tests: tiny parallel data and a tiny, fast command line."""

from pathlib import Path

from conftest import read_lines


def write_pairs(folder: Path, multi30k_dir: Path, sizes=(("train", "train", 48), ("valid", "val", 8),
                                                         ("test", "test_2016_flickr", 8))) -> Path:
    """Plain-text parallel files folder/<split>.{en,de}, the first lines of Multi30k."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, source, size in sizes:
        for lang in ("en", "de"):
            lines = read_lines(multi30k_dir / f"{source}.{lang}.gz", size)
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return folder


def tiny_args(data: Path, output_dir: Path, tokenizer: str | Path | None, *extra) -> list[str]:
    """train_translation.py flags for a seconds-long run of transformer-tiny."""
    return [
        "--train_file", str(data / "train"), "--validation_file", str(data / "valid"),
        "--source_lang", "en", "--target_lang", "de", "--model_preset", "transformer-tiny",
        *(["--tokenizer_name", str(tokenizer)] if tokenizer else []),
        "--max_tokens", "256", "--max_train_steps", "4", "--num_warmup_steps", "2", "--eval_steps", "2",
        "--num_beams", "2", "--val_max_target_length", "8", "--per_device_eval_batch_size", "4",
        "--output_dir", str(output_dir), *map(str, extra),
    ]
