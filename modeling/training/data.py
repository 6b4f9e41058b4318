"""Reading local data files, for both tasks: one error message that names the file."""

from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from .errors import TrainingError


def read_data_file(builder: str, path: str | Path, folder: bool = False) -> Dataset:
    """The rows that datasets' `builder` (json, text, parquet, imagefolder...) reads from the file `path`, or from
    every file below the folder `path`. A missing path, or one it cannot read, raises `TrainingError` naming it."""
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise TrainingError(f"{path}: no such {'folder' if folder else 'file'}")
    try:
        return load_dataset(builder, data_files=str(path / "**" if folder else path), split="train")
    except (DatasetGenerationError, OSError, ValueError, EOFError) as error:
        cause = error.__cause__ or error
        raise TrainingError(f"cannot read {path}: {type(cause).__name__}: {cause}") from error


__all__ = ["read_data_file"]
