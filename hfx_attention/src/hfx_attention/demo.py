"""``hfx demo`` rows for the trainable attention modules: continue the warm start's SFT for ``ctx.steps`` steps with
each module applied through ``hfx_attention=`` and report the task metric. GRAPE, TPA and CASTLE start as exact
grafts of the warm start (so the row shows fine-tuning from an unchanged model); softplus attention replaces softmax,
so its row shows how far a few steps bring a model trained with softmax."""

from __future__ import annotations

from functools import partial

DEMO_ARGS = {
    "grape": {"variant": "fox"},  # forgetting gates grafted at strength 0, learned during the run
    "tpa": {"init": "gqa"},  # the exact conversion of the warm start's GQA attention
    "castle": {},
    "softplus": {"trained": True},  # it is being trained: no untrained-inference warning
}


def continue_sft(name: str, ctx) -> dict:
    from hfx.demo import continue_sft

    return continue_sft(ctx, hfx_attention=name, hfx_attention_args=DEMO_ARGS[name])


grape, tpa, castle, softplus = (partial(continue_sft, n) for n in DEMO_ARGS)
