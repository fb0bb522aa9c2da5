"""SWEET-RL on the toy collaborator task, against a trajectory-level DPO baseline on the same data. Writes
benchmarks/results/sweet_rl.md.

    python benchmarks/sweet_rl.py            # about 10 minutes on 2 CPU cores
    python benchmarks/sweet_rl.py --quick    # a smoke run

Steps: the toy warm start plays every train task 3 times (sampled at temperature 1); the critic trains on the
pairs of 80 % of the tasks and its pairwise accuracy (β·score⁺ > β·score⁻) is measured on the other 20 %; then full
SWEET-RL rounds (critic on all pairs → candidates → ranking → turn-level DPO) and the baseline (DPO on the same
trajectory pairs, the first user message as the prompt, the rest of the dialogue as the completion, the same learning
rate and epoch) are trained for 3 seeds each and their success rates compared on the eval tasks with the warm
start's. Step time: the critic stage and TRL DPOTrainer, compute_loss + backward on the same collated batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from trainers_selfplay import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMMON = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=50, disable_tqdm=True,
              max_length=256, optim="adamw_torch", lr_scheduler_type="constant", per_device_train_batch_size=16,
              per_device_eval_batch_size=16)
CRITIC = dict(learning_rate=1e-4, num_train_epochs=2)
ROUND = dict(critic_learning_rate=1e-4, critic_epochs=2, policy_learning_rate=3e-5, policy_epochs=1,
             data_fraction=0.1, num_candidates=8, candidate_max_new_tokens=8, num_pairs=4)


def baseline_pairs(pairs):
    return [{"prompt": p["chosen"][:1], "chosen": p["chosen"][1:], "rejected": p["rejected"][1:]} for p in pairs]


def critic_accuracy(path, tok, train_pairs, held_pairs, out) -> dict:
    from datasets import Dataset

    from hfx_trainers.sweet_rl import SweetCriticConfig, SweetCriticTrainer

    results = {}
    for normalization in ("turn_mean_sum", "trajectory_mean"):
        args = SweetCriticConfig(output_dir=out, advantage_normalization=normalization, **COMMON, **CRITIC)
        trainer = SweetCriticTrainer(path, args=args, train_dataset=Dataset.from_list(train_pairs),
                                     processing_class=tok)
        trainer.train()
        evaluation = trainer.evaluate(Dataset.from_list(held_pairs))
        results[normalization] = evaluation["eval_rewards/accuracies"]
    return results


def step_ratio(path, tok, pairs, out, rounds: int) -> dict:
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hfx_trainers.sweet_rl import SweetCriticConfig, SweetCriticTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    critic = SweetCriticTrainer(path, args=SweetCriticConfig(output_dir=out, **COMMON, **CRITIC),
                                train_dataset=Dataset.from_list(pairs), processing_class=tok)
    dpo = DPOTrainer(path, args=DPOConfig(output_dir=out, beta=0.1, **COMMON, **CRITIC),
                     train_dataset=Dataset.from_list(baseline_pairs(pairs)), processing_class=tok)
    # The same batch for both: the critic's (hidden information + whole dialogues; completion_mask = the agent's
    # tokens), which TRL's DPOTrainer scores with its own loss (sigmoid on summed log-ratios).
    critic_batch = critic.data_collator([critic.train_dataset[i] for i in range(16)])
    batches = {"critic": critic_batch, "dpo": {k: v for k, v in critic_batch.items() if k != "turn_ids"}}
    times = {"critic": [], "dpo": []}
    for r in range(rounds + 1):
        for name, trainer in (("critic", critic), ("dpo", dpo))[::1 if r % 2 else -1]:
            trainer.model.train()
            start = time.perf_counter()
            trainer.compute_loss(trainer.model, copy.copy(batches[name])).backward()
            if r:
                times[name].append(time.perf_counter() - start)
            trainer.model.zero_grad(set_to_none=True)
    ratios = [c / d for c, d in zip(times["critic"], times["dpo"])]
    return {"ratio": statistics.median(ratios), "critic_ms": statistics.median(times["critic"]) * 1000,
            "dpo_ms": statistics.median(times["dpo"]) * 1000, "tokens": int(critic_batch["attention_mask"].sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from hfx.toy import CollaboratorTask, warm_start
    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer
    from hfx_trainers.trajectories import collect_trajectories, critic_pairs

    torch.set_num_threads(1)
    task = CollaboratorTask()
    path = str(warm_start(task))
    tok = AutoTokenizer.from_pretrained(path)
    agent = AutoModelForCausalLM.from_pretrained(path)
    before = task.evaluate(agent, tok)
    ids = task.task_ids("train")[:48 if a.quick else None]
    rows = collect_trajectories(agent, tok, ids, make_env=task.env, max_turns=task.max_turns, attempts=3,
                                hidden_info=lambda t: str(task.get(t).hidden["answer"]))
    held = set(ids[int(0.8 * len(ids)):])
    train_pairs = critic_pairs([r for r in rows if r["task_id"] not in held])
    held_pairs = critic_pairs([r for r in rows if r["task_id"] in held])
    pairs = critic_pairs(rows)
    seeds = range(1 if a.quick else 3)
    with tempfile.TemporaryDirectory() as out:
        accuracy = critic_accuracy(path, tok, train_pairs, held_pairs, out)
        sweet, base = [], []
        for seed in seeds:
            trainer = SweetRLTrainer(path, SweetRLConfig(output_dir=out, seed=seed, **COMMON, **ROUND), rows,
                                     processing_class=tok)
            summary = trainer.train()
            sweet.append(task.evaluate(trainer.policy_model, tok))
            dpo = DPOTrainer(path, args=DPOConfig(output_dir=out, seed=seed, beta=0.1, learning_rate=3e-5,
                                                  num_train_epochs=1, **COMMON),
                             train_dataset=Dataset.from_list(baseline_pairs(pairs)), processing_class=tok)
            dpo.train()
            base.append(task.evaluate(dpo.model, tok))
            print(f"seed {seed}: SWEET-RL {sweet[-1]:.3f} ({summary['policy_pairs']} turn pairs), "
                  f"trajectory DPO {base[-1]:.3f}", flush=True)
        steps = step_ratio(path, tok, pairs, out, 3 if a.quick else 10)
    n_eval = len(task.task_ids("eval"))
    lines = [
        "# SWEET-RL on the toy collaborator task", "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), transformers "
        f"{__import__('transformers').__version__}, trl {__import__('trl').__version__}. Command: "
        f"`python benchmarks/sweet_rl.py{' --quick' if a.quick else ''}`.", "",
        f"Warm start (`hfx.toy.warm_start('collaborator')`): eval success {before:.3f} on {n_eval} tasks. "
        f"Offline data: 3 sampled attempts on {len(ids)} train tasks, {sum(r['reward'] for r in rows) / len(rows):.1%} "
        f"successful, {len(pairs)} critic pairs.", "",
        "## Critic: pairwise accuracy on held-out tasks", "",
        f"Critic trained on the pairs of 80 % of the tasks ({len(train_pairs)} pairs; lr {CRITIC['learning_rate']:g}, "
        f"{CRITIC['num_train_epochs']} epochs, β 0.1), accuracy = share of the other tasks' {len(held_pairs)} pairs "
        "where the better trajectory scores higher (chance 0.5).", "",
        "| normalization | held-out pairwise accuracy |", "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in accuracy.items()), "",
        "## One round: SWEET-RL vs trajectory-level DPO", "",
        f"SWEET-RL: {json.dumps(ROUND)}; baseline: TRL DPOTrainer on the same {len(pairs)} pairs (prompt = first user "
        "message, completion = the rest of the dialogue), lr 3e-5, 1 epoch, β 0.1. Eval success (greedy).", "",
        "| method | success per seed | mean | vs warm start |", "|---|---|---|---|",
        f"| warm start | {before:.3f} | {before:.3f} | |",
        f"| SWEET-RL | {', '.join(f'{x:.3f}' for x in sweet)} | {statistics.mean(sweet):.3f} | "
        f"{statistics.mean(sweet) - before:+.3f} |",
        f"| trajectory-level DPO | {', '.join(f'{x:.3f}' for x in base)} | {statistics.mean(base):.3f} | "
        f"{statistics.mean(base) - before:+.3f} |", "",
        "## Critic step vs TRL DPOTrainer", "",
        f"compute_loss + backward on the same collated batch of 16 trajectory pairs ({steps['tokens']} tokens: hidden "
        "information + whole dialogues, the agent's tokens as the completion), both with a frozen reference copy, "
        f"interleaved, median of per-round ratios: critic {steps['critic_ms']:.0f} ms, DPO {steps['dpo_ms']:.0f} ms, "
        f"**ratio {steps['ratio']:.2f}** (target ≤ 1.10).", ""]
    out_file = RESULTS / ("sweet_rl_quick.md" if a.quick else "sweet_rl.md")
    out_file.write_text("\n".join(lines))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
