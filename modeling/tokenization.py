"""Train a SentencePiece tokenizer on parallel text and save it as a standard `MarianTokenizer`."""

import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import MarianTokenizer

# Marian's convention: </s> = 0, <unk> = 1, <pad> last.
SPECIAL_TOKENS = {"eos": "</s>", "unk": "<unk>", "pad": "<pad>"}


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str, character_coverage: float,
                         max_sentences: int, seed: int) -> bytes:
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_piece=SPECIAL_TOKENS["unk"],
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def _pieces(model: bytes) -> list[str]:
    processor = spm.SentencePieceProcessor(model_proto=model)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size()) if not processor.is_unknown(i)]


def train_marian_tokenizer(
    source_texts: list[str],
    target_texts: list[str],
    output_dir: str | Path,
    vocab_size: int = 8000,
    joint: bool = True,
    source_lang: str | None = None,
    target_lang: str | None = None,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> MarianTokenizer:
    """Train SentencePiece on the training text and save a `MarianTokenizer` in `output_dir`.

    `joint=True` trains one model on both sides (`vocab_size` pieces, as in Vaswani et al.);
    `joint=False` trains one per side, `vocab_size` pieces each, as OPUS-MT does. Either way
    the two sides share one `vocab.json` (and so one embedding matrix).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    options = dict(model_type=model_type, character_coverage=character_coverage, max_sentences=max_sentences, seed=seed)
    if joint:
        source_model = target_model = _train_sentencepiece([*source_texts, *target_texts], vocab_size, **options)
    else:
        source_model = _train_sentencepiece(source_texts, vocab_size, **options)
        target_model = _train_sentencepiece(target_texts, vocab_size, **options)

    tokens = [SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["unk"]]
    for piece in _pieces(source_model) + _pieces(target_model):
        if piece not in tokens:
            tokens.append(piece)
    tokens.append(SPECIAL_TOKENS["pad"])

    work_dir = output_dir / "sentencepiece"
    work_dir.mkdir(exist_ok=True)
    (work_dir / "source.spm").write_bytes(source_model)
    (work_dir / "target.spm").write_bytes(target_model)
    (work_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    tokenizer = MarianTokenizer(
        source_spm=str(work_dir / "source.spm"),
        target_spm=str(work_dir / "target.spm"),
        vocab=str(work_dir / "vocab.json"),
        source_lang=source_lang,
        target_lang=target_lang,
    )
    tokenizer.save_pretrained(output_dir)
    for name in ("source.spm", "target.spm", "vocab.json"):
        (work_dir / name).unlink()
    work_dir.rmdir()
    return MarianTokenizer.from_pretrained(output_dir)


__all__ = ["train_marian_tokenizer"]
