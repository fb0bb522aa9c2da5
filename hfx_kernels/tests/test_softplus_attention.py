"""Softplus attention (LSSA / LSSAR): the Triton kernels (interpreter on CPU, 16-wide tiles so that small shapes cross
block boundaries) against the torch reference, forward and backward, on odd shapes (T not a multiple of the tile,
Tq < Tk, GQA, D padded to a power of two, a left-padded mask with rows that see no key); the reference against plain
float64 formulas written out here (softplus(s)/sum, log N_i, relu(N A - o)^p); the rows of A read back through an
identity value matrix."""

import math

import pytest
import torch

from hfx_kernels import softplus_attention as K
from hfx_kernels.testing import TritonKernelConformance, kernel_device, triton_runnable

pytestmark = pytest.mark.floor


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(K, "BLOCK_M", 16)
    monkeypatch.setattr(K, "BLOCK_N", 16)


@pytest.fixture
def triton_backend(monkeypatch):
    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", "triton")


def padded_causal(b, tq, tk, device, pads=(0, 3)):
    """Bottom-right causal & left padding: batch row r hides its first pads[r] keys, so its first query rows (before
    the padding ends) see no key at all."""
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq).expand(b, 1, tq, tk).clone()
    for r in range(b):
        mask[r, :, :, : pads[r % len(pads)]] = False
    return mask


def qkv(b, h, hkv, tq, tk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g, device=device).to(dtype),
            torch.randn(b, hkv, tk, d, generator=g, device=device).to(dtype),
            torch.randn(b, hkv, tk, d, generator=g, device=device).to(dtype))


# --------------------------------------------------------------------------------------------------
# Triton == reference (forward and backward)
# --------------------------------------------------------------------------------------------------


class TestLSSA(TritonKernelConformance):
    # (B, H, Hkv, Tq, Tk, D): GQA 2:1 and 4:1, Tq < Tk, T not a multiple of 16, D = 24 padded to 32
    shapes = ((2, 4, 2, 19, 19, 24), (1, 4, 1, 5, 21, 16))
    dtypes = (torch.float32, torch.bfloat16)
    tolerances = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}
    check_backward = True
    power = 1.0

    def make_inputs(self, shape, dtype, device):
        b, h, hkv, tq, tk, d = shape
        return (*qkv(b, h, hkv, tq, tk, d, dtype, device), padded_causal(b, tq, tk, device))

    def reference(self, q, k, v, mask):
        return K.softplus_attention_reference(q, k, v, mask, power=self.power)

    def kernel(self, q, k, v, mask):
        return K.softplus_attention(q, k, v, mask, power=self.power)


class TestLSSAR(TestLSSA):
    """The two-pass re-weighting, p = 15 (the paper's long-context setting)."""

    dtypes = (torch.float32,)
    tolerances = {torch.float32: (1e-4, 1e-4)}
    power = 15.0


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize(("power", "length_scale", "train_length", "dtype"), [
    (1.0, True, None, torch.float16),
    (3.0, True, 1024, torch.float32),
    (1.0, False, None, torch.float32),
])
def test_causal_none_mask_forward_backward(power, length_scale, train_length, dtype):
    """mask=None is bottom-right causal with Tq < Tk (chunked prefill): kernel == reference, values and gradients."""
    dev = kernel_device()
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 7, 33, 16, dtype, dev, seed=1))
    kw = dict(power=power, length_scale=length_scale, train_length=train_length)
    out = K.softplus_attention(q, k, v, **kw)
    want = K.softplus_attention_reference(q, k, v, K._causal(7, 33, dev)[None, None], **kw)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol * 5, atol=tol * 5, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("power", [1.0, 15.0])
def test_gqa_equals_repeated_heads(power):
    """GQA without repeating k/v == MHA on repeated k/v; dk/dv of the group == the sum over its repeated heads."""
    dev = kernel_device()
    q, k, v = qkv(2, 4, 2, 9, 17, 16, device=dev, seed=2)
    mask = padded_causal(2, 9, 17, dev, pads=(2, 0))
    k1, v1 = k.clone().requires_grad_(), v.clone().requires_grad_()
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = K.softplus_attention(q, k1, v1, mask, power=power)
    rep = K.softplus_attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), mask, power=power)
    torch.testing.assert_close(out, rep, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (k1, v1), grad), torch.autograd.grad(rep, (k2, v2), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("triton_backend")
def test_per_head_mask_and_float_mask():
    """A (B, H, Tq, Tk) mask reaches each head; a 0/-inf float mask == its bool mask; D = 128."""
    dev = kernel_device()
    q, k, v = qkv(1, 2, 1, 5, 18, 128, device=dev, seed=3)
    mask = torch.rand(1, 2, 5, 18, generator=torch.Generator(device=dev).manual_seed(0), device=dev) > 0.4
    mask[0, 1, 2] = False  # one row of head 1 sees nothing
    out = K.softplus_attention(q, k, v, mask, power=3.0)
    torch.testing.assert_close(out, K.softplus_attention_reference(q, k, v, mask, power=3.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, 1, 2], torch.zeros_like(out[0, 1, 2]))
    additive = torch.zeros(mask.shape, device=dev).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(K.softplus_attention(q, k, v, additive, power=3.0), out, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The reference against plain formulas (float64)
# --------------------------------------------------------------------------------------------------


def weights_by_hand(q, k, mask, *, scale, length_scale, train_length=None, power=1.0):
    """A (B, H, Tq, Tk) in float64, entry by entry in Python: softplus = log1p(exp(x)), lam = log N_i, the re-weighting
    relu(N_i A_ij - o_i)^p / sum with o_i = 0 for N_i <= 3."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    m = mask.expand(b, h, tq, tk)
    out = torch.zeros(b, h, tq, tk, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(tq):
                seen = [j for j in range(tk) if m[bi, hi, i, j]]
                if not seen:
                    continue
                n = len(seen)
                lam = (math.log(n) / (math.log(train_length) if train_length else 1.0)) if length_scale else 1.0
                f = {j: math.log1p(math.exp(lam * scale * float(q[bi, hi, i] @ k[bi, kh, j]))) for j in seen}
                z = math.fsum(f.values())
                a = {j: f[j] / z for j in seen}
                if power != 1.0:
                    o = 0.0 if n <= 3 else 1.0
                    w = {j: max(n * a[j] - o, 0.0) ** power for j in seen}
                    total = math.fsum(w.values())
                    a = {j: (w[j] / total if total > 0 else 0.0) for j in seen}
                for j, x in a.items():
                    out[bi, hi, i, j] = x
    return out


def weights_of(fn, q, k, mask, **kw):
    """The attention matrix a kernel applies, read back with v = identity (D = Tk): out = A @ I = A."""
    b, hkv, tk, _ = k.shape
    eye = torch.eye(tk, dtype=q.dtype, device=q.device).expand(b, hkv, tk, tk)
    pad = torch.zeros(*q.shape[:3], tk - q.shape[-1], dtype=q.dtype, device=q.device)
    kpad = torch.zeros(b, hkv, tk, tk - k.shape[-1], dtype=q.dtype, device=q.device)
    return fn(torch.cat([q, pad], -1), torch.cat([k, kpad], -1), eye, mask, **kw)


CASES = [
    dict(length_scale=False, power=1.0),  # plain softplus(s) / sum
    dict(length_scale=True, power=1.0),  # LSSA: lam = log N_i
    dict(length_scale=True, power=1.0, train_length=64),
    dict(length_scale=True, power=3.0),  # LSSAR
    dict(length_scale=True, power=15.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_equals_plain_formula(case):
    q, k, _ = qkv(2, 4, 2, 6, 11, 8, dtype=torch.float64, seed=4)
    mask = padded_causal(2, 6, 11, "cpu", pads=(0, 7))  # batch row 1: its first two query rows see nothing
    want = weights_by_hand(q, k, mask, scale=0.7, **case)
    got = weights_of(K.softplus_attention_reference, q, k, mask, scale=0.7, **case)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert (got >= 0).all()
    assert torch.equal(got.masked_fill(mask, 0.0), torch.zeros_like(got)), "a masked entry is not exactly 0"
    rows = got.sum(-1)
    seen = mask.any(-1).expand_as(rows)
    torch.testing.assert_close(rows[seen], torch.ones_like(rows[seen]), rtol=0, atol=1e-12)
    assert torch.equal(rows[~seen], torch.zeros_like(rows[~seen])) and (~seen).any()


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("power", [1.0, 15.0])
def test_kernel_weights_are_a_distribution(power):
    """The Triton kernel's own A (float32): >= 0, masked entries exactly 0, rows sum to 1 (0 for rows with no key)."""
    dev = kernel_device()
    q, k, _ = qkv(2, 2, 1, 6, 21, 8, device=dev, seed=5)
    mask = padded_causal(2, 6, 21, dev, pads=(0, 17))
    got = weights_of(K.softplus_attention, q, k, mask, power=power)
    assert (got >= 0).all()
    assert torch.equal(got.masked_fill(mask, 0.0), torch.zeros_like(got))
    rows, seen = got.sum(-1), mask.any(-1).expand(2, 2, 6)
    torch.testing.assert_close(rows[seen], torch.ones_like(rows[seen]), rtol=0, atol=1e-5)
    assert torch.equal(rows[~seen], torch.zeros_like(rows[~seen])) and (~seen).any()


def test_reweighting_sharpens():
    """LSSAR keeps only weights above the uniform 1/N_i (rows with N_i > 3) and raises the top weight."""
    q, k, _ = qkv(1, 1, 1, 12, 12, 8, dtype=torch.float64, seed=6)
    lssa = weights_of(K.softplus_attention_reference, q, k, None, scale=1.0)
    lssar = weights_of(K.softplus_attention_reference, q, k, None, scale=1.0, power=15.0)
    n = torch.arange(1, 13, dtype=torch.float64)[:, None]
    below = (lssa[0, 0] <= 1 / n) & (n > 3)
    assert below.any() and torch.equal(lssar[0, 0][below], torch.zeros_like(lssar[0, 0][below]))
    assert (lssar.amax(-1)[0, 0, 3:] > lssa.amax(-1)[0, 0, 3:]).all()


def test_reference_gradcheck():
    """The reference's autograd is well defined (float64 gradcheck), also through the re-weighting."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 4, 6, 3, dtype=torch.float64, seed=7))
    mask = padded_causal(1, 4, 6, "cpu", pads=(1,))
    for power in (1.0, 3.0):
        assert torch.autograd.gradcheck(lambda a, b, c, p=power: K.softplus_attention_reference(a, b, c, mask, power=p),
                                        (q, k, v))


# --------------------------------------------------------------------------------------------------
# Dispatch and errors
# --------------------------------------------------------------------------------------------------


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "torch")
    q, k, v = qkv(1, 2, 2, 3, 5, 4)
    assert torch.equal(K.softplus_attention(q, k, v, power=3.0), K.softplus_attention_reference(q, k, v, power=3.0))


@pytest.mark.parametrize(("shapes", "kwargs", "message"), [
    (((1, 3, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), {}, "multiple of the KV heads"),
    (((1, 2, 2, 4), (1, 2, 2, 8), (1, 2, 2, 8)), {}, "head_dim must match"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 2, 3, 4)), {}, "must match"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), {"power": 0.5}, "power must be 1"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), {"train_length": 1}, "train_length"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), {"mask": torch.full((2, 2), 0.5)}, "additive bias"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), {"mask": torch.ones(3, 3, dtype=torch.bool)}, "does not broadcast"),
])
def test_bad_input(shapes, kwargs, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        K.softplus_attention(q, k, v, **kwargs)
