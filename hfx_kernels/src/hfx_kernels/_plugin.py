"""Entry point of hfx-kernels (group ``hfx``): declares the kernels and owns the ``[kernels]`` table.

Imports only hfx: discovery must not import torch or Triton. Each kernel is one module with its torch reference."""

from hfx import hookimpl

FLOATS = ("float32", "bfloat16", "float16", "float64")

KERNELS = {
    # name: (target, reference, what it fuses, parameter dtypes)
    "adamw_step": ("hfx_kernels.adamw:adamw_step", "hfx_kernels.adamw:adamw_step_reference",
                   "multi-tensor AdamW: moments, bias correction, decoupled decay (before/after), clip coefficient",
                   FLOATS),
    "mars_adamw_step": ("hfx_kernels.mars:mars_adamw_step", "hfx_kernels.mars:mars_step_reference",
                        "MARS in two passes: corrected gradient and its norm (deterministic chunk partials), then clip, "
                        "AdamW update and the copy of g into g_prev", FLOATS),
    "mars_lion_step": ("hfx_kernels.mars:mars_lion_step", "hfx_kernels.mars:mars_step_reference",
                       "MARS-Lion in two passes: corrected gradient and its norm, then clip, momentum, sign update",
                       FLOATS),
    "sign_sgd_step": ("hfx_kernels.sign_sgd:sign_sgd_step", "hfx_kernels.sign_sgd:sign_sgd_reference",
                      "multi-tensor state-free step (signSGD or SGD) with decoupled decay (FRUGAL)", FLOATS),
    "projection_update": ("hfx_kernels.projection:projection_update",
                          "hfx_kernels.projection:projection_update_reference",
                          "GEMM a@b with the weight update in its epilogue: scale, extra term (Fira's residual), "
                          "decoupled decay before/after (GaLore 2, Fira)", FLOATS),
    "requantize": ("hfx_kernels.quantize:requantize", "hfx_kernels.quantize:requantize_reference",
                   "ECO requantize in one pass: absmax scales (row/block), rounding to the int8/int4/fp8 grid "
                   "(nearest or Philox stochastic), held weight and error-feedback term written together", FLOATS),
    "quantize": ("hfx_kernels.quantize:quantize", "hfx_kernels.quantize:quantize_reference",
                 "absmax scales and codes (int8, int4 packed two per byte, fp8 e4m3), nearest or stochastic", FLOATS),
    "dequantize": ("hfx_kernels.quantize:dequantize", "hfx_kernels.quantize:dequantize_reference",
                   "codes times scales (int4 unpacked in-kernel)", FLOATS),
    "softplus_attention": ("hfx_kernels.softplus_attention:softplus_attention",
                           "hfx_kernels.softplus_attention:softplus_attention_reference",
                           "LSSA/LSSAR forward and backward, flash-style: softplus, per-row log N scale, masks and l1 "
                           "normalisation (plus the two-pass relu(N A - 1)^p re-weighting) without the T x T matrix; "
                           "GQA without repeating k/v", FLOATS),
    "attn_colsum": ("hfx_kernels.attn_colsum:attn_colsum", "hfx_kernels.attn_colsum:attn_colsum_reference",
                    "H2O attention mass per key in two passes (row log-sum-exp, then softmax column sums over rows "
                    "and the group's query heads), no T x T matrix", FLOATS),
    "tpa_decode": ("hfx_kernels.tpa_decode:tpa_decode", "hfx_kernels.tpa_decode:tpa_decode_reference",
                   "TPA attention on the factor cache: q.b_k per rank, head mix by a_k, online softmax, values as "
                   "(p a_v) @ b_v; K and V never materialised", FLOATS),
}


@hookimpl
def hfx_register(registry):
    # `backend`: auto = Triton on CUDA tensors, torch elsewhere; HFX_KERNELS and a trainer's hfx_kernels override it.
    registry.options("kernels", {"backend": "auto"})
    for name, (target, reference, fuses, dtypes) in KERNELS.items():
        registry.kernel(name, target, reference=reference, fuses=fuses, dtypes=dtypes, requires={"torch": ">=2.4"})
