"""`hfx demo` rows for the optimizers: continue the warm start's SFT for ``ctx.steps`` steps with each optimizer and
report the task metric (a small optimizer comparison on the toy task)."""

from __future__ import annotations

from functools import partial

# Low-rank methods on the toy model (hidden 128): a quarter of the width, refreshed a few times within the run.
DEMO_ARGS = {"galore2": {"rank": 32, "update_proj_gap": 10}, "fira": {"rank": 32, "update_proj_gap": 10},
             "frugal": {"update_gap": 10}}


def continue_sft(name: str, ctx) -> dict:
    from hfx.demo import continue_sft

    return continue_sft(ctx, hfx_optimizer=name, hfx_optimizer_args=DEMO_ARGS.get(name, {}))


mars, galore2, fira, frugal, eco = (partial(continue_sft, n) for n in ("mars", "galore2", "fira", "frugal", "eco"))
