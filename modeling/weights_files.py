"""Errors that name the weights file a checkpoint could not be read from.

transformers opens each `*.safetensors` file of a checkpoint with `safe_open`, whose error on a truncated or corrupt
file ("incomplete metadata, file not fully covered") names no file; for a sharded or cached Hub checkpoint the user
cannot tell which file to download again.
"""

import os

from safetensors import SafetensorError, safe_open


class CorruptWeightsFileError(OSError):
    """A weights file that cannot be read: `path` names it."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(
            f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes; safetensors: {reason}); save or "
            "download the checkpoint again"
        )


def find_unreadable_file(checkpoint_files: list[str] | None) -> CorruptWeightsFileError | None:
    """The first of `checkpoint_files` that safetensors cannot open, as an error; None if all open."""
    for path in checkpoint_files or []:
        if str(path).endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as error:
                return CorruptWeightsFileError(str(path), str(error))
    return None


class WeightsFileCheckMixin:
    """For a `PreTrainedModel`: `from_pretrained` raises `CorruptWeightsFileError`, naming the file, where
    safetensors fails to open a checkpoint file."""

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, checkpoint_files, *args, **kwargs):
        # PreTrainedModel.from_pretrained calls this (a staticmethod there) with the resolved files.
        try:
            return super()._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)
        except SafetensorError as error:
            unreadable = find_unreadable_file(checkpoint_files)
            if unreadable is None:
                raise
            raise unreadable from error


__all__ = ["CorruptWeightsFileError", "WeightsFileCheckMixin"]
