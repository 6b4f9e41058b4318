"""Shared by the image-classification script tests: a small CIFAR-10 parquet file, image folders, a tiny and fast
command line. Test modules import the fixtures they use from here."""

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA

CIFAR10 = SHARED_DATA / "cifar10" / "train.parquet"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def cifar_parquet(tmp_path_factory) -> Path:
    """The first 200 rows of the shared CIFAR-10 training file, with its datasets features (Image, ClassLabel)."""
    if not CIFAR10.exists():
        raise FileNotFoundError(f"{CIFAR10} must hold CIFAR-10 (see ../shared/data/README.md)")
    path = tmp_path_factory.mktemp("cifar10") / "train.parquet"
    pq.write_table(pq.read_table(CIFAR10).slice(0, 200), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Convolutions on two threads crawl while other processes share the two cores (module scope: set before the
    module's run fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cifar_rows(start: int, stop: int) -> list[tuple[Image.Image, int]]:
    """(image, label) rows of the shared CIFAR-10 file."""
    table = pq.read_table(CIFAR10).slice(start, stop - start)
    return [(Image.open(io.BytesIO(image["bytes"])), label)
            for image, label in zip(table.column("img").to_pylist(), table.column("label").to_pylist())]


def write_image_folder(folder: Path, images: dict[str, list[Image.Image]]) -> Path:
    """folder/<class>/<n>.png, datasets' imagefolder layout."""
    for class_name, class_images in images.items():
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(class_images):
            image.save(folder / class_name / f"{index}.png")
    return folder


def tiny_args(train_file: Path, output_dir: Path, *extra) -> list[str]:
    """train_image_classification.py flags for a seconds-long run of PreAct-ResNet-20 on 48 CIFAR-10 images."""
    return [
        "--train_file", str(train_file), "--validation_size", "24", "--max_train_samples", "48",
        "--model", "preact_resnet20", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
        "--max_train_steps", "4", "--eval_steps", "2", "--output_dir", str(output_dir), *map(str, extra),
    ]
