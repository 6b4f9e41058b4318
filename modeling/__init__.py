"""rskip: the recursive skip connection with layer normalization (rSkip+LN) and its residual family."""

from .residual import SKIP_VARIANTS, SkipOptions, create_skip

__all__ = ["SKIP_VARIANTS", "SkipOptions", "create_skip"]
