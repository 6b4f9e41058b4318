"""The op's Triton kernels on a GPU: what the CPU interpreter cannot show.

Run by `scripts/gpu_check.sh` (``pytest -m cuda``); skipped where no CUDA GPU is present. Until this file has passed
on a GPU (recorded in the README), CUDA tensors take the op's PyTorch path by default and these tests select the
kernels with `rskip.use_triton`.

Accuracy follows flash-attention's rule: against a reference computed in fp32 from the same (rounded) inputs, the
kernels' error is at most twice the error of PyTorch's own kernels in the same dtype, plus a small atol.
"""

import copy

import pytest
import timm
import torch

import rskip
from rskip.fused_skip import skip_norm

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# ResNet-50 at 224 px: the block outputs of its four stages, batch 8
RESNET50_MAPS = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]


@pytest.fixture(autouse=True)
def triton_kernels():
    assert rskip.fused_skip.kernels.triton is not None, "triton must be importable where a GPU is"
    with rskip.use_triton(True):
        yield


def op_outputs(x, h, weight, bias, norm_dims, grad_y, triton: bool):
    """y and the gradients of x, h, weight and bias, through the kernels or through PyTorch's native kernels."""
    leaves = [t.detach().requires_grad_() for t in (x, h, weight, bias)]
    with rskip.use_triton(triton):
        y = skip_norm(*leaves, 1.0, 1e-5, norm_dims)
        return [y, *torch.autograd.grad(y, leaves, grad_y)]


def make_inputs(shape, channels, k, dtype, channels_last=False, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=generator, device="cuda", dtype=dtype)

    x, h, grad_y = randn(*shape), randn(*shape), randn(*shape)
    if channels_last:
        x, h, grad_y = (t.contiguous(memory_format=torch.channels_last) for t in (x, h, grad_y))
    weight = 1 + 0.1 * randn(k, channels, dtype=torch.float32)
    bias = 0.1 * randn(k, channels, dtype=torch.float32)
    return x, h, weight, bias, grad_y


def assert_within_flash_attention_rule(x, h, weight, bias, grad_y, norm_dims):
    dtype = x.dtype
    reference = op_outputs(x.float(), h.float(), weight, bias, norm_dims, grad_y.float(), triton=False)
    eager = op_outputs(x, h, weight, bias, norm_dims, grad_y, triton=False)
    fused = op_outputs(x, h, weight, bias, norm_dims, grad_y, triton=True)
    names = ["y", "dx", "dh", "dw", "db"]
    for name, ref, ours, theirs in zip(names, reference, fused, eager, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        error = (ours.float() - ref.float()).abs().max().item()
        eager_error = (theirs.float() - ref.float()).abs().max().item()
        # dw/db sum over every row: scale their atol with the magnitude of the sum
        atol = ATOL[dtype] * (1 if name in ("y", "dx", "dh") else max(1.0, ref.abs().max().item()))
        assert error <= 2 * eager_error + atol, f"{name}: {error:.3g} > 2 × {eager_error:.3g} + {atol:.3g}"


# Every K in bf16 (the training dtype); fp32 and fp16 at K = 2. Each (K, dtype, size) compiles its own kernels, and
# the whole GPU check has to fit in a few minutes.
PRECISIONS = [(k, torch.bfloat16) for k in (1, 2, 3, 4)] + [(2, torch.float32), (2, torch.float16)]


@pytest.mark.parametrize("k, dtype", PRECISIONS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("features", [64, 512, 1024, 4096, 8192])
def test_token_rows_against_fp32_reference(k, features, dtype):
    x, h, weight, bias, grad_y = make_inputs((2048, features), features, k, dtype)
    assert_within_flash_attention_rule(x, h, weight, bias, grad_y, "token")


def test_token_rows_longer_than_the_register_limit_are_split():
    features = 2 * rskip.fused_skip.kernels.MAX_REGISTER_FEATURES
    x, h, weight, bias, grad_y = make_inputs((256, features), features, 2, torch.bfloat16)
    assert not rskip.fused_skip.kernels.uses_registers(x, "token")
    assert_within_flash_attention_rule(x, h, weight, bias, grad_y, "token")


# bf16 channels-last (a bf16 ResNet's layout) for K = 1..3; fp32 and fp16 in NCHW at K = 2
MAP_PRECISIONS = [(k, torch.bfloat16, True) for k in (1, 2, 3)] + [(2, torch.float32, False), (2, torch.float16, False)]


@pytest.mark.parametrize("k, dtype, channels_last", MAP_PRECISIONS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", RESNET50_MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_dims", ["chw", "c"])
def test_resnet50_feature_maps_against_fp32_reference(norm_dims, shape, k, dtype, channels_last):
    x, h, weight, bias, grad_y = make_inputs(shape, shape[1], k, dtype, channels_last)
    assert_within_flash_attention_rule(x, h, weight, bias, grad_y, norm_dims)


@pytest.mark.parametrize("norm_dims, shape", [("token", (16384, 512)), ("token", (4096, 4096)),
                                              ("chw", (32, 256, 56, 56)), ("c", (32, 256, 56, 56))])
def test_two_runs_give_bitwise_equal_gradients(norm_dims, shape):
    x, h, weight, bias, grad_y = make_inputs(shape, shape[-1] if norm_dims == "token" else shape[1], 2,
                                             torch.bfloat16)
    first = op_outputs(x, h, weight, bias, norm_dims, grad_y, triton=True)
    second = op_outputs(x, h, weight, bias, norm_dims, grad_y, triton=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_inductor():
    x, h, weight, bias, grad_y = make_inputs((512, 1024), 1024, 2, torch.bfloat16)

    def fn(x, h, weight, bias):
        return skip_norm(x, h, weight, bias, 1.0, 1e-5, "token").float().sin()

    leaves = [t.detach().requires_grad_() for t in (x, h, weight, bias)]
    y = torch.compile(fn, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_y.float())
    leaves_ref = [t.detach().requires_grad_() for t in (x, h, weight, bias)]
    y_ref = fn(*leaves_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, grad_y.float())
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def tiny_marian():
    config = rskip.RSkipMarianConfig(
        vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=32,
        pad_token_id=63, decoder_start_token_id=63, dropout=0.1, skip_variant="rskip_ln", skip_recursions=2)
    torch.manual_seed(0)
    model = rskip.RSkipMarianMTModel(config).cuda().train()
    generator = torch.Generator().manual_seed(1)
    batches = [dict(input_ids=torch.randint(0, 62, (8, 12), generator=generator).cuda(),
                    labels=torch.randint(0, 62, (8, 12), generator=generator).cuda()) for _ in range(4)]
    return model, lambda m, i: m(**batches[i]).loss


def tiny_resnet():
    torch.manual_seed(0)
    model = timm.create_model("rskip_resnet18", skip_recursions=2, num_classes=10).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 64, 64, generator=generator).cuda().contiguous(memory_format=torch.channels_last)
              for _ in range(4)]
    labels = [torch.randint(0, 10, (4,), generator=generator).cuda() for _ in range(4)]
    return model, lambda m, i: torch.nn.functional.cross_entropy(m(images[i]), labels[i])


def train(model, loss_fn, steps, optimizer=None, start=0):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, i)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer


@pytest.mark.parametrize("family", [tiny_marian, tiny_resnet], ids=["marian", "resnet"])
def test_three_bf16_training_steps_follow_the_reference_loop(family):
    model, loss_fn = family()
    reference = copy.deepcopy(model)
    torch.manual_seed(2)
    losses, _ = train(model, loss_fn, 3)
    torch.manual_seed(2)
    with rskip.use_fused_skip(False):
        losses_ref, _ = train(reference, loss_fn, 3)
    # bf16 activations in the op (fp32 LayerNorm outputs in the loop): a few parts in a thousand
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), atol=2e-2, rtol=1e-2)


@pytest.fixture
def deterministic_algorithms():
    """cuDNN and attention kernels with atomics would break bit-exactness for reasons outside the op.
    CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts (scripts/gpu_check.sh sets it)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("family", [tiny_marian, tiny_resnet], ids=["marian", "resnet"])
def test_a_resumed_run_is_bit_exact(family, tmp_path, deterministic_algorithms):
    """2 + 2 steps through a checkpoint (weights, optimizer, RNG) equal 4 uninterrupted steps, bit for bit."""
    model, loss_fn = family()
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    train(model, loss_fn, 4)
    uninterrupted = {name: p.detach().clone() for name, p in model.state_dict().items()}

    model.load_state_dict(start)
    torch.manual_seed(3)
    _, optimizer = train(model, loss_fn, 2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "cpu_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state()}, tmp_path / "checkpoint.pt")
    resumed, _ = family()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["cpu_rng"])
    torch.cuda.set_rng_state(checkpoint["cuda_rng"])
    train(resumed, loss_fn, 2, optimizer, start=2)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, uninterrupted[name]), name


def test_the_default_cuda_path_is_pytorchs():
    """Without the switch, CUDA tensors run PyTorch's native norm kernels (the proven path)."""
    x, h, weight, bias, grad_y = make_inputs((64, 256), 256, 2, torch.bfloat16)
    with rskip.use_triton(False):
        assert not rskip.fused_skip._use_triton(x, h, weight, "token")
    assert rskip.fused_skip._use_triton(x, h, weight, "token")
