"""Entry point of hfx-attention (group ``hfx``): declares the attention modules and owns the ``[attention]`` table.

Imports only hfx: discovery must not import torch or transformers. Each method is one module with an attention
function registered in transformers' ``AttentionInterface`` *and* ``AttentionMaskInterface`` as ``hfx_<name>``, and
an ``apply(model, **opts)`` where it needs new parameters, a cache policy or the rotary bypass."""

from hfx import hookimpl

REQUIRES = {"transformers": ">=4.56.2", "torch": ">=2.4"}

PAPERS = {
    "sinks": ("Efficient Streaming Language Models with Attention Sinks", "2309.17453"),
    "h2o": ("H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", "2306.14048"),
    "grape": ("Group Representational Position Encoding", "2512.07805"),
    "tpa": ("Tensor Product Attention Is All You Need", "2501.06425"),
    "castle": ("Causal Attention with Lookahead Keys", "2509.07301"),
    "softplus": ("Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
                 "2501.13428"),
}


# name -> (attention function registered as "hfx_<name>" with the SDPA mask, hfx demo row or not, description); each
# module also has `apply(model, **opts)`.
METHODS = {
    "sinks": ("sinks_attention", False, "StreamingLLM attention sinks: a sink + window KV cache with optional "
              "position re-indexing (num_sink_tokens=4, window=1020, positions='cache')"),
    "h2o": ("h2o_attention", False, "H2O heavy-hitter KV-cache eviction by accumulated attention mass "
            "(heavy=512, recent=512, positions='original')"),
    "grape": ("grape_attention", True, "GRAPE position encodings as exact grafts: RoPE, PI, learned/contextual "
              "frequencies (GRAPE-M); ALiBi, FoX, key-gated biases (GRAPE-A)"),
    "tpa": ("tpa_attention", True, "Tensor Product Attention: contextual rank-R factors of Q/K/V, factor KV "
            "cache (init='random' | exact 'gqa' conversion | lossy 'svd')"),
    "castle": ("castle_attention", True, "CASTLE lookahead keys grafted onto the attention (exact at init: "
               "W_vU = 0), parallel O(T^2 d) form and recurrent CastleLayer cache"),
    "softplus": ("softplus_attention_forward", True, "Softplus attention with length scaling (LSSA) and "
                 "re-weighting (LSSAR); needs (re)training of softmax-pretrained models"),
}


@hookimpl
def hfx_register(registry):
    registry.options("attention", {})
    for name, (function, demo, description) in METHODS.items():
        module = f"hfx_attention.{name}"
        registry.attention(name, f"{module}:{function}", apply=f"{module}:apply",
                           demo=f"hfx_attention.demo:{name}" if demo else None, description=description,
                           paper=PAPERS[name], requires=REQUIRES)
