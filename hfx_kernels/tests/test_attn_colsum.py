"""attn_colsum (H2O's attention mass per key): the Triton two-pass kernel (interpreter on CPU, 16-wide tiles) against
the torch reference on odd shapes, GQA, Tq < Tk, left-padded and per-head masks; the reference against softmax
probabilities computed row by row here and summed over rows and group heads; the mass totals."""

import math

import pytest
import torch

from hfx_kernels import attn_colsum as K
from hfx_kernels.testing import TritonKernelConformance, kernel_device, triton_runnable

pytestmark = pytest.mark.floor


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(K, "BLOCK_M", 16)
    monkeypatch.setattr(K, "BLOCK_N", 16)


def padded_causal(b, tq, tk, device, pads=(0, 3)):
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq).expand(b, 1, tq, tk).clone()
    for r in range(b):
        mask[r, :, :, : pads[r % len(pads)]] = False
    return mask


class TestColsum(TritonKernelConformance):
    # (B, H, Hkv, Tq, Tk, D)
    shapes = ((2, 4, 2, 19, 19, 24), (1, 3, 1, 5, 37, 16), (2, 2, 2, 1, 21, 64))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tolerances = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

    def make_inputs(self, shape, dtype, device):
        b, h, hkv, tq, tk, d = shape
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, tq, d, generator=g, device=device).to(dtype)
        k = torch.randn(b, hkv, tk, d, generator=g, device=device).to(dtype)
        return q, k, padded_causal(b, tq, tk, device)

    def reference(self, q, k, mask):
        return K.attn_colsum_reference(q, k, mask)

    def kernel(self, q, k, mask):
        return K.attn_colsum(q, k, mask)


def colsum_by_hand(q, k, mask, scale):
    """Row by row: softmax over the visible keys only (float64), scattered into the key positions, then summed over
    rows and over the query heads of each KV group."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    m = mask.expand(b, h, tq, tk)
    out = torch.zeros(b, hkv, tk, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(tq):
                seen = m[bi, hi, i].nonzero().flatten()
                if len(seen):
                    p = torch.softmax(scale * (k[bi, kh, seen] @ q[bi, hi, i]), dim=0)
                    out[bi, kh, seen] += p
    return out


@pytest.mark.parametrize("per_head", [False, True])
def test_reference_equals_softmax_by_hand(per_head):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    mask = padded_causal(2, 6, 11, "cpu", pads=(0, 7))  # batch row 1: two query rows see nothing
    if per_head:
        mask = mask.expand(2, 4, 6, 11) & (torch.rand(2, 4, 6, 11, generator=g) > 0.3)
    got = K.attn_colsum_reference(q, k, mask, scale=0.6)
    torch.testing.assert_close(got, colsum_by_hand(q, k, mask, 0.6), rtol=1e-12, atol=1e-12)
    # each query row with a visible key hands out mass 1 in total
    rows_seen = mask.expand(2, 4, 6, 11).any(-1).sum((1, 2)).to(torch.float64)
    torch.testing.assert_close(got.sum((1, 2)), rows_seen, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "float", "per_head"])
def test_kernel_against_by_hand(mask_kind, monkeypatch):
    """The Triton kernel (float32) against the by-hand float64 column sums: None = bottom-right causal with Tq < Tk,
    a 0/-inf float mask, a per-head bool mask."""
    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", "triton")
    dev = kernel_device()
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(1, 4, 7, 16, generator=g, device=dev)
    k = torch.randn(1, 2, 23, 16, generator=g, device=dev)
    causal = torch.ones(7, 23, dtype=torch.bool, device=dev).tril(16)[None, None]
    if mask_kind == "none":
        mask, plain = None, causal
    elif mask_kind == "float":
        plain = causal & (torch.arange(23, device=dev) >= 4)
        mask = torch.zeros(plain.shape, device=dev).masked_fill(~plain, torch.finfo(torch.float32).min)
    else:
        plain = causal & (torch.rand(1, 4, 7, 23, generator=g, device=dev) > 0.5)
        mask = plain
    want = colsum_by_hand(q.double().cpu(), k.double().cpu(), plain.cpu(), 1 / math.sqrt(16))
    torch.testing.assert_close(K.attn_colsum(q, k, mask).double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_torch_backend_is_the_reference_and_no_grad(monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "torch")
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = torch.randn(1, 1, 5, 4)
    out = K.attn_colsum(q, k)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 5) and not out.requires_grad
    assert torch.equal(out, K.attn_colsum_reference(q, k).detach())


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        K.attn_colsum(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="additive bias"):
        K.attn_colsum(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), torch.full((2, 2), -1.0))
