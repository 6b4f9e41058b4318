"""The carry of `scripts/gpu_evidence.sh`, prepared here (with the project's environment and PyPI in reach) so that a
GPU machine with its own torch and torchvision, and no network, needs nothing else:

- `cifar10.pt`: the CIFAR-10 training split as its own JPEG files, which all share one 623-byte header: the header
  once and each image's entropy-coded scan, about 15 MB for the 50,000 images (the parquet file is 46 MB; the
  decoded pixels, 154 MB, compress to no less than 91 MB with the standard library's codecs). Joining header and
  scan gives back the dataset's bytes exactly; the GPU machine decodes them once with PIL.
- `numbers.json`: the number task of `make demo` (`rskip.experiments.number_task`), tokenized here with its
  SentencePiece tokenizer: token ids for every split, the reference texts, the vocabulary's pieces (to decode
  generated ids without SentencePiece; checked here against the tokenizer's own decoding) and the Marian preset
  the depth map widens.
- `wheels/`: the exact versions (constraints.txt) of what `import rskip` needs besides torch, torchvision and
  numpy, with `requirements.txt` naming them, for CPython 3.12 (the GPU image's) and 3.11.
- `manifest.json`: each file's size and SHA-256, which the GPU side checks in seconds before any work.

    scripts/gpu_evidence_pack.sh [--output_dir .cache/gpu-evidence]
"""

import hashlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

from ..command_line import COUNT, CommandParser, output_folder
from .number_task import prepare_number_task

# What `import rskip`, timm's models and RSkipMarianMTModel need besides torch, torchvision, numpy and torch's own
# requirements (filelock, fsspec, jinja2, ...), found by importing them in a venv holding only those: transformers
# and its hard requirements that are imported at `import transformers` time (not typer, click, hf-xet or
# sentencepiece, which its command line, downloads and slow tokenizers use), timm, and the Hub client's HTTP stack.
WHEELS = ("transformers", "tokenizers", "huggingface_hub", "httpx2", "httpcore2", "h11", "anyio", "idna", "truststore",
          "safetensors", "regex", "PyYAML", "tqdm", "packaging", "timm")
PYTHON_VERSIONS = ("3.12", "3.11")
JPEG_START_OF_SCAN = b"\xff\xda"
CARRY_LIMIT_BYTES = 64 * 2**20  # what may travel to the GPU machine in all, the working tree included


def parse_args(argv=None):
    parser = CommandParser(prog="gpu_evidence_pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=output_folder, default=".cache/gpu-evidence")
    parser.add_argument("--cifar_file", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                                    / "cifar10" / "train.parquet"),
                        help="CIFAR-10's training split as parquet (columns img: JPEG bytes, label).")
    parser.add_argument("--max_images", type=COUNT, help="Pack only the first N images (tests).")
    parser.add_argument("--number_train_size", type=COUNT, default=8000)
    parser.add_argument("--number_eval_size", type=COUNT, default=200)
    parser.add_argument("--no_wheels", action="store_true",
                        help="Pack no wheels (tests, or a machine whose libraries are already in rskip's range).")
    args = parser.parse_args(argv)
    if not Path(args.cifar_file).is_file():
        parser.error(f"argument --cifar_file: no such file {args.cifar_file!r}")
    return args


# ---------------------------------------------------------------------------------------------------- CIFAR-10

def split_jpeg(data: bytes) -> tuple[bytes, bytes]:
    """A baseline JPEG's header (up to and including its start-of-scan segment) and its entropy-coded scan."""
    position = 2  # after the start-of-image marker
    while position < len(data):
        if data[position] != 0xFF:
            raise ValueError(f"not a JPEG segment at byte {position}")
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if data[position:position + 2] == JPEG_START_OF_SCAN:
            end = position + 2 + length
            return data[:end], data[end:]
        position += 2 + length
    raise ValueError("no start-of-scan segment")


def pack_cifar(parquet_file: Path, output: Path, max_images: int | None) -> dict:
    """`output`: the images' shared JPEG header, their scans end to end with their offsets, and their labels."""
    table = pq.read_table(parquet_file, columns=["img", "label"])
    images = [item["bytes"] for item in table.column("img").to_pylist()[:max_images]]
    labels = table.column("label").to_pylist()[:max_images]
    header, scans = None, []
    for index, image in enumerate(images):
        image_header, scan = split_jpeg(image)
        if header is None:
            header = image_header
        elif image_header != header:
            raise ValueError(f"{parquet_file}: image {index} has another JPEG header; this packing needs one for all")
        scans.append(scan)
    offsets = [0]
    for scan in scans:
        offsets.append(offsets[-1] + len(scan))
    torch.save({"jpeg_header": torch.frombuffer(bytearray(header), dtype=torch.uint8),
                "jpeg_scans": torch.frombuffer(bytearray(b"".join(scans)), dtype=torch.uint8),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "labels": torch.tensor(labels, dtype=torch.uint8),
                "source": f"{parquet_file.name}, first {len(images)} rows"}, output)
    return {"images": len(images), "source": str(parquet_file)}


# ------------------------------------------------------------------------------------------------- number task

def decode_pieces(pieces: list[str], ids: list[int], special_ids: set[int]) -> str:
    """SentencePiece's decoding of ids (no byte fallback): the pieces joined, '▁' read as a space."""
    return "".join(pieces[i] for i in ids if i not in special_ids).replace("\u2581", " ").strip()


def pack_numbers(folder: Path, output: Path, train_size: int, eval_size: int) -> dict:
    from transformers import AutoTokenizer  # noqa: the tokenizer is needed here only

    from ..training.translation import MODEL_PRESETS

    data, tokenizer_folder = prepare_number_task(folder, train_size=train_size, eval_size=eval_size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special_ids = set(tokenizer.all_special_ids)
    splits = {}
    for split in ("train", "valid", "test"):
        sources = (data / f"{split}.en").read_text().splitlines()
        targets = (data / f"{split}.de").read_text().splitlines()
        source_ids = tokenizer(sources)["input_ids"]
        target_ids = tokenizer(text_target=targets)["input_ids"]
        for ids, text in zip(target_ids, targets):
            decoded, reference = decode_pieces(pieces, ids, special_ids), tokenizer.decode(ids,
                                                                                        skip_special_tokens=True)
            if decoded != reference:
                raise ValueError(f"decoding the pieces of {text!r} gives {decoded!r}, the tokenizer {reference!r}")
        splits[split] = {"source_ids": source_ids, "target_ids": target_ids, "targets": targets}
    task = {"pieces": pieces, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "special_ids": sorted(special_ids), "splits": splits,
            "model_preset": "transformer-tiny", "model_config": MODEL_PRESETS["transformer-tiny"]}
    output.write_text(json.dumps(task))
    return {"pairs": {split: len(values["targets"]) for split, values in splits.items()}, "vocab_size": len(pieces)}


# ------------------------------------------------------------------------------------------------------ wheels

def pinned(package: str, constraints: Path) -> str:
    for line in constraints.read_text().splitlines():
        name = line.split("==")[0].strip()
        if "==" in line and name.lower().replace("_", "-") == package.lower().replace("_", "-"):
            return line.strip()
    raise ValueError(f"{constraints} pins no {package}")


def download_wheels(folder: Path, constraints: Path) -> list[str]:
    pins = [pinned(package, constraints) for package in WHEELS]
    for version in PYTHON_VERSIONS:
        abi = "cp" + version.replace(".", "")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                        "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", str(folder), *pins], check=True)
    (folder / "requirements.txt").write_text("".join(pin + "\n" for pin in pins))
    return pins


# ------------------------------------------------------------------------------------------------------- pack

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "cifar10.pt", "numbers.json"):
        (output / stale).unlink(missing_ok=True)
    manifest = {"cifar10": pack_cifar(Path(args.cifar_file), output / "cifar10.pt", args.max_images)}
    with tempfile.TemporaryDirectory() as folder:
        manifest["numbers"] = pack_numbers(Path(folder), output / "numbers.json", args.number_train_size,
                                           args.number_eval_size)
    wheels = output / "wheels"
    if wheels.exists():
        for old in wheels.iterdir():
            old.unlink()
    if not args.no_wheels:
        wheels.mkdir(exist_ok=True)
        try:
            manifest["wheels"] = download_wheels(wheels, Path(__file__).resolve().parents[2] / "constraints.txt")
        except subprocess.CalledProcessError:
            sys.exit("gpu_evidence_pack: pip could not download the wheels (its message is above): PyPI must be "
                     "reachable, or pack with --no_wheels for a machine whose libraries are in rskip's range")
    files = sorted(path for path in output.rglob("*") if path.is_file())
    manifest["files"] = {str(path.relative_to(output)): {"bytes": path.stat().st_size, "sha256": sha256(path)}
                         for path in files}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    parts = {"cifar10.pt": (output / "cifar10.pt").stat().st_size,
             "numbers.json": (output / "numbers.json").stat().st_size,
             "wheels": sum(path.stat().st_size for path in wheels.glob("*")) if wheels.exists() else 0}
    for name, size in parts.items():
        print(f"{name}: {size / 2**20:.1f} MiB")
    print(f"{output}: {total / 2**20:.1f} MiB in all, of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB that may travel "
          f"with the working tree ({math.floor((CARRY_LIMIT_BYTES - total) / 2**20)} MiB left for the tree)")
    return manifest


if __name__ == "__main__":
    main()
