"""SWEET-RL on the toy collaborator task, against a trajectory-level DPO baseline on the same data. Writes
benchmarks/results/sweet_rl.md.

    python benchmarks/sweet_rl.py            # about 20 minutes on 2 CPU cores (+30 for the critic warm start)
    python benchmarks/sweet_rl.py --quick    # a smoke run

Steps: the toy warm start plays every train task 3 times (sampled at temperature 1); the critic trains on the
pairs of 80 % of the tasks and is scored on the other 20 %: pairwise accuracy on their trajectory pairs, and how well
its per-turn scores order candidate turns by their true value (the reward when the warm start finishes the episode
after the candidate). The critic starts from the agent (the paper's choice) or from a reading warm start (the tiny
model trained on demonstrations that open with the answer in the critic's system message, standing in for an
instruct model that reads its context). Then, for 3 seeds each: SWEET-RL rounds (critic on all pairs → candidates →
ranking → turn-level DPO) with each critic, the same policy stage ranked by the true turn values (what a perfect
critic would give), and the baseline (DPO on the same trajectory pairs, the first user message as the prompt, the
rest of the dialogue as the completion); success rates on the eval tasks against the warm start's. Step time: the
critic stage and TRL DPOTrainer, compute_loss + backward on the same batch.
Findings written by hand go in results/sweet_rl_findings.md, appended to the results.
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
from transformers import TrainingArguments  # noqa: E402

from hfx_trainers.sweet_rl import SweetCriticConfig  # noqa: E402
from hfx_trainers.sweet_rl_script import TOY_RECIPE  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMMON = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=50, disable_tqdm=True,
              max_length=256, optim="adamw_torch", lr_scheduler_type="constant", per_device_train_batch_size=16,
              per_device_eval_batch_size=16)
CRITIC = dict(learning_rate=1e-4, num_train_epochs=2)
# The critic's second starting point: the toy model trained on demonstrations that open with the answer in the
# critic's system message, so it reads the training-time information (the paper's critic is an instruct LLM that
# can); trained on the tasks whose pairs train the held-out critic, never on the held-out or eval tasks.
HIDDEN_INFO_TEMPLATE = SweetCriticConfig.hidden_info_template
CRITIC_START_STEPS = 1500
WIDE = {"data_fraction": 0.5}  # candidates on half the turn states (the recipe's 0.1 gives ~300 turn pairs)
ROUND = {k: v for k, v in TOY_RECIPE.items() if k not in TrainingArguments.__dataclass_fields__ and k not in COMMON}


def baseline_pairs(pairs):
    return [{"prompt": p["chosen"][:1], "chosen": p["chosen"][1:], "rejected": p["rejected"][1:]} for p in pairs]


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


def turn_values(task, policy, tok, states, candidates) -> list[list[float]]:
    """The true value of each candidate turn under the warm-start policy: the env replays the state and the
    candidate, then the policy finishes the episode greedily (``hfx.toy.play_episodes(histories=...)``)."""
    from hfx.toy import play_episodes

    histories, ids = [], []
    for state, cands in zip(states, candidates):
        for text in cands:
            histories.append([*state["history"], {"role": "assistant", "content": text}])
            ids.append(state["task_id"])
    rewards = [e["reward"] for e in play_episodes(task.env, ids, policy, tok, max_turns=task.max_turns,
                                                   histories=histories, desc=None)]
    out, k = [], 0
    for cands in candidates:
        out.append(rewards[k:k + len(cands)])
        k += len(cands)
    return out


def ranking_accuracy(scores, values) -> float:
    """Share of candidate pairs of one state with different true values that the scores order correctly."""
    import itertools

    good = total = 0.0
    for score, value in zip(scores, values):
        for i, j in itertools.combinations(range(len(value)), 2):
            if value[i] != value[j]:
                hi, lo = (i, j) if value[i] > value[j] else (j, i)
                total += 1
                good += 1.0 if score[hi] > score[lo] else 0.5 if score[hi] == score[lo] else 0.0
    return good / total if total else float("nan")


def critic_accuracy(starts, tok, train_pairs, held_pairs, held_rows, task, out) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hfx_trainers.sweet_rl import (
        SweetCriticConfig,
        SweetCriticTrainer,
        rank_candidates,
        sample_candidates,
        turn_states,
    )

    policy = AutoModelForCausalLM.from_pretrained(starts["agent"])
    states = turn_states(held_rows, 0.5, 0)
    candidates = sample_candidates(policy, tok, states, ROUND["num_candidates"], max_new_tokens=8, batch_size=64)
    values = turn_values(task, policy, tok, states, candidates)
    results = {}
    for start, path in starts.items():
        reference = AutoModelForCausalLM.from_pretrained(path)
        for normalization in ("turn_mean_sum", "trajectory_mean"):
            args = SweetCriticConfig(output_dir=out, advantage_normalization=normalization, **COMMON, **CRITIC)
            trainer = SweetCriticTrainer(path, args=args, train_dataset=Dataset.from_list(train_pairs),
                                         processing_class=tok)
            trainer.train()
            evaluation = trainer.evaluate(Dataset.from_list(held_pairs))
            scores = rank_candidates(trainer.model, reference, tok, states, candidates, batch_size=64)
            official = rank_candidates(trainer.model, policy, tok, states, candidates, batch_size=64,
                                       reference_sees_hidden_info=False)
            results[start, normalization] = (evaluation["eval_rewards/accuracies"], ranking_accuracy(scores, values),
                                             ranking_accuracy(official, values))
    informative = sum(len(set(v)) > 1 for v in values)
    return {"accuracy": results, "states": len(states), "informative_states": informative}


def round_result(kind, path, tok, rows, task, seed, out, critic_model=None, **overrides) -> tuple[float, int]:
    """One round from the warm start: the critic's ranking (``kind="critic"``, the critic starting from
    ``critic_model``, default the agent) or the true turn values (``"values"``, the ranking a perfect critic would
    give) → turn pairs → the policy stage."""
    from transformers import AutoModelForCausalLM

    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer, policy_pairs

    args = SweetRLConfig(output_dir=out, seed=seed, **COMMON, **{**ROUND, **overrides})
    trainer = SweetRLTrainer(path, args, rows, processing_class=tok, critic_model=critic_model)
    if kind == "critic":
        states, candidates, scores = trainer.rank_turns(trainer.train_critic())
    else:
        policy = AutoModelForCausalLM.from_pretrained(path)
        states, candidates, scores = trainer.rank_turns(
            None, scorer=lambda s, c: turn_values(task, policy, tok, s, c))
    pairs = policy_pairs(states, candidates, scores, args.num_pairs, seed)
    trainer.train_policy(pairs)
    return task.evaluate(trainer.policy_model, tok), len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from hfx.toy import CollaboratorTask, warm_start
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
    critic_path = str(warm_start("collaborator", 50 if a.quick else CRITIC_START_STEPS, stop_at=None,
                                 critic_context=HIDDEN_INFO_TEMPLATE, n_train=len(ids) - len(held)))
    methods = {  # name -> (ranking, overrides of ROUND)
        "SWEET-RL, critic from the agent (the recipe)": ("critic", {}),
        "SWEET-RL, critic from the reading warm start": ("critic", {"critic_model": critic_path, **WIDE}),
        "SWEET-RL, reading critic, official ranking": ("critic", {"critic_model": critic_path, **WIDE,
                                                                  "reference_sees_hidden_info": False}),
        "turn-level DPO on true turn values (a perfect critic)": ("values", WIDE),
    }
    results = {name: [] for name in [*methods, "trajectory-level DPO"]}
    with tempfile.TemporaryDirectory() as out:
        critic = critic_accuracy({"agent": path, "reading warm start": critic_path}, tok, train_pairs, held_pairs,
                                 [r for r in rows if r["task_id"] in held], task, out)
        for seed in seeds:
            for name, (kind, overrides) in methods.items():
                results[name].append(round_result(kind, path, tok, rows, task, seed, out, **overrides))
            dpo = DPOTrainer(path, args=DPOConfig(output_dir=out, seed=seed, beta=0.1, learning_rate=3e-5,
                                                  num_train_epochs=1, **COMMON),
                             train_dataset=Dataset.from_list(baseline_pairs(pairs)), processing_class=tok)
            dpo.train()
            results["trajectory-level DPO"].append((task.evaluate(dpo.model, tok), len(pairs)))
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1][0]:.3f}" for k, v in results.items()), flush=True)
        steps = step_ratio(path, tok, pairs, out, 3 if a.quick else 10)
    n_eval = len(task.task_ids("eval"))

    def row(name):
        accs = [x for x, _ in results[name]]
        n_pairs = statistics.mean(n for _, n in results[name])
        return (f"| {name} | {n_pairs:.0f} | {', '.join(f'{x:.3f}' for x in accs)} | {statistics.mean(accs):.3f} | "
                f"{statistics.mean(accs) - before:+.3f} |")

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
        f"{CRITIC['num_train_epochs']} epochs, β 0.1). Trajectory pairs: share of the other tasks' {len(held_pairs)} "
        "pairs where the better trajectory scores higher. Turn ranking: on half of those tasks' turn states "
        f"({critic['states']}, {critic['informative_states']} with candidates of different value), "
        f"{ROUND['num_candidates']} candidate turns each from the warm start, ranked by the critic's per-turn score "
        "(β·mean token log-ratio); accuracy over candidate pairs whose true values differ, the true value being the "
        "reward when the warm start finishes the episode greedily after the candidate. Chance is 0.5 for both.", "",
        f"Two starting points for the critic: the agent (the paper's choice, both from one instruct model) and the "
        f"reading warm start (`warm_start('collaborator', {CRITIC_START_STEPS}, stop_at=None, critic_context=...)`: "
        "the same tiny model trained on demonstrations that open with the answer in the critic's system message, on "
        f"the {len(ids) - len(held)} tasks whose pairs train this critic). Each is also its own frozen reference.",
        "Turn ranking by the trained advantage (reference: the critic's frozen start, shown the hidden information) "
        "and by the official ranking (reference: the agent, without it).",
        "", "| critic start | normalization | held-out trajectory pairs | turn ranking, advantage | turn ranking, "
        "official |", "|---|---|---|---|---|",
        *(f"| {k[0]} | {k[1]} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} |" for k, v in critic["accuracy"].items()), "",
        "## One round: SWEET-RL vs trajectory-level DPO", "",
        f"SWEET-RL recipe (`hfx_trainers.sweet_rl_script.TOY_RECIPE`): {json.dumps(ROUND)}. The reading-critic rows "
        "start the critic from the reading warm start and give candidates to half the turn states "
        f"({json.dumps(WIDE)}); the perfect-critic row ranks the same states by their true turn values. Baseline: TRL DPOTrainer on the same trajectory pairs (prompt = first "
        "user message, completion = the rest of the dialogue), lr 3e-5, 1 epoch, β 0.1. Eval success (greedy).", "",
        "| method | training pairs | success per seed | mean | vs warm start |", "|---|---|---|---|---|",
        f"| warm start | | {before:.3f} | {before:.3f} | |", *(row(name) for name in results), "",
        "## Critic step vs TRL DPOTrainer", "",
        f"compute_loss + backward on the same collated batch of 16 trajectory pairs ({steps['tokens']} tokens: hidden "
        "information + whole dialogues, the agent's tokens as the completion), both with a frozen reference copy, "
        f"interleaved, median of per-round ratios: critic {steps['critic_ms']:.0f} ms, DPO {steps['dpo_ms']:.0f} ms, "
        f"**ratio {steps['ratio']:.2f}** (target ≤ 1.10). The policy stage is TRL's DPOTrainer itself.", ""]
    out_file = RESULTS / ("sweet_rl_quick.md" if a.quick else "sweet_rl.md")
    findings = RESULTS / "sweet_rl_findings.md"
    out_file.write_text("\n".join(lines) + (findings.read_text() if findings.exists() and not a.quick else ""))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
