"""Our models against the official Hiera and timm on each device, in fp32 and under bf16 autocast.

The `cuda` cases are skipped without a GPU; tools/gpu_check.sh runs them (`pytest -m cuda`).
Tolerances: fp32 1e-4 absolute as on the CPU (TF32 off). bf16: the error against the fp32 output, relative to
its norm, is at most 3e-2 for features and loss (observed about 1e-2 on the CPU, like the official model's own);
gradients keep a cosine similarity above 0.99 with the fp32 ones.
"""

import dataclasses

import hiera as official
import pytest
import timm
import torch
import torch.nn.functional as F
from hiera.hiera_mae import MaskedAutoencoderHiera

from models import create_model, load_pretrained
from models.hiera import attention

DEVICES = pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs CUDA")]),
])
BF16_REL = 3e-2


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32 on Ampere and later too (cuDNN convolutions default to TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def bf16(device: str) -> torch.autocast:
    return torch.autocast(device, dtype=torch.bfloat16)


@DEVICES
def test_hiera_matches_official_and_timm(device):
    torch.manual_seed(0)
    timm_model = timm.create_model("hiera_tiny_224", pretrained=False).eval().to(device)
    torch.nn.init.normal_(timm_model.head.fc.weight, std=0.02)  # timm starts it at zero: nothing to compare
    ours = create_model("hiera_tiny_224").eval().to(device)
    load_pretrained(ours, timm_model.state_dict())
    reference = official.Hiera(**dataclasses.asdict(ours.config)).eval().to(device)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        _, stages = reference(x, return_intermediates=True)
        for got, want in zip(ours.forward_intermediates(x), stages):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert relative_error(ours(x), timm_model(x)) < 1e-4  # logits
        with bf16(device):
            _, stages_bf16 = reference(x, return_intermediates=True)
            ours_bf16 = ours.forward_intermediates(x)
    for got, theirs, want in zip(ours_bf16, stages_bf16, stages):
        assert 1e-4 < relative_error(got, want) < BF16_REL  # it did run in bf16, and stays close
        assert relative_error(got, want) < 2 * relative_error(theirs, want) + 1e-3  # no worse than theirs


@DEVICES
def test_mae_training_step_matches_official(device):
    """Loss of the same step as the official MAE, in fp32 and bf16, and bf16 gradients close to fp32 ones
    (on the CPU, bf16 training attention runs as matmuls + softmax: models.hiera.attention)."""
    torch.manual_seed(0)
    ours = create_model("mae_hiera_tiny_224", input_size=(128, 128), decoder_depth=2).to(device)
    reference = MaskedAutoencoderHiera(**dataclasses.asdict(ours.encoder.config), decoder_depth=2,
                                       decoder_num_heads=ours.config.decoder_num_heads).to(device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(4, 3, 128, 128, device=device)
    mask = reference.get_random_mask(x, ours.mask_ratio)
    loss = ours(x, mask=mask)["loss"]
    torch.testing.assert_close(loss, reference(x, mask=mask)[0], rtol=1e-5, atol=0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    with bf16(device):
        loss_bf16 = ours(x, mask=mask)["loss"]
        theirs_bf16 = reference(x, mask=mask)[0]
    assert relative_error(loss_bf16, loss) < BF16_REL and relative_error(theirs_bf16, loss) < BF16_REL
    loss_bf16.backward()
    for n, p in ours.named_parameters():
        assert F.cosine_similarity(p.grad.flatten(), grads[n].flatten(), dim=0) > 0.99, n


@DEVICES
@pytest.mark.parametrize("bias", [False, True])
def test_attention_equals_sdpa(device, bias):
    """Both paths of `attention` (fused SDPA; matmuls + softmax for bf16 training on the CPU) against fp32 SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, device=device) for n in (5, 7, 7))
    mask = torch.randn(3, 1, 5, 7, device=device) if bias else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    got = attention(*leaves, mask)
    assert got.dtype == torch.bfloat16 and relative_error(got, want) < 1e-2
    got.float().square().sum().backward()
    fp32_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*fp32_leaves, attn_mask=mask).square().sum().backward()
    for leaf, ref in zip(leaves, fp32_leaves):
        assert relative_error(leaf.grad, ref.grad) < 2e-2
