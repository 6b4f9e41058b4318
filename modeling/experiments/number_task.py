"""The generated translation task of `make demo` and `rskip-reproduce depth`: English number words into German.

No download: the pairs are generated with num2words, e.g. "seven thousand, three hundred and forty-two" ->
"siebentausenddreihundertzweiundvierzig". German says the units before the tens ("zweiundvierzig" is two-and-forty)
and writes a number as one word, so a model must reorder, not just look words up.
"""

import random
from pathlib import Path

from num2words import num2words

from ..tokenization import train_marian_tokenizer

SPLITS = ("train", "valid", "test")


def write_number_pairs(folder: Path, largest_number: int, train_size: int, eval_size: int, seed: int) -> Path:
    """train/validation/test files PREFIX.{en,de} of distinct random numbers from 1 to `largest_number`."""
    numbers = random.Random(seed).sample(range(1, largest_number + 1), train_size + 2 * eval_size)
    splits = {"train": numbers[:train_size], "valid": numbers[train_size:train_size + eval_size],
              "test": numbers[train_size + eval_size:]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, values in splits.items():
        for lang in ("en", "de"):
            (folder / f"{split}.{lang}").write_text("".join(num2words(n, lang=lang) + "\n" for n in values))
    return folder


def write_number_tokenizer(data: Path, folder: Path, seed: int, vocab_size: int = 200) -> Path:
    """A SentencePiece tokenizer (MarianTokenizer files) trained on the training pairs in `data`."""
    train_marian_tokenizer((data / "train.en").read_text().splitlines(), (data / "train.de").read_text().splitlines(),
                           folder, vocab_size=vocab_size, source_lang="en", target_lang="de", seed=seed)
    return folder


def prepare_number_task(folder: Path, largest_number: int = 9999, train_size: int = 8000, eval_size: int = 200,
                        seed: int = 0) -> tuple[Path, Path]:
    """`folder`/data and `folder`/tokenizer, written once: an existing tokenizer is kept, so that runs resumed in a
    later sitting read the same files."""
    data, tokenizer = folder / "data", folder / "tokenizer"
    if not (tokenizer / "tokenizer_config.json").is_file():
        write_number_pairs(data, largest_number, train_size, eval_size, seed)
        write_number_tokenizer(data, tokenizer, seed)
    return data, tokenizer


__all__ = ["SPLITS", "num2words", "prepare_number_task", "write_number_pairs", "write_number_tokenizer"]
