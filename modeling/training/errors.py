"""The one exception type of the training library."""


class TrainingError(Exception):
    """A problem the user must fix (bad input, a wrong checkpoint, a diverged run), reported as one message."""


__all__ = ["TrainingError"]
