"""The `skip_*` options of the residual family: declared, validated, documented and described once.

Every config of this package takes these fields (`SkipOptions.config_fields()` is their base class), their
docstrings come from `SkipOptions.config_docstring()`, the training scripts build their `--skip_*` flags from the
same declarations, and model cards, run summaries and comparison labels use `describe`, `used` and `label`.

A bad value raises `ConfigFieldError`, a `ValueError` that carries the field, the value and what is allowed, so a
command line can name the flag behind it without reading the message.

This module is plain data: it imports neither torch nor timm.
"""

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, field, fields

SKIP_VARIANTS = ("plain", "post_ln", "pre_ln", "xskip", "xskip_ln", "rskip_ln", "xskip_bn", "rskip_bn")
SCALED_VARIANTS = ("xskip", "xskip_ln", "xskip_bn")
RECURSIVE_VARIANTS = ("rskip_ln", "rskip_bn")
LN_VARIANTS = ("post_ln", "pre_ln", "xskip_ln", "rskip_ln")
SKIP_NORM_DIMS = ("chw", "c")

# How model cards name each variant (formatted with the options) and the equation of its block output.
VARIANT_DESCRIPTIONS = {
    "plain": ("a plain residual connection", "x + F(x)"),
    "post_ln": ("post-LN, the original Transformer's", "LN(x + F(x))"),
    "pre_ln": ("pre-LN", "x + F(LN(x))"),
    "xskip": ("an expanded skip connection (xSkip) with λ = {skip_scale}", "λ·x + F(x)"),
    "xskip_ln": ("an expanded skip connection with layer normalization (xSkip+LN) with λ = {skip_scale}",
                 "LN(λ·x + F(x))"),
    "rskip_ln": ("the recursive skip connection with layer normalization (rSkip+LN) with K = {skip_recursions}",
                 "y_K, with y_0 = F(x) and y_k = LN_k(x + y_{k-1}) for k = 1..K"),
    "xskip_bn": ("an expanded skip connection with batch normalization with λ = {skip_scale}", "BN(λ·x + F(x))"),
    "rskip_bn": ("the recursive skip connection with batch normalization with K = {skip_recursions}",
                 "y_K, with y_0 = F(x) and y_k = BN_k(x + y_{k-1}) for k = 1..K"),
}


class ConfigFieldError(ValueError):
    """A config field with a value it cannot take: `field` names it, `value` is the value, `allowed` says what is
    allowed. The message reads ``<field>=<value> <problem>; allowed: <allowed>``."""

    def __init__(self, field_name: str, value, allowed: str, problem: str = "is not allowed"):
        self.field, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"{field_name}={value!r} {problem}; allowed: {allowed}")


def holds_numbers(annotation) -> bool:
    """Whether a dataclass field annotated `annotation` (a type, a union, or their string form) holds an `int` or a
    `float`: where an integral number is given as a plain `int` (which a float-only field may still refuse)."""
    if isinstance(annotation, str):
        return not {"int", "float"}.isdisjoint(part.strip() for part in annotation.split("|"))
    return annotation in (int, float) or not {int, float}.isdisjoint(typing.get_args(annotation))


def plain_int(value):
    """`value` as a plain `int` if it is an integral number other than a bool (a numpy integer, say), else `value`
    unchanged: a config keeps plain ints, so that its config.json stays JSON."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value) is not int:
        return int(value)
    return value


def check_number(name: str, value, minimum, maximum=None, integer: bool = False) -> None:
    """Raise `ConfigFieldError` unless `value` is a number (an integer if `integer`; never a bool) in
    [minimum, maximum]: the shape and rate fields of the configs, which torch would reject only later."""
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} >= {minimum}" if maximum is None else f"{kind} in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ConfigFieldError(name, value, allowed, f"is not {kind}")
    if not (minimum <= value and (maximum is None or value <= maximum)):  # also refuses NaN
        raise ConfigFieldError(name, value, allowed, "is out of range")


def option(default, help: str, used_by: tuple[str, ...] = SKIP_VARIANTS, choices: tuple[str, ...] | None = None,
           short: str | None = None):
    """A `skip_*` field: its default, its documentation, the variants that read it, its choices (strings), and the
    short name used in labels (``K``, ``λ``)."""
    return field(default=default, metadata={"help": help, "used_by": used_by, "choices": choices, "short": short})


@dataclass(frozen=True)
class SkipOptions:
    """The `skip_*` options shared by every model of this package, validated on creation.

    An option the chosen variant does not read must keep its default value: a non-default value there is a mistake
    (say, `skip_recursions=3` with `post_ln`) and raises `ConfigFieldError`.
    """

    skip_variant: str = option(
        "rskip_ln", "The residual connection of every block: y = plain: x + h; post_ln: LN(x + h); pre_ln: "
        "x + F(LN(x)); xskip: λ·x + h; xskip_ln: LN(λ·x + h); rskip_ln: y_k = LN_k(x + y_{k-1}), k = 1..K; "
        "xskip_bn and rskip_bn: the same with BatchNorm (h = F(x) after dropout).", choices=SKIP_VARIANTS)
    skip_scale: float = option(
        1.0, "λ of the xskip* variants, multiplying the block's input (or shortcut) before the add; must be > 0.",
        used_by=SCALED_VARIANTS, short="λ")
    skip_recursions: int = option(
        2, "K of the rskip* variants: y_k = LN_k(x + y_{k-1}), k = 1..K; K = 1 is post_ln, K = 2 the paper's "
        "headline setting.", used_by=RECURSIVE_VARIANTS, short="K")
    skip_share_norm: bool = option(
        False, "rskip* only: one norm for all K steps instead of one per step.", used_by=RECURSIVE_VARIANTS,
        short="shared norm")
    skip_learnable_scale: bool = option(
        False, "xskip* only: learn λ (one scalar per block, initialised at skip_scale).", used_by=SCALED_VARIANTS,
        short="learned λ")

    def __post_init__(self):
        for spec in fields(self):
            if holds_numbers(spec.type):  # a numpy integer from a grid is an int
                object.__setattr__(self, spec.name, plain_int(getattr(self, spec.name)))
            self._check_type(spec, getattr(self, spec.name))
        if self.skip_variant in SCALED_VARIANTS and self.skip_scale <= 0:
            raise ConfigFieldError("skip_scale", self.skip_scale, "a number > 0",
                                   f"is not a valid λ for skip_variant={self.skip_variant!r}")
        for spec in fields(self):
            value = getattr(self, spec.name)
            if self.skip_variant not in spec.metadata["used_by"] and value != spec.default:
                raise ConfigFieldError(
                    spec.name, value, f"its default, {spec.default!r}, unless skip_variant is one of "
                    f"{', '.join(spec.metadata['used_by'])}", f"is set but skip_variant={self.skip_variant!r} "
                    "does not use it")

    @staticmethod
    def _check_type(spec: dataclasses.Field, value) -> None:
        name, kind, choices = spec.name, spec.type, spec.metadata["choices"]
        if choices is not None:
            if value not in choices:
                raise ConfigFieldError(name, value, ", ".join(choices), "is not known")
        elif kind in (bool, "bool"):
            if not isinstance(value, bool):
                raise ConfigFieldError(name, value, "True or False", "is not a boolean")
        elif kind in (int, "int"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigFieldError(name, value, "an integer >= 1", "is not a valid recursion depth K")
        elif kind in (float, "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigFieldError(name, value, "a finite number (λ > 0)", "is not a finite number")

    @classmethod
    def refuse_unknown(cls, kwargs: dict, owner: str) -> None:
        """Raise `ConfigFieldError`, naming the closest option, for a keyword of `kwargs` that starts with ``skip_``
        but is none of these options (a misspelling would otherwise be stored and ignored). Other keywords pass."""
        known = [spec.name for spec in fields(cls)]
        for name, value in kwargs.items():
            if name.startswith("skip_") and name not in known:
                closest = difflib.get_close_matches(name, known, n=1, cutoff=0)[0]
                raise ConfigFieldError(name, value, ", ".join(known),
                                       f"is not an option of {owner} (did you mean {closest}?)")

    @classmethod
    def from_object(cls, obj) -> "SkipOptions":
        """Read the `skip_*` attributes of a config (or any object carrying them)."""
        return cls(**{spec.name: getattr(obj, spec.name) for spec in fields(cls)})

    @classmethod
    def given(cls, obj) -> dict:
        """The `skip_*` attributes of `obj` (a parsed command line) that are set, that is not None."""
        return {spec.name: getattr(obj, spec.name) for spec in fields(cls) if getattr(obj, spec.name, None) is not None}

    @classmethod
    def pop_from(cls, kwargs: dict) -> "SkipOptions":
        """Take the `skip_*` entries out of a keyword-argument dict."""
        return cls(**{spec.name: kwargs.pop(spec.name) for spec in fields(cls) if spec.name in kwargs})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def used(self) -> dict:
        """The options this variant reads, starting with `skip_variant` (`post_ln` reads no other)."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)
                if self.skip_variant in spec.metadata["used_by"]}

    def label(self) -> str:
        """A short name for tables and plots: ``rskip_ln K=2``, ``xskip λ=0.5 learned λ``, ``post_ln``."""
        parts = [self.skip_variant]
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "skip_variant" or self.skip_variant not in spec.metadata["used_by"]:
                continue
            if isinstance(value, bool):
                parts += [spec.metadata["short"]] if value else []
            elif spec.metadata["choices"] is not None:
                parts += [spec.metadata["short"].format(value)] if value != spec.default else []
            else:
                parts.append(f"{spec.metadata['short']}={value}")
        return " ".join(parts)

    def describe(self) -> tuple[str, str]:
        """The variant in words, as a model card says it, and the equation of a block's output."""
        name, equation = VARIANT_DESCRIPTIONS[self.skip_variant]
        name = name.format(**self.to_dict())
        if self.skip_learnable_scale:
            name += " (λ learned, one per block, starting there)"
        if self.skip_share_norm:
            name += ", one norm shared by the K steps"
        return name, equation

    @classmethod
    def config_docstring(cls) -> str:
        """The fields in transformers' docstring format, for the configs' documentation."""
        entries = []
        for spec in fields(cls):
            kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
            entries.append(f"{spec.name} (`{kind}`, *optional*, defaults to `{spec.default!r}`):\n"
                           f"    {spec.metadata['help']}")
        return "\n".join(entries)

    @classmethod
    def config_fields(cls) -> type:
        """A (mutable, keyword-only) dataclass holding these fields with their defaults, for a `PreTrainedConfig`
        to inherit: transformers turns every config into a dataclass and collects the fields of its bases."""
        return dataclasses.make_dataclass(
            f"{cls.__name__}Fields",
            [(spec.name, spec.type, field(default=spec.default)) for spec in fields(cls)],
            kw_only=True,
        )


@dataclass(frozen=True)
class ResNetSkipOptions(SkipOptions):
    """`SkipOptions` plus the axes the LN variants normalise a feature map over (BN variants use BatchNorm2d)."""

    skip_norm_dims: str = option(
        "chw", "LN variants only: normalise each sample over (C, H, W) with a per-channel affine ('chw', GroupNorm "
        "with one group) or each position over C ('c', ConvNeXt's LayerNorm2d).", used_by=LN_VARIANTS,
        choices=SKIP_NORM_DIMS, short="LN over {}")


def with_skip_docs(options_class: type[SkipOptions]):
    """A class decorator that puts the documentation of `options_class`'s fields where a config's docstring says
    ``{skip_options}``."""

    def document(config_class: type) -> type:
        docs = options_class.config_docstring().replace("\n", "\n    ")
        config_class.__doc__ = config_class.__doc__.replace("{skip_options}", docs)
        return config_class

    return document


__all__ = [
    "SKIP_VARIANTS",
    "SCALED_VARIANTS",
    "RECURSIVE_VARIANTS",
    "LN_VARIANTS",
    "SKIP_NORM_DIMS",
    "ConfigFieldError",
    "holds_numbers",
    "plain_int",
    "check_number",
    "SkipOptions",
    "ResNetSkipOptions",
    "with_skip_docs",
]
