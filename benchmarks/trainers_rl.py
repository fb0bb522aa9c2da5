"""hfx-trainers RL benchmarks (RPG, DRPO), as ratios against TRL's GRPOTrainer measured in the same run. Writes
benchmarks/results/trainers_rl.md and benchmarks/results/trainers_rl_toy.png.

    python benchmarks/trainers_rl.py                        # all parts
    python benchmarks/trainers_rl.py --parts step --quick   # a subset; --quick for a smoke run

Parts:
  step  time per optimizer step and training-phase peak-RSS growth of RPG (differentiable UFKL; REINFORCE RKL; a
        fixed reference) and DRPO vs TRL's GRPOTrainer, all on the same fixed rollouts (generation replaced by one
        prepared batch, so only the loss differs); each trainer in its own subprocess, rounds in alternating order.
        Target: ≤ 1.10× GRPO.
  toy   online RL from the toy warm start (recipe hfx_trainers.rl_demo: same steps, seeds, batch and learning rate
        for every method), eval accuracy before/after and mean completion length, 3 seeds; on the plain arithmetic
        task and on its verbose variant (answers followed by a random-length tail the reward ignores). Targets: RPG's
        accuracy gain ≥ GRPO's; DRPO's mean completion length ≤ 0.7× GRPO's with accuracy within 2 points.

A worker is `python benchmarks/trainers_rl.py --worker NAME ...`; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(key, value)  # before transformers/TRL are imported

import torch  # noqa: E402
from trainers_selfplay import build_model, cpu_name, disturbance_note, rss_kib, tokenizer, undisturbed  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# name -> (trainer key, config overrides)
STEP_TRAINERS = {
    "grpo": ("grpo", {}),
    "rpg": ("rpg", {}),
    "rpg-reinforce-rkl": ("rpg", {"estimator": "reinforce", "kl_type": "rkl"}),
    "rpg-fixed-ref": ("rpg", {"kl_reference": "ref"}),
    "drpo": ("drpo", {}),
}
SIZES = {"full": dict(hidden=512, layers=4, prompts=4, generations=8, prompt_len=64, completion_len=192, warmup=2,
                      steps=8, rounds=3),
         "quick": dict(hidden=128, layers=2, prompts=2, generations=4, prompt_len=16, completion_len=32, warmup=1,
                       steps=2, rounds=1)}


# --------------------------------------------------------------------------------------------------
# Part 1: training step on fixed rollouts
# --------------------------------------------------------------------------------------------------


def rollouts(s: dict, pad_id: int, vocab: int) -> dict[str, torch.Tensor]:
    """One fixed rollout batch: `prompts` groups of `generations` completions, lengths 50-100 % of the width,
    binary rewards with both outcomes in every group, GRPO advantages (group-std scaled) and RPG's (mean baseline)."""
    gen = torch.Generator().manual_seed(0)
    n = s["prompts"] * s["generations"]
    prompt_ids = torch.randint(3, vocab, (s["prompts"], s["prompt_len"]), generator=gen)
    prompt_ids = prompt_ids.repeat_interleave(s["generations"], dim=0)
    width = s["completion_len"]
    lengths = torch.randint(width // 2, width + 1, (n,), generator=gen)
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(3, vocab, (n, width), generator=gen).masked_fill(completion_mask == 0, pad_id)
    rewards = (torch.arange(n) % 2).float()[torch.randperm(n, generator=gen)]
    rewards.view(-1, s["generations"])[:, :2] = torch.tensor([0.0, 1.0])  # both outcomes in every group
    grouped = rewards.view(-1, s["generations"])
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask, "rewards": rewards, "group_ids": torch.arange(n) // s["generations"],
            "advantages": centred, "grpo_advantages": centred / (grouped.std(1).repeat_interleave(s["generations"])
                                                                 + 1e-4),
            "num_items_in_batch": completion_mask.sum()}


def build_trainer(name: str, model_path: str, s: dict, out: str, callbacks=None):
    from datasets import Dataset

    key, overrides = STEP_TRAINERS[name]
    if key == "grpo":
        from trl import GRPOConfig as config_cls
        from trl import GRPOTrainer as trainer_cls
    elif key == "rpg":
        from hfx_trainers.rpg import RPGConfig as config_cls
        from hfx_trainers.rpg import RPGTrainer as trainer_cls
    else:
        from hfx_trainers.drpo import DRPOConfig as config_cls
        from hfx_trainers.drpo import DRPOTrainer as trainer_cls
    n = s["prompts"] * s["generations"]
    args = config_cls(output_dir=out, per_device_train_batch_size=n, num_generations=s["generations"],
                      max_completion_length=s["completion_len"], max_steps=s["warmup"] + s["steps"],
                      learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                      use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10**6,
                      disable_tqdm=True, dataloader_num_workers=0, seed=0, **overrides)
    prompts = Dataset.from_dict({"prompt": ["x"] * n * 4})
    trainer = trainer_cls(model=model_path, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=args, train_dataset=prompts, processing_class=tokenizer(), callbacks=callbacks)
    batch = rollouts(s, trainer.processing_class.pad_token_id, len(trainer.processing_class))
    if key == "grpo":
        batch["advantages"] = batch["grpo_advantages"]
    if name == "rpg-fixed-ref":  # the fixed reference's log-probs, as TRL computes them once per generation
        with torch.no_grad():
            batch["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), s["completion_len"])[0]
    batch.pop("grpo_advantages")
    trainer._prepare_inputs = lambda generation_batch: batch  # the same rollouts at every step, no generation
    return trainer


def run_worker(a) -> dict:
    from transformers import TrainerCallback

    torch.set_num_threads(os.cpu_count() or 1)
    s = {k: getattr(a, k.replace("-", "_")) for k in SIZES["full"]}
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(a.worker, a.model_dir, s, out, [Clock()])
        rss_before = rss_kib()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        trainer.train()
        hwm = rss_kib("VmHWM")
    return {"trainer": a.worker,
            "step_s": statistics.median(e - p for p, e in zip(stamps[a.warmup - 1:], stamps[a.warmup:])),
            "train_growth_mib": (hwm - rss_before) / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(name: str, model_dir: Path, s: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir),
           *[f"--{k.replace('_', '-')}={v}" for k, v in s.items()]]
    proc, others = undisturbed(lambda: subprocess.run(cmd, capture_output=True, text=True), name)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    result = {**json.loads(proc.stdout.strip().splitlines()[-1]), "others": others}
    print(f"  {name:18s} step {result['step_s'] * 1000:.0f} ms, train growth {result['train_growth_mib']:.0f} MiB, "
          f"other processes {others:.1%}", flush=True)
    return result


def part_step(s: dict) -> list[str]:
    names = list(STEP_TRAINERS)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(s["hidden"], s["layers"])
        model.save_pretrained(tmp)
        tokenizer().save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        runs = {n: [] for n in names}
        for r in range(s["rounds"]):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(spawn(name, Path(tmp), s))

    def ratio(name, key):
        values = [x[key] / g[key] for x, g in zip(runs[name], runs["grpo"])]
        return f"{statistics.median(values):.2f}" + (f" ({min(values):.2f}–{max(values):.2f})" if name != "grpo"
                                                      else "")

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    rows = [f"| {name if name != 'grpo' else 'GRPO (TRL)'} | {med(name, 'step_s') * 1000:.0f} | "
            f"{ratio(name, 'step_s')} | {med(name, 'train_growth_mib'):.0f} | {ratio(name, 'train_growth_mib')} | "
            f"{med(name, 'peak_rss_mib'):.0f} | {ratio(name, 'peak_rss_mib')} |" for name in names]
    n = s["prompts"] * s["generations"]
    setup = (f"Qwen2 {n_params / 1e6:.1f}M parameters (hidden {s['hidden']}, {s['layers']} layers, toy character "
             f"vocabulary), fp32, AdamW (torch). One fixed rollout batch of {s['prompts']} prompts × "
             f"{s['generations']} completions = {n} rows (prompt {s['prompt_len']} tokens, completions 50–100 % of "
             f"{s['completion_len']}), fed to every trainer at every step in place of generation: the step is the "
             "loss's forward, backward and optimizer step. Median of "
             f"{s['steps']} steps after {s['warmup']} warm-up steps; {s['rounds']} rounds in alternating order, each "
             "trainer in its own process. Ratios: median over rounds of trainer ÷ GRPO in the same round (range).")
    notes = ("GRPO: TRL's defaults (DAPO token-mean loss, β = 0: no reference model). RPG: the official UFKL "
             "differentiable loss, the REINFORCE estimator with RKL, and a fixed reference (`kl_reference=\"ref\"`: "
             "TRL loads a frozen copy; its log-probs are computed once per generation, here once before training, "
             "so the step does not include them while the memory does). DRPO: groups kept intact, k1 KL penalty. "
             "\"Train peak-RSS growth\" is the peak RSS during `train()` (VmHWM reset just before) minus the RSS "
             "before it: activations, gradients, optimizer state; \"process peak RSS\" is `ru_maxrss` over the whole "
             "worker.")
    return ["## Training step vs TRL GRPOTrainer, same rollouts", "", setup, "", notes, "",
            disturbance_note([r for rs in runs.values() for r in rs]), "",
            "| trainer | step (ms) | ÷ GRPO (range) | train peak-RSS growth (MiB) | ÷ GRPO | process peak RSS (MiB) "
            "| ÷ GRPO |", "|---|---|---|---|---|---|---|", *rows, ""]


# --------------------------------------------------------------------------------------------------
# Part 2: toy task
# --------------------------------------------------------------------------------------------------

# name -> (algorithm, overrides of the toy recipe)
TOY_METHODS = {"grpo": ("grpo", {}), "rpg": ("rpg", {}), "rpg-no-ds": ("rpg", {"dynamic_sampling": False}),
               "drpo": ("drpo", {})}
VARIANTS = {"plain": {}, "verbose": {"verbose_tail": 8}}
VARIANT_METHODS = {"plain": list(TOY_METHODS), "verbose": ["grpo", "drpo"]}
VARIANT_OVERRIDES = {"plain": {}, "verbose": {"max_completion_length": 16}}


def toy_worker(a) -> dict:
    from hfx import toy
    from hfx_trainers.rl_demo import mean_completion_length, toy_trainer

    torch.set_num_threads(1)
    task = toy.ArithmeticTask(**VARIANTS[a.variant])
    path = toy.warm_start(task)
    with tempfile.TemporaryDirectory() as out:
        algorithm, overrides = TOY_METHODS[a.worker]
        trainer = toy_trainer(algorithm, task, path, out, a.toy_steps, seed=a.seed,
                              **{**overrides, **VARIANT_OVERRIDES[a.variant]})
        trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    return {"method": a.worker, "variant": a.variant, "seed": a.seed,
            "accuracy": task.evaluate(trainer.model, trainer.processing_class),
            "mean_length": mean_completion_length(trainer),
            "final_length": statistics.mean(h["completions/mean_length"] for h in history[-len(history) // 10:]),
            "reward_curve": [h["reward"] for h in history],
            "length_curve": [h["completions/mean_length"] for h in history]}


def part_toy(steps: int, seeds: int, variants) -> list[str]:
    from hfx import toy

    before = {}
    for variant in variants:
        task = toy.ArithmeticTask(**VARIANTS[variant])
        before[variant] = task.evaluate(toy.warm_start(task))
    jobs = [(v, m, seed) for v in variants for seed in range(seeds) for m in VARIANT_METHODS[v]]
    results, running = [], []
    for job in [*jobs, None]:  # two workers at a time (one thread each)
        if job is not None:
            v, m, seed = job
            cmd = [sys.executable, __file__, "--worker", m, "--variant", v, "--seed", str(seed),
                   f"--toy-steps={steps}"]
            running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        while running and (len(running) >= 2 or job is None):
            proc = running.pop(0)
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"toy worker failed:\n{stderr[-4000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {r['variant']:8s} {r['method']:5s} seed {r['seed']}: accuracy {r['accuracy']:.3f}, mean length "
                  f"{r['mean_length']:.2f}, final length {r['final_length']:.2f}", flush=True)
    plot_toy(results, RESULTS / "trainers_rl_toy.png")
    lines = ["## Toy task: online RL from the warm start", "",
             f"Recipe `hfx_trainers.rl_demo` (AdamW, constant learning rate {_recipe()['learning_rate']:g}, "
             f"{_recipe()['per_device_train_batch_size'] // _recipe()['num_generations']} prompts × "
             f"{_recipe()['num_generations']} completions per step at temperature {_recipe()['temperature']:g}), "
             f"{steps} steps, seeds 0–{seeds - 1}, every method with the same steps, seeds, batch and learning rate; "
             "GRPO is TRL's `GRPOTrainer` with its defaults (it has no dynamic sampling); RPG as in its official "
             "recipe, with dynamic sampling (a step replaces prompt groups whose rewards all agree by fresh ones, so "
             "it generates more), and without. Accuracy: greedy exact match on the 200 held-out "
             "problems. Length: completion tokens (characters), mean over all steps and over the last 10 % of "
             "steps. Curves: `trainers_rl_toy.png`.", ""]
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        grpo = [r for r in rows if r["method"] == "grpo"]
        lines += [f"### {variant} task" + (" (answers + a tail of 0–8 dots in the SFT data; max 16 tokens)"
                                           if variant == "verbose" else " (max 8 tokens)"), "",
                  f"Warm start: accuracy {before[variant]:.3f}.", "",
                  "| method | accuracy (per seed) | mean | gain | mean length | last-10 % length | ÷ GRPO |",
                  "|---|---|---|---|---|---|---|"]
        for m in VARIANT_METHODS[variant]:
            mine = [r for r in rows if r["method"] == m]
            acc = statistics.mean(r["accuracy"] for r in mine)
            final = statistics.mean(r["final_length"] for r in mine)
            ratio = final / statistics.mean(r["final_length"] for r in grpo)
            per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in mine)
            lines.append(f"| {TOY_LABELS[m]} | {per_seed} | {acc:.3f} | "
                         f"{acc - before[variant]:+.3f} | {statistics.mean(r['mean_length'] for r in mine):.2f} | "
                         f"{final:.2f} | {ratio:.2f} |")
        lines.append("")
    return lines


TOY_LABELS = {"grpo": "GRPO (TRL)", "rpg": "RPG (UFKL, dynamic sampling)", "rpg-no-ds": "RPG (UFKL, no dynamic "
              "sampling)", "drpo": "DRPO"}


def _recipe() -> dict:
    from hfx_trainers.rl_demo import TOY_RL

    return TOY_RL


def plot_toy(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in results}, key=list(VARIANTS).index)
    fig, axes = plt.subplots(2, len(variants), figsize=(6 * len(variants), 7), squeeze=False)
    colors = {"grpo": "tab:gray", "rpg": "tab:blue", "rpg-no-ds": "tab:cyan", "drpo": "tab:orange"}
    for col, variant in enumerate(variants):
        for row, (key, label) in enumerate((("reward_curve", "reward (train, sampled)"),
                                            ("length_curve", "completion length (tokens)"))):
            ax = axes[row][col]
            for m in VARIANT_METHODS[variant]:
                curves = [r[key] for r in results if r["variant"] == variant and r["method"] == m]
                mean = [statistics.mean(v) for v in zip(*curves)]
                window = max(1, len(mean) // 30)
                smooth = [statistics.mean(mean[max(0, i - window):i + 1]) for i in range(len(mean))]
                ax.plot(smooth, label=TOY_LABELS[m], color=colors[m])
            ax.set_title(f"{variant} task: {label}")
            ax.set_xlabel("step")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,toy")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker")
    p.add_argument("--model-dir")
    p.add_argument("--variant", default="plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy-steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    for k, v in SIZES["full"].items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(toy_worker(a) if a.model_dir is None else run_worker(a)))
        return
    s = SIZES["quick" if a.quick else "full"]
    parts = a.parts.split(",")
    lines = ["# hfx-trainers RL benchmarks (RPG, DRPO) vs TRL GRPOTrainer", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), "
             f"transformers {__import__('transformers').__version__}, trl {__import__('trl').__version__}. "
             f"Command: `python benchmarks/trainers_rl.py --parts {a.parts}{' --quick' if a.quick else ''}`.", ""]
    if "step" in parts:
        lines += part_step(s)
    if "toy" in parts:
        lines += part_toy(40 if a.quick else a.toy_steps, 1 if a.quick else a.seeds,
                          ["plain"] if a.quick else list(VARIANTS))
    out = RESULTS / ("trainers_rl_quick.md" if a.quick else "trainers_rl.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
