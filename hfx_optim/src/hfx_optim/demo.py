"""`hfx demo` rows for the optimizers: continue the warm start's SFT for ``ctx.steps`` steps with each optimizer and
report the task metric (a small optimizer comparison on the toy task)."""

from __future__ import annotations

from functools import partial

# Low-rank methods on the toy model (hidden 128): a quarter of the width, refreshed a few times within the run.
DEMO_ARGS = {"galore2": {"rank": 32, "update_proj_gap": 10}, "fira": {"rank": 32, "update_proj_gap": 10},
             "frugal": {"update_gap": 10}}


def continue_sft(name: str, ctx) -> dict:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import hfx

    config = hfx.extend(SFTConfig)
    args = config(output_dir=str(ctx.output_dir), max_steps=ctx.steps, learning_rate=1e-3, seed=ctx.seed,
                  per_device_train_batch_size=64, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                  logging_steps=1, hfx_optimizer=name, hfx_optimizer_args=DEMO_ARGS.get(name, {}),
                  **{hfx.checkpointing_field(config): False})
    tok = AutoTokenizer.from_pretrained(ctx.model_path)
    trainer = hfx.extend(SFTTrainer)(model=str(ctx.model_path), args=args, processing_class=tok,
                                     train_dataset=ctx.task.dataset("train", format=ctx.task.sft_format))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"metric_after": ctx.task.evaluate(trainer.model.eval(), tok), "losses": losses}


mars, galore2, fira, frugal, eco = (partial(continue_sft, n) for n in ("mars", "galore2", "fira", "frugal", "eco"))
