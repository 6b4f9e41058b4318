"""The fused add-and-normalise op against the reference loop of norm modules, every form it serves.

Reference: `NormSkip.reference_forward`, the K norm modules applied in turn (itself tested against the paper's
equations in test_residual.py). The Triton kernels run on CPU under TRITON_INTERPRET=1, in a fresh process.
"""

import collections
import sys

import pytest
import timm
import torch
from timm.layers import GroupNorm1, LayerNorm2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rskip
from rskip import SkipOptions, create_skip, use_fused_skip
from rskip.fused_skip import fused_norm_dims, skip_norm

FORMS = {  # norm_dims: (host norm class, input shape)
    "token": (nn.LayerNorm, (3, 4, 8)),
    "chw": (GroupNorm1, (2, 4, 3, 3)),
    "c": (LayerNorm2d, (2, 4, 3, 3)),
}
SETTINGS = [  # (skip options, description)
    *[dict(skip_variant="rskip_ln", skip_recursions=k) for k in (1, 2, 3, 4)],
    dict(skip_variant="rskip_ln", skip_recursions=3, skip_share_norm=True),
    dict(skip_variant="xskip_ln", skip_scale=0.5),
    dict(skip_variant="xskip_ln", skip_scale=2.0, skip_learnable_scale=True),
]


def make_skip(norm_dims, options, dtype=torch.float32):
    norm_layer, shape = FORMS[norm_dims]
    torch.manual_seed(0)
    skip = create_skip(SkipOptions(**options), shape[-1] if norm_dims == "token" else shape[1], ln_layer=norm_layer)
    with torch.no_grad():  # distinct affine parameters, so a norm used in the wrong step shows
        for p in skip.parameters():
            if p.ndim:
                p.copy_(torch.randn_like(p))
    return skip.to(dtype)


def inputs(norm_dims, dtype=torch.float32):
    shape = FORMS[norm_dims][1]
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(2)]


def output_and_grads(skip, x, h):
    y = skip(x, h)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, [x, h, *skip.parameters()], grad_y)
    return y, grads


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("norm_dims", FORMS)
def test_op_matches_reference_forward_and_every_gradient(norm_dims, options):
    skip = make_skip(norm_dims, options)
    assert skip.fused_norm_dims == norm_dims
    x, h = inputs(norm_dims)
    y, grads = output_and_grads(skip, x, h)
    with use_fused_skip(False):
        y_ref, grads_ref = output_and_grads(skip, x, h)
    torch.testing.assert_close(y, y_ref)
    assert y.stride() == y_ref.stride()  # "c" keeps LayerNorm2d's channels-last output
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("norm_dims", FORMS)
def test_op_matches_reference_in_eval_without_grad(norm_dims):
    skip = make_skip(norm_dims, dict(skip_variant="rskip_ln", skip_recursions=3)).eval()
    x, h = inputs(norm_dims)
    with torch.no_grad():
        y = skip(x, h)
        with use_fused_skip(False):
            torch.testing.assert_close(y, skip(x, h))


@pytest.mark.parametrize("norm_dims", FORMS)
def test_float64_gradcheck(norm_dims):
    """Gradients of x, h, every affine and a learned λ against finite differences."""
    x, h = inputs(norm_dims, torch.float64)
    channels = x.shape[-1] if norm_dims == "token" else x.shape[1]
    generator = torch.Generator().manual_seed(3)
    weight, bias = (torch.randn(3, channels, generator=generator, dtype=torch.float64).requires_grad_()
                    for _ in range(2))
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: skip_norm(*t, 1e-5, norm_dims), (x, h, weight, bias, scale))
    assert torch.autograd.gradcheck(lambda *t: skip_norm(*t, 1.5, 1e-5, norm_dims), (x, h, weight, bias))
    assert torch.autograd.gradcheck(lambda *t: skip_norm(*t, 1.0, 1e-5, norm_dims), (x, h, weight[:1], bias[:1]))


def saved_storages(fn, *tensors) -> set:
    """The full-size tensors autograd saves (not the (K, rows) statistics or the (K, C) affine)."""
    storages = set()

    def pack(tensor):
        if tensor.numel() == tensors[0].numel() and tensor.ndim == tensors[0].ndim:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*tensors)
    return storages


@pytest.mark.parametrize("norm_dims", FORMS)
def test_op_saves_x_and_one_tensor_whatever_k(norm_dims):
    """x (which the branch's first layer keeps anyway) and z_1 = λx + h; the eager loop keeps one z_k per step."""
    x, h = (torch.randn(4, 4, 8, 8) if norm_dims != "token" else torch.randn(4, 16, 8) for _ in range(2))
    x.requires_grad_()
    for k in (2, 3, 4):
        skip = make_skip(norm_dims, dict(skip_variant="rskip_ln", skip_recursions=k))
        fused = saved_storages(skip, x, h)
        assert x.untyped_storage().data_ptr() in fused and len(fused) == 2
        with use_fused_skip(False):
            assert len(saved_storages(skip, x, h)) >= k
    # K = 1 is one norm of x + h: the module runs it as the loop does, keeping only z_1
    skip = make_skip(norm_dims, dict(skip_variant="rskip_ln", skip_recursions=1))
    assert len(saved_storages(skip, x, h)) == 1


def test_switch_selects_the_reference_path_and_restores_on_exit():
    skip = make_skip("token", dict(skip_variant="rskip_ln", skip_recursions=2))
    x, h = inputs("token")
    assert rskip.fused_skip.fused_skip_enabled()
    assert type(skip(x, h).grad_fn).__name__ == "GeneratedBackwardFor_rskip_skip_norm_defaultBackward"
    with use_fused_skip(False):
        assert not rskip.fused_skip.fused_skip_enabled()
        with use_fused_skip(True):
            assert rskip.fused_skip.fused_skip_enabled()
        assert not rskip.fused_skip.fused_skip_enabled()
        assert type(skip(x, h).grad_fn).__name__ == "NativeLayerNormBackward0"
    assert rskip.fused_skip.fused_skip_enabled()


def test_one_step_runs_the_norm_itself_unless_triton_is_selected(monkeypatch):
    """K = 1 computes LN(λx + h), which the loop does with the same kernels and saved tensor; through the op it
    would only add a stacked affine and a custom-op call (the K = 1 time cost over stock in the benchmark)."""
    skip = make_skip("token", dict(skip_variant="rskip_ln", skip_recursions=1))
    x, h = inputs("token")
    assert type(skip(x, h).grad_fn).__name__ == "NativeLayerNormBackward0"
    monkeypatch.setattr(rskip.fused_skip.kernels, "triton", object())  # importable or not, the choice is the switch
    with rskip.use_triton(True):
        assert type(skip(x, h).grad_fn).__name__ == "GeneratedBackwardFor_rskip_skip_norm_defaultBackward"


def test_triton_is_opt_in_by_switch_or_environment(run_python, monkeypatch):
    """The kernels stay off by default until a GPU run has proven them (README); the switch restores on exit."""
    assert not rskip.fused_skip.triton_enabled()
    monkeypatch.setattr(rskip.fused_skip.kernels, "triton", object())
    with rskip.use_triton(True):
        assert rskip.fused_skip.triton_enabled()
        with rskip.use_triton(False):
            assert not rskip.fused_skip.triton_enabled()
        assert rskip.fused_skip.triton_enabled()
    assert not rskip.fused_skip.triton_enabled()
    script = "import rskip.fused_skip as fs; print('selected', fs._triton_selected)"
    monkeypatch.setenv("RSKIP_TRITON", "1")
    assert "selected True" in run_python(script).stdout
    monkeypatch.setenv("RSKIP_TRITON", "0")
    assert "selected False" in run_python(script).stdout
    monkeypatch.setenv("RSKIP_TRITON", "yes")
    with pytest.raises(AssertionError, match="RSKIP_TRITON='yes' is not allowed; set it to 1"):
        run_python(script)


def test_autocast_casts_to_the_autocast_dtype_not_float32(monkeypatch):
    """Where autocast would run LayerNorm in fp32 (CUDA), the op takes x and h in the autocast dtype instead, so a
    bf16 model moves bf16; shown on CPU by treating CPU autocast as CUDA's."""
    monkeypatch.setattr(rskip.fused_skip, "_AUTOCAST_CASTS_TO_LOW_PRECISION", ("cpu",))
    x = torch.randn(4, 8, requires_grad=True)  # an fp32 residual stream, as LayerNorm outputs under CUDA autocast
    h = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = skip_norm(x, h, weight, bias, 1.0, 1e-5, "token")
    assert y.dtype == torch.bfloat16
    y_ref = skip_norm(x.detach().bfloat16(), h.detach(), weight, bias, 1.0, 1e-5, "token")
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert skip_norm(x, h, weight, bias, 1.0, 1e-5, "token").dtype == torch.float32


def test_batchnorm_and_unsupported_norms_stay_on_the_reference_path():
    assert make_skip("token", dict(skip_variant="rskip_bn")).fused_norm_dims is None
    assert fused_norm_dims(nn.GroupNorm(2, 4)) is None
    assert fused_norm_dims(nn.LayerNorm(8, elementwise_affine=False)) is None
    assert fused_norm_dims(nn.LayerNorm((4, 8))) is None


@pytest.mark.parametrize("norm_dims", FORMS)
def test_bf16_autocast_matches_reference(norm_dims):
    """Under autocast the branch output is bf16; the op follows LayerNorm's autocast dtype and values."""
    skip = make_skip(norm_dims, dict(skip_variant="rskip_ln", skip_recursions=2))
    x, _ = inputs(norm_dims)
    channels = x.shape[-1] if norm_dims == "token" else x.shape[1]
    branch = nn.Linear(channels, channels)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = branch(x) if norm_dims == "token" else branch(x.movedim(1, -1)).movedim(-1, 1)
            return skip(x.to(torch.bfloat16), h)

    y = run()
    with use_fused_skip(False):
        y_ref = run()
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def tiny_marian(skip_recursions):
    config = rskip.RSkipMarianConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=49, decoder_start_token_id=49, dropout=0.0, skip_variant="rskip_ln",
        skip_recursions=skip_recursions)
    torch.manual_seed(0)
    return rskip.RSkipMarianMTModel(config).train()


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", ["marian", "resnet"])
def test_torch_compile_fullgraph_gives_the_reference_outputs_and_gradients(family):
    """fullgraph=True fails on any graph break, so the op (its fake and its autograd) is traced as one node.
    aot_eager runs the same tracing as inductor without compiling C++, which keeps this test short."""
    torch.manual_seed(0)
    if family == "marian":
        model = tiny_marian(skip_recursions=3)
        batch = dict(input_ids=torch.randint(0, 49, (2, 5)), labels=torch.randint(0, 49, (2, 5)))

        def loss_fn(m):
            return m(**batch).loss
    else:
        model = timm.create_model("rskip_resnet18", skip_recursions=2, skip_norm_dims="c", num_classes=3).train()
        images = torch.randn(2, 3, 16, 16)

        def loss_fn(m):
            return m(images).logsumexp(-1).mean()
    with use_fused_skip(False):
        loss_ref, grads_ref = loss_and_grads(model, loss_fn)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), loss_fn)
    torch.testing.assert_close(loss, loss_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-3)


def test_op_compiles_with_inductor():
    x, h = inputs("token")
    weight, bias = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)

    def fn(x, h, weight, bias):
        return skip_norm(x, h, weight, bias, 1.0, 1e-5, "token").sin()

    y_ref = fn(x, h, weight, bias)
    y = torch.compile(fn, fullgraph=True)(x, h, weight, bias)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), [x, weight]), torch.autograd.grad(y_ref.sum(), [x, weight]))


TRITON_CHECK = r"""
import torch
import rskip.fused_skip as fs
import rskip.fused_skip_triton as kernels

# Tiny tiles, so that tiny tensors exercise what large ones do: several rows per tile, tiles shared out over a few
# persistent programs, rows split over channel groups and over position tiles (with a partial last tile).
kernels._TILE_ELEMENTS, kernels._SPLIT_POSITIONS, kernels.interpreter_programs = 16, 4, 3
CASES = [("token", (3, 5, 8), False), ("token", (3, 20), True), ("chw", (2, 4, 3, 3), True), ("c", (2, 4, 3, 3), False)]


def run(x, h, weight, bias, lam, norm_dims, grad_y, triton_path):
    fs._interpret_triton = triton_path
    leaves = [t for t in (x, h, weight, bias, lam) if isinstance(t, torch.Tensor)]
    y = fs.skip_norm(x, h, weight, bias, lam, 1e-5, norm_dims)
    return (y, *torch.autograd.grad(y, leaves, grad_y))


for norm_dims, shape, split in CASES:
    kernels.MAX_REGISTER_FEATURES = 16 if split else 8192  # token rows of 20 features take the split kernels
    assert kernels.uses_registers(torch.empty(shape), norm_dims) != split
    for k, scale in ((1, 1.0), (2, "learned"), (3, 0.5), (4, 1.0)):
        torch.manual_seed(k)
        channels = shape[-1] if norm_dims == "token" else shape[1]
        x, h = (torch.randn(shape, requires_grad=True) for _ in range(2))
        weight, bias = (torch.randn(k, channels, requires_grad=True) for _ in range(2))
        lam = torch.tensor(0.7, requires_grad=True) if scale == "learned" else scale
        grad_y = torch.randn(shape)
        got = run(x, h, weight, bias, lam, norm_dims, grad_y, True)
        expected = run(x, h, weight, bias, lam, norm_dims, grad_y, False)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        assert got[0].stride() == expected[0].stride()
        fs._interpret_triton = True
        with torch.no_grad():
            torch.testing.assert_close(fs.skip_norm(x, h, weight, bias, lam, 1e-5, norm_dims), got[0])
        if k == 2:  # deterministic: per-program partial sums reduced in a fixed order, no atomics
            again = run(x, h, weight, bias, lam, norm_dims, grad_y, True)
            assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))

    # bf16 in, bf16 out (statistics in fp32): close to the fp32 computation of the same bf16 values
    torch.manual_seed(0)
    x, h = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(2, channels, requires_grad=True) for _ in range(2))
    grad_y = torch.randn(shape, dtype=torch.bfloat16)
    got = run(x, h, weight, bias, 1.0, norm_dims, grad_y, True)
    assert [t.dtype for t in got] == [torch.bfloat16] * 3 + [torch.float32] * 2
    upcast = [t.detach().float().requires_grad_() for t in (x, h)]
    expected = run(*upcast, weight, bias, 1.0, norm_dims, grad_y.float(), False)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.02)

    # rows whose mean (1e3) dwarfs their spread: E[z²] - E[z]² in fp32 would lose about half the digits of the variance
    x64 = 1e3 + torch.randn(shape, dtype=torch.float64)
    h64 = torch.randn(shape, dtype=torch.float64)
    weight, bias = torch.ones(2, channels, dtype=torch.float64), torch.zeros(2, channels, dtype=torch.float64)
    fs._interpret_triton = True
    with torch.no_grad():
        y = fs.skip_norm(x64.float(), h64.float(), weight.float(), bias.float(), 1.0, 1e-5, norm_dims)
        fs._interpret_triton = False
        y_ref = fs.skip_norm(x64, h64, weight, bias, 1.0, 1e-5, norm_dims)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-3, rtol=0)
print("triton ok")
"""


def test_triton_kernels_match_the_pytorch_path_under_the_interpreter(run_python, monkeypatch):
    """Both kernel layouts, K = 1..4, fixed and learned λ: outputs and every gradient against the PyTorch path; two
    backward calls give bitwise-equal gradients; bf16 stays bf16; rows with mean 1e3 against a float64 reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton ok" in run_python(TRITON_CHECK).stdout


def test_op_runs_where_triton_is_missing(run_python):
    """A saved model folder must load and train without triton: the kernels are optional."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, rskip\n"
        "assert rskip.fused_skip.kernels.triton is None and not rskip.fused_skip.triton_enabled()\n"
        "skip = rskip.create_skip(rskip.SkipOptions(skip_variant='rskip_ln', skip_recursions=2), 8)\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "skip(x, torch.randn(3, 8)).sum().backward()\n"
        "print('ok', x.grad.shape)\n"
    )
    assert "ok" in run_python(script).stdout


def test_cpu_inference_without_gradients_runs_the_loop_and_training_the_op(monkeypatch):
    import rskip.residual

    calls = []
    monkeypatch.setattr(rskip.residual, "skip_norm", lambda *args: calls.append(args) or args[1])
    skip = rskip.create_skip(rskip.SkipOptions(skip_variant="rskip_ln", skip_recursions=2), 8)
    x, h = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        skip(x, h)
    assert calls == []
    skip(x, h)
    assert len(calls) == 1


def dispatched_ops(fn) -> collections.Counter:
    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counts = collections.Counter()
    with Count():
        fn()
    return counts


def test_the_ops_a_step_runs_on_the_pytorch_path():
    """K = 1 dispatches exactly what LN(x + h) does; K = 2 no zero gradients for the op's backward-only outputs
    (autograd would otherwise memset a z_1-sized tensor per call)."""
    x, h = inputs("token")
    one = make_skip("token", dict(skip_variant="rskip_ln", skip_recursions=1))
    stock = nn.LayerNorm(8)
    assert (dispatched_ops(lambda: torch.autograd.grad(one(x, h).sum(), [x, h, one.weight, one.bias]))
            == dispatched_ops(lambda: torch.autograd.grad(stock(x + h).sum(), [x, h, stock.weight, stock.bias])))
    two = make_skip("token", dict(skip_variant="rskip_ln", skip_recursions=2))
    ops = dispatched_ops(lambda: torch.autograd.grad(two(x, h).sum(), [x, h, *two.parameters()]))
    assert ops["skip_norm"] == ops["skip_norm_backward"] == 1
    assert not {"zeros", "zero_", "fill_", "zeros_like"} & set(ops)


def test_a_saved_models_remote_code_beside_the_installed_rskip_keeps_both_ops_alive(tmp_path):
    """Remote code (`trust_remote_code=True` where the classes are not registered, or `get_class_from_dynamic_module`)
    imports a copy of fused_skip.py under transformers_modules. A copy that re-registered `rskip::skip_norm` would free
    the installed module's op while its models still call it: a use after free that showed later, at random, as
    `ValueError: vector::reserve`."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    import rskip.fused_skip as installed

    config = rskip.RSkipMarianConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, pad_token_id=0,
                                     decoder_start_token_id=0, skip_variant="rskip_ln", skip_recursions=2,
                                     dropout=0.0)
    torch.manual_seed(0)
    model = rskip.RSkipMarianMTModel(config)
    model.save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module("modeling_rskip_marian.RSkipMarianMTModel", str(tmp_path))
    copy = sys.modules[remote_class.__module__.rsplit(".", 1)[0] + ".fused_skip"]

    assert torch.ops.rskip.skip_norm.default is installed._skip_norm_op._opoverload  # still the registered op
    assert copy._skip_norm_op._opoverload is not installed._skip_norm_op._opoverload  # the copy has its own
    remote = remote_class.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5, 2]])
    losses = []
    for each in (model.train(), remote.train()):
        loss = each(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1])
