"""``hfx demo``: the main job. Warm-starts the tiny model on a toy task, evaluates it, runs every available method
that ships a demo for a short run, prints a results table and saves a loss plot.

A plugin adds its method by giving a contribution ``demo="pkg.mod:demo"``: a function ``demo(ctx: DemoContext)
-> dict`` that trains from ``ctx.model_path`` for about ``ctx.steps`` steps and returns ``{"metric_after": float,
"losses": [float, ...]}`` (and optionally ``"metric_before"`` when it starts from another model).

    hfx demo                                   # embedded defaults
    hfx demo --methods spin,mars --steps 30    # a subset, longer runs
    hfx demo --config demo.yaml                # the same keys as DEFAULTS
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULTS = {
    "task": "arithmetic",  # an hfx.toy task
    "task_args": {},  # its fields, e.g. {"max_operand": 10}
    "warm_start_steps": None,  # None: the task's default (a model right some of the time)
    "methods": "all",  # "all" = every available contribution with a demo, or a comma-separated list of names
    "steps": 20,  # training steps per method
    "seed": 0,
    "output_dir": "hfx_demo_output",
    "cache_dir": None,  # warm-start cache (default: $HFX_CACHE_DIR or ~/.cache/hfx)
}


@dataclass
class DemoContext:
    """What a method's demo function gets."""

    task: object
    model_path: Path
    steps: int
    seed: int
    output_dir: Path


@dataclass
class DemoRow:
    method: str
    metric: str
    before: float
    after: float
    seconds: float
    peak_mb: float
    losses: list[float] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of: " + ", ".join(DEFAULTS))
    parser.add_argument("--task", help=f"toy task (default {DEFAULTS['task']})")
    parser.add_argument("--task-args", type=json.loads, help='task fields as JSON, e.g. \'{"max_operand": 10}\'')
    parser.add_argument("--warm-start-steps", type=int, help="steps of the warm start (default: the task's)")
    parser.add_argument("--methods", help="comma-separated method names, or 'all' (default), or 'none'")
    parser.add_argument("--steps", type=int, help=f"training steps per method (default {DEFAULTS['steps']})")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir", help=f"where the table and plot go (default {DEFAULTS['output_dir']})")
    parser.add_argument("--cache-dir", help="warm-start cache directory")


def resolve_settings(args: argparse.Namespace) -> dict:
    settings = dict(DEFAULTS)
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"hfx demo: unknown key(s) {unknown} in {args.config}; valid: {sorted(DEFAULTS)}")
        settings.update(loaded)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def demo_contributions(registry, methods) -> list:
    """The contributions to run: every available one with a demo, or those named (an error names the valid ones)."""
    with_demo = [c for c in registry.contributions() if "demo" in c.extras and c.available]
    if methods in ("all", None):
        return with_demo
    if methods in ("none", ""):
        return []
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    by_name = {c.name: c for c in with_demo}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"hfx demo: no available method with a demo named {missing}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]


def untrained_metric(task, model_path: Path, seed: int) -> float:
    """The task metric of a randomly initialised model of the warm start's architecture: the "before" of SFT."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return task.evaluate(model.eval(), AutoTokenizer.from_pretrained(model_path))


def continue_sft(ctx: DemoContext, learning_rate: float = 1e-3, **config) -> dict:
    """The usual demo row: continue the warm start's SFT on the task for ``ctx.steps`` steps with an hfx-extended
    TRL ``SFTTrainer``; ``config`` sets its fields (e.g. ``hfx_optimizer="mars"`` or ``hfx_attention="grape"``).
    Returns the row's ``metric_after`` and ``losses``."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import hfx

    config_cls = hfx.extend(SFTConfig)
    args = config_cls(output_dir=str(ctx.output_dir), max_steps=ctx.steps, learning_rate=learning_rate,
                      seed=ctx.seed, per_device_train_batch_size=64, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1, **{hfx.checkpointing_field(config_cls): False, **config})
    tok = AutoTokenizer.from_pretrained(ctx.model_path)
    trainer = hfx.extend(SFTTrainer)(model=str(ctx.model_path), args=args, processing_class=tok,
                                     train_dataset=ctx.task.dataset("train", format=ctx.task.sft_format))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"metric_after": ctx.task.evaluate(trainer.model.eval(), tok), "losses": losses}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB); on CUDA the table reports allocated GPU memory instead."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> int:
    from .registry import get_registry
    from .toy import get_task, warm_start

    settings = resolve_settings(args)
    out = Path(settings["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    contributions = demo_contributions(get_registry(), settings["methods"])
    task = get_task(settings["task"], **settings["task_args"])
    metric = getattr(task, "metric_name", "accuracy")
    print(f"hfx demo: task={task.name}, methods={[c.name for c in contributions] or 'none available'}", flush=True)

    model_path = warm_start(task, settings["warm_start_steps"], seed=settings["seed"], cache_dir=settings["cache_dir"])
    metrics = json.loads((model_path / "metrics.json").read_text())
    history = json.loads((model_path / "log_history.json").read_text())
    rows = [DemoRow(
        "warm start (SFT)", metric, untrained_metric(task, model_path, settings["seed"]), metrics["eval_accuracy"],
        metrics["train_seconds"], peak_rss_mb(), [h["loss"] for h in history if "loss" in h],
    )]
    print(f"warm start: {model_path} ({metric} {rows[0].after:.3f})", flush=True)

    for c in contributions:
        ctx = DemoContext(task, model_path, settings["steps"], settings["seed"], out / c.name)
        t0 = time.perf_counter()
        result = c.load("demo")(ctx)
        rows.append(DemoRow(
            f"{c.kind} {c.name}", metric, result.get("metric_before", rows[0].after),
            result["metric_after"], time.perf_counter() - t0, peak_rss_mb(), list(result.get("losses", [])),
        ))

    table = format_rows(rows)
    print(table)
    (out / "results.md").write_text(table + "\n")
    plot = save_loss_plot(rows, out / "losses.png")
    print(f"table: {out / 'results.md'}; loss plot: {plot}")
    return 0


def format_rows(rows: list[DemoRow]) -> str:
    from .cli import format_table

    header = ("method", "metric", "before", "after", "time (s)", "peak RSS (MB)")
    body = [(r.method, r.metric, f"{r.before:.3f}", f"{r.after:.3f}", f"{r.seconds:.1f}", f"{r.peak_mb:.0f}")
            for r in rows]
    return format_table(header, body)


def save_loss_plot(rows: list[DemoRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display here, nor in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        ax.plot(range(1, len(row.losses) + 1), row.losses)
        ax.set_title(row.method)
        ax.set_xlabel("logged step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hfx demo")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
