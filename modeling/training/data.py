"""Reading local data files, for both tasks: one error message that names the file."""

from pathlib import Path

from datasets import Dataset, load_dataset

from .errors import TrainingError


def read_data_file(builder: str, path: str | Path, folder: bool = False) -> Dataset:
    """The rows that datasets' `builder` (json, text, parquet, imagefolder...) reads from the file `path`, or from
    every file below the folder `path`. A missing path, or one it cannot read, raises `TrainingError` naming it."""
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise TrainingError(f"{path}: no such {'folder' if folder else 'file'}")
    if not folder and path.stat().st_size == 0:
        raise TrainingError(f"{path} is empty")
    try:
        rows = load_dataset(builder, data_files=str(path / "**" if folder else path), split="train")
    except Exception as error:  # noqa: BLE001 -- whatever datasets fails with, the user must hear which file
        cause = error.__cause__ or error
        raise TrainingError(f"cannot read {path}: {type(cause).__name__}: {cause}") from error
    if not len(rows):
        raise TrainingError(f"{path} has no rows")
    return rows


__all__ = ["read_data_file"]
