"""The variants the experiments compare, by label, as the training commands' --skip_* flags."""


def skip(variant: str, **options) -> list[str]:
    """The --skip_* flags of `variant` with `options`, e.g. skip("rskip_ln", recursions=2)."""
    return ["--skip_variant", variant, *[word for name, value in options.items()
                                         for word in (f"--skip_{name}", str(value))]]


GRADIENT_VARIANTS = {
    "plain": skip("plain"), "xskip λ=0.5": skip("xskip", scale=0.5), "xskip λ=1": skip("xskip", scale=1.0),
    "xskip λ=2": skip("xskip", scale=2.0), "xskip_ln λ=2": skip("xskip_ln", scale=2.0),
    "rskip_ln K=1 (post_ln)": skip("rskip_ln", recursions=1), "rskip_ln K=2": skip("rskip_ln", recursions=2),
    "rskip_ln K=3": skip("rskip_ln", recursions=3), "pre_ln": skip("pre_ln"),
    "xskip_bn λ=2": skip("xskip_bn", scale=2.0), "rskip_bn K=2": skip("rskip_bn", recursions=2),
}
TRANSLATION_VARIANTS = {
    "post_ln": skip("post_ln"), "pre_ln": skip("pre_ln"), "xskip_ln λ=2": skip("xskip_ln", scale=2.0),
    "rskip_ln K=2": skip("rskip_ln", recursions=2), "rskip_ln K=3": skip("rskip_ln", recursions=3),
    # wmt14: the paper's claim that rSkip+LN transformer-base beats post-LN transformer-big
    "post_ln big": [*skip("post_ln"), "--model_preset", "transformer-big"],
}
# stability and the depth map: the three a translation user chooses between
STABILITY_VARIANTS = {"post_ln": skip("post_ln"), "pre_ln": skip("pre_ln"),
                      "rskip_ln K=2": skip("rskip_ln", recursions=2)}
CIFAR_VARIANTS = {
    "plain": skip("plain"), "xskip λ=0.5": skip("xskip", scale=0.5), "xskip_ln λ=2": skip("xskip_ln", scale=2.0),
    "rskip_ln K=2": skip("rskip_ln", recursions=2), "xskip_bn λ=2": skip("xskip_bn", scale=2.0),
    "rskip_bn K=2": skip("rskip_bn", recursions=2),
}
BN_VARIANTS = {
    "xskip_ln λ=2": skip("xskip_ln", scale=2.0), "xskip_bn λ=2": skip("xskip_bn", scale=2.0),
    "rskip_ln K=2": skip("rskip_ln", recursions=2), "rskip_bn K=2": skip("rskip_bn", recursions=2),
}
ALL_VARIANTS = {**GRADIENT_VARIANTS, **TRANSLATION_VARIANTS, **CIFAR_VARIANTS, **BN_VARIANTS}


def folder_label(label: str) -> str:
    """A variant's label as a folder name: 'rskip_ln K=2' -> 'rskip_ln_K2', 'xskip λ=0.5' -> 'xskip_l0.5'."""
    return label.replace(" ", "_").replace("=", "").replace("λ", "l")
