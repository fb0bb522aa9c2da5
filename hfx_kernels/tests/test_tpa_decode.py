"""tpa_decode (TPA attention on the factor cache): the Triton kernel (interpreter on CPU, 16-wide key tiles) against
the torch reference on odd shapes and ranks, decode (Tq = 1) and short chunks (Tq < Tk), padded masks; the reference
against plain attention: GQA as the exact non-contextual TPA (Rk = number of KV groups, indicator head factors), and
random factors against SDPA on K/V materialised here."""

import math

import pytest
import torch
import torch.nn.functional as F

from hfx_kernels import tpa_decode as K
from hfx_kernels.testing import TritonKernelConformance, kernel_device, triton_runnable

pytestmark = pytest.mark.floor


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(K, "BLOCK_N", 16)


def factors(b, h, tk, d, rk, rv, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, device=device).to(dtype)
                 for shape in ((b, tk, h, rk), (b, tk, rk, d), (b, tk, h, rv), (b, tk, rv, d)))


class TestTPADecode(TritonKernelConformance):
    # (B, H, Tq, Tk, D, Rk, Rv): decode over 37 keys (3 tiles, ragged), a 3-row chunk with Rk = 1, H * Tq > 16 rows
    shapes = ((1, 4, 1, 37, 16, 2, 2), (2, 3, 3, 21, 24, 1, 3), (1, 6, 3, 9, 64, 3, 1))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tolerances = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

    def make_inputs(self, shape, dtype, device):
        b, h, tq, tk, d, rk, rv = shape
        q = torch.randn(b, h, tq, d, device=device).to(dtype)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq).expand(b, 1, tq, tk).clone()
        mask[-1, :, :, :5] = False  # left padding of the last batch row
        return (q, *factors(b, h, tk, d, rk, rv, dtype, device), mask)

    def reference(self, *inputs):
        return K.tpa_decode_reference(*inputs)

    def kernel(self, *inputs):
        return K.tpa_decode(*inputs)


def materialise_by_hand(a, b):
    """(B, T, H, R) x (B, T, R, D) -> (B, H, T, D): explicit broadcast sum, not the module's einsum."""
    return (a[..., None] * b[:, :, None]).sum(3).div(a.shape[-1]).permute(0, 2, 1, 3)


def gqa_as_tpa(k, v):
    """A GQA cache (B, Hkv, T, D) with g query heads per KV head as non-contextual TPA: R = Hkv, b_r = the group's key,
    a[t, h, r] = R * [h // g == r] (the 1/R of TPA cancels)."""
    b, hkv, t, _ = k.shape
    h = 2 * hkv
    a = torch.zeros(b, t, h, hkv, dtype=k.dtype)
    for head in range(h):
        a[:, :, head, head // 2] = hkv
    return a, k.transpose(1, 2).contiguous(), a.clone(), v.transpose(1, 2).contiguous()


def test_gqa_is_exact_special_case():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(3, 10, dtype=torch.bool).tril(7).expand(2, 1, 3, 10).clone()
    mask[1, :, :, :4] = False
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    got = K.tpa_decode_reference(q, *gqa_as_tpa(k, v), mask)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_factors_equal_sdpa_on_materialised_kv(backend, monkeypatch):
    if backend == "triton":
        ok, why = triton_runnable()
        if not ok:
            pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", backend)
    dev = kernel_device() if backend == "triton" else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    q = torch.randn(2, 4, 2, 16, generator=torch.Generator(device=dev).manual_seed(3), device=dev, dtype=dtype)
    a_k, b_k, a_v, b_v = factors(2, 4, 19, 16, 2, 3, dtype, dev, seed=4)
    keys, values = materialise_by_hand(a_k, b_k), materialise_by_hand(a_v, b_v)
    # None = bottom-right causal: query i of the 2-row chunk sees keys <= 17 + i
    causal = torch.ones(2, 19, dtype=torch.bool, device=dev).tril(17)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=0.3)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(K.tpa_decode(q, a_k, b_k, a_v, b_v, scale=0.3), want, rtol=tol, atol=tol)
    # decode of the last row alone sees every key
    torch.testing.assert_close(K.tpa_decode(q[:, :, -1:], a_k, b_k, a_v, b_v, scale=0.3), want[:, :, -1:],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_with_no_visible_key_is_zero(backend, monkeypatch):
    if backend == "triton":
        ok, why = triton_runnable()
        if not ok:
            pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", backend)
    dev = kernel_device() if backend == "triton" else "cpu"
    q = torch.randn(1, 2, 1, 16, device=dev)
    fs = factors(1, 2, 5, 16, 1, 1, device=dev)
    mask = torch.tensor([[[[False] * 5]], [[[True] * 5]]], device=dev).reshape(1, 2, 1, 5)
    out = K.tpa_decode(q, *fs, mask)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and out[0, 1].abs().sum() > 0
    assert math.isfinite(float(out.sum()))


def test_bad_input():
    q = torch.zeros(1, 2, 1, 8)
    a, b = torch.zeros(1, 5, 2, 2), torch.zeros(1, 5, 2, 8)
    with pytest.raises(ValueError, match="a_k must be"):
        K.tpa_decode(q, torch.zeros(1, 5, 3, 2), b, a, b)
    with pytest.raises(ValueError, match="b_v"):
        K.tpa_decode(q, a, b, a, torch.zeros(1, 5, 2, 4))



def packed_views(b, h, tk, d, rk, rv, dtype, device, seed=5):
    """The factors as hfx_attention.tpa caches them: one packed (B, 1, Tk, R·d + H·R) tensor per side, unpacked into
    strided views (b first, then a, on the last axis: ``tpa.unpack_factors``' slicing), none of them contiguous."""
    g = torch.Generator(device=device).manual_seed(seed)
    views = []
    for rank in (rk, rv):
        packed = torch.randn(b, 1, tk, rank * d + h * rank, generator=g, device=device).to(dtype)
        fb, fa = packed[:, 0].split((rank * d, h * rank), dim=-1)
        views += [fa.unflatten(-1, (h, rank)), fb.unflatten(-1, (rank, d))]
    return tuple(views)


class LaunchRecorder:
    """Stands in for the Triton kernel: records the arguments of each launch, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_of_the_packed_cache_are_read_in_place(dtype, monkeypatch):
    """The kernel gets the cache's own memory (no copy of the factor cache per step) and matches the reference on the
    strided views, for decode and a padded chunk; a stride-0 (broadcast over tokens) head factor too."""
    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", "triton")
    recorder = LaunchRecorder(K._tpa_decode_kernel)
    monkeypatch.setattr(K, "_tpa_decode_kernel", recorder)
    dev = kernel_device()
    b, h, tk, d, rk, rv = 2, 3, 37, 16, 2, 3
    a_k, b_k, a_v, b_v = packed_views(b, h, tk, d, rk, rv, dtype, dev)
    assert not any(t.is_contiguous() for t in (a_k, b_k, a_v, b_v))
    broadcast = a_v[:, :1].expand(b, tk, h, rv)  # a constant head factor: stride 0 over tokens
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for tq, factors in ((1, (a_k, b_k, a_v, b_v)), (3, (a_k, b_k, a_v, b_v)), (1, (a_k, b_k, broadcast, b_v))):
        q = torch.randn(b, h, tq, d, device=dev).to(dtype)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=dev).tril(tk - tq).expand(b, 1, tq, tk).clone()
        mask[-1, :, :, :4] = False
        got = K.tpa_decode(q, *factors, mask)
        passed = recorder.launches[-1][1:5]
        assert [t.data_ptr() for t in passed] == [t.data_ptr() for t in factors]
        assert [t.stride() for t in passed] == [t.stride() for t in factors]
        want = K.tpa_decode_reference(q, *(t.contiguous() for t in factors), mask)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
