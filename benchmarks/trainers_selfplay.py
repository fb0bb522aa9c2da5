"""hfx-trainers self-play benchmarks, as ratios against TRL measured in the same run. Writes
benchmarks/results/trainers_selfplay.md.

    python benchmarks/trainers_selfplay.py                          # all parts
    python benchmarks/trainers_selfplay.py --parts step --quick     # a subset; --quick for a smoke run (< 2 min)

Parts:
  step        time per optimizer step and training-phase peak-RSS growth of SPIN, SPPO, RSPO and INPO vs TRL's
              DPOTrainer (sigmoid) on the same model and batches; each run in its own subprocess, rounds in
              alternating order. With precompute_ref_log_probs=True (one model in memory), and without it (TRL's
              frozen reference copy) for SPIN and SPPO. Target: ≤ 1.10× DPO.
  generation  sequences/s of the self-play driver's generate_completions vs a plain left-padded model.generate loop
              over the same prompts (sampled, K completions, every sequence forced to full length; and greedy K=1).
              Target: ≥ 1.0×.
  toy         2 self-play iterations per trainer on the toy arithmetic task from its warm start (recipe
              hfx_trainers.demo), eval accuracy before/after for 3 seeds, with an SFT control

A worker (one trainer, one run) is `python benchmarks/trainers_selfplay.py --worker NAME --model-dir DIR ...`; it
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _machine import cpu_name  # benchmarks/ is on sys.path when a benchmark runs as a script

RESULTS = Path(__file__).parent / "results"
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # set before transformers/TRL are imported
TRAINERS = ("dpo", "spin", "sppo", "rspo", "inpo")
WIN_PROBS = ("chosen_win_prob", "rejected_win_prob", "pair_win_prob")
ALPHABET = "abcdefghijklmnopqrstuvwxyz     "
MAX_OTHERS, TRIES, PAUSE_S = 0.05, 4, 30  # a timing is redone when other processes took ≥ 5 % of the CPUs


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# --------------------------------------------------------------------------------------------------


def tokenizer():
    from hfx.toy import tokenizer as toy_tokenizer

    return toy_tokenizer()  # one token per character: exact sequence lengths, no merges across the prompt boundary


def build_model(hidden: int, layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def preference_rows(n: int, prompt_len: int, completion_len: int, seed: int = 0) -> dict[str, list]:
    """Fixed synthetic pairs: prompts of `prompt_len` characters (= tokens), completions of ±25 % around
    `completion_len`, win probabilities drawn at random (only the SPPO/RSPO losses read them)."""
    rng = random.Random(seed)
    spread = completion_len // 4
    rows = {"prompt": [], "chosen": [], "rejected": [], **{c: [] for c in WIN_PROBS}}
    for _ in range(n):
        rows["prompt"].append(text(rng, prompt_len))
        rows["chosen"].append(text(rng, completion_len + rng.randint(-spread, spread)))
        rows["rejected"].append(text(rng, completion_len + rng.randint(-spread, spread)))
        p_w, p_l = rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.5)
        for column, value in zip(WIN_PROBS, (p_w, p_l, rng.uniform(0.5, 1.0))):
            rows[column].append(value)
    return rows


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def undisturbed(fn, label: str):
    """Run `fn` and check that other processes used < MAX_OTHERS of the machine meanwhile (this process and its
    children excluded); retry after a pause otherwise, at most TRIES times (the last result is kept, flagged)."""
    for attempt in range(1, TRIES + 1):
        busy, own, wall = busy_seconds(), own_seconds(), time.perf_counter()
        result = fn()
        others = ((busy_seconds() - busy) - (own_seconds() - own)) / ((time.perf_counter() - wall) * os.cpu_count())
        if others < MAX_OTHERS or attempt == TRIES:
            break
        print(f"  {label}: other processes used {others:.0%} of the CPUs, retrying in {PAUSE_S} s", flush=True)
        time.sleep(PAUSE_S)
    if others >= MAX_OTHERS:
        print(f"  {label}: still disturbed ({others:.0%}) after {TRIES} tries, kept", flush=True)
    return result, others


# --------------------------------------------------------------------------------------------------
# Part 1: training step (worker side)
# --------------------------------------------------------------------------------------------------


def trainer_classes(name: str):
    if name == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    import importlib

    module = importlib.import_module(f"hfx_trainers.{name}")
    upper = name.upper()
    return getattr(module, f"{upper}Trainer"), getattr(module, f"{upper}Config")


def run_worker(a) -> dict:
    """Build one trainer on the saved model, train warmup + steps optimizer steps, return timings and RSS."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    torch.set_num_threads(os.cpu_count() or 1)
    rows = preference_rows(a.rows, a.prompt_len, a.completion_len)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            stamps.append(("begin", time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(("end", time.perf_counter()))

    sizes = {k: getattr(a, k) for k in SIZES["full"]}
    with tempfile.TemporaryDirectory() as out:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir)
        start = time.perf_counter()
        trainer = build_trainer(a.worker, model, rows, sizes, out, a.precompute, [Clock()])
        construct_s = time.perf_counter() - start
        rss_before = rss_kib()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        trainer.train()
        hwm_train = rss_kib("VmHWM")
    ends = [t for kind, t in stamps if kind == "end"]
    begins = [t for kind, t in stamps if kind == "begin"]
    return {
        "trainer": a.worker,
        "construct_s": construct_s,
        "step_s": statistics.median(e - p for p, e in zip(ends[a.warmup - 1:], ends[a.warmup:])),  # end→end
        "compute_s": statistics.median(e - b for b, e in zip(begins[a.warmup:], ends[a.warmup:])),  # begin→end
        "rss_before_mib": rss_before / 1024,
        "train_growth_mib": (hwm_train - rss_before) / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_trainer(name, model, rows, s, out, precompute=True, callbacks=None):
    from datasets import Dataset

    if name not in ("sppo", "rspo"):  # DPO, SPIN and INPO get prompt/chosen/rejected only
        rows = {k: v for k, v in rows.items() if k not in WIN_PROBS}
    trainer_cls, config_cls = trainer_classes(name)
    args = config_cls(output_dir=out, per_device_train_batch_size=s["batch"], max_steps=s["warmup"] + s["steps"],
                      learning_rate=1e-6, lr_scheduler_type="constant", optim="adamw_torch", use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                      precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0)
    return trainer_cls(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer(),
                       callbacks=callbacks)


def loss_backward(trainer, batch) -> float:
    trainer.model.train()
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, batch).backward()
    elapsed = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def interleaved_round(trainers, batches, order, k) -> dict[str, float]:
    return {name: loss_backward(trainers[name], batches[name][k]) for name in order}


def part_interleaved(model, s, rounds) -> list[str]:
    """compute_loss + backward of every trainer on the same batch in one process, one trainer after the other
    (rotating order), the batch changing every round; the ratio to DPO is taken per round (same batch, same moment),
    which removes most of the machine's noise. Memory is not measured here."""
    import copy
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing renames
    rows = preference_rows(s["rows"], s["prompt_len"], s["completion_len"])
    times = {name: [] for name in TRAINERS}
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: build_trainer(name, copy.deepcopy(model), rows, s, out) for name in TRAINERS}
        batches = {name: [t.data_collator([t.train_dataset[j] for j in range(i, i + s["batch"])])
                          for i in range(0, s["batch"] * 4, s["batch"])] for name, t in trainers.items()}
        for r in range(rounds + 1):  # the first round warms up
            order = list(TRAINERS[r % len(TRAINERS):] + TRAINERS[:r % len(TRAINERS)])
            elapsed, _ = undisturbed(partial(interleaved_round, trainers, batches, order, r % 4),
                                     f"interleaved round {r}")
            for name, t in elapsed.items() if r else ():
                times[name].append(t)
    table = []
    for name in TRAINERS:
        r = [x / d for x, d in zip(times[name], times["dpo"])]
        q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], None, r[0])
        table.append(f"| {name.upper() if name != 'dpo' else 'DPO (TRL)'} | {statistics.median(times[name]) * 1000:.0f} "
                     f"| {statistics.median(r):.3f} | {q1:.3f}–{q3:.3f} |")
        print(f"interleaved {name}: {statistics.median(r):.3f} × DPO (quartiles {q1:.3f}–{q3:.3f})", flush=True)
    return ["### compute_loss + backward, interleaved in one process", "",
            f"The five trainers built on copies of the model (precompute on); each round runs "
            "`compute_loss(...).backward()` of every trainer on the same collated batch (one of 4, in turn), in "
            f"rotating order; {rounds} rounds after one warm-up round. The ratio to DPO is taken within each round "
            "(same batch, same moment), then the median over rounds. No optimizer step, no data loading.", "",
            "| trainer | loss + backward (ms, median) | ÷ DPO (median of per-round ratios) | quartiles |",
            "|---|---|---|---|", *table, ""]


# --------------------------------------------------------------------------------------------------
# Part 1: training step (driver side)
# --------------------------------------------------------------------------------------------------


def spawn(name: str, model_dir: Path, precompute: bool, s: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir),
           *(["--precompute"] if precompute else []), *[f"--{k.replace('_', '-')}={v}" for k, v in s.items()]]
    proc, others = undisturbed(lambda: subprocess.run(cmd, capture_output=True, text=True), name)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    result = {**json.loads(proc.stdout.strip().splitlines()[-1]), "others": others}
    print(f"  {name:5s} precompute={precompute}: step {result['step_s'] * 1000:.0f} ms, construct "
          f"{result['construct_s']:.1f} s, train growth {result['train_growth_mib']:.0f} MiB, other processes "
          f"{others:.1%}", flush=True)
    return result


def measure(names, model_dir, precompute, rounds, s) -> dict[str, list[dict]]:
    """`rounds` runs of every trainer, the order reversed every other round; DPO is in every round."""
    runs = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(spawn(name, model_dir, precompute, s))
    return runs


def ratios(runs, name, key) -> list[float]:
    """Trainer ÷ DPO of the same round, per round."""
    return [x[key] / d[key] for x, d in zip(runs[name], runs["dpo"])]


def fmt_ratio(runs, name, key, digits=2) -> str:
    r = ratios(runs, name, key)
    return f"{statistics.median(r):.{digits}f}" + (f" ({min(r):.{digits}f}–{max(r):.{digits}f})" if name != "dpo" else "")


def step_table(runs, title) -> list[str]:
    med = lambda name, key: statistics.median(x[key] for x in runs[name])  # noqa: E731
    rows = []
    for name in runs:
        rows.append(f"| {name.upper() if name != 'dpo' else 'DPO (TRL)'} | {med(name, 'step_s') * 1000:.0f} | "
                    f"{fmt_ratio(runs, name, 'step_s')} | {fmt_ratio(runs, name, 'compute_s')} | "
                    f"{med(name, 'train_growth_mib'):.0f} | {fmt_ratio(runs, name, 'train_growth_mib')} | "
                    f"{med(name, 'peak_rss_mib'):.0f} | {fmt_ratio(runs, name, 'peak_rss_mib', 3)} | "
                    f"{med(name, 'construct_s'):.1f} |")
    return [title, "", "| trainer | step (ms) | ÷ DPO (range) | ÷ DPO, fwd+bwd+optim only | train peak-RSS growth (MiB) "
            "| ÷ DPO | process peak RSS (MiB) | ÷ DPO | construct + precompute (s) |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def disturbance_note(runs) -> str:
    worst = max(r["others"] for r in runs)
    return (f"Each timed run is checked for other processes' CPU use (/proc/stat less this process and its workers) "
            f"and redone after a {PAUSE_S} s pause when it reached {MAX_OTHERS:.0%} of the CPUs (at most {TRIES} "
            f"tries); the largest share left in these numbers: {worst:.1%}.")


def part_step(model, model_dir, s, rounds, repeats) -> list[str]:
    print("step: precompute_ref_log_probs=True", flush=True)
    pre = measure(list(TRAINERS), model_dir, True, rounds, s)
    print("step: frozen reference copy", flush=True)
    ref = measure(["dpo", "spin", "sppo"], model_dir, False, rounds, s)
    n_params = sum(p.numel() for p in model.parameters())
    setup = (f"Qwen2 {n_params / 1e6:.1f}M parameters (hidden {s['hidden']}, {s['layers']} layers, toy character "
             f"vocabulary), {s['rows']} fixed pairs (prompt {s['prompt_len']} tokens, completions "
             f"{s['completion_len']} ± 25 %), batch {s['batch']} pairs, AdamW (torch), fp32; median of {s['steps']} "
             f"steps after {s['warmup']} warm-up steps, {rounds} rounds in alternating order. Ratios: the median "
             "over rounds of trainer ÷ DPO in the same round (range over rounds in brackets); absolute columns: "
             "the median over rounds.")
    notes = ["\"Step\" is the time between consecutive `on_step_end` callbacks (collation, forward, backward, "
             "optimizer, metric logging); \"fwd+bwd+optim only\" is `on_step_begin` → `on_step_end`, which leaves out "
             "fetching and collating the batch. \"Train peak-RSS growth\" is the peak RSS during `train()` (VmHWM, "
             "reset through `/proc/self/clear_refs` just before) minus the RSS right before `train()`: activations, "
             "gradients, optimizer state; this is the number the target is about. \"Process peak RSS\" is "
             "`ru_maxrss` over the whole worker (imports, dataset, model, precompute, training). Construction "
             "includes tokenising and TRL's reference precompute; RSPO and INPO also run the π_t pass there.",
             disturbance_note([r for runs in (pre, ref) for rs in runs.values() for r in rs])]
    return ["## Training step vs TRL DPOTrainer (sigmoid)", "", setup, "", *(x for n in notes for x in (n, "")),
            *step_table(pre, "### precompute_ref_log_probs=True (one model in memory)"),
            *step_table(ref, "### precompute_ref_log_probs=False (TRL's frozen reference copy, forward per step)"),
            *part_interleaved(model, s, repeats)]


# --------------------------------------------------------------------------------------------------
# Part 2: generation
# --------------------------------------------------------------------------------------------------


def plain_generate(model, tok, prompts, k, max_new_tokens, batch_size, **sampling) -> list[list[str]]:
    """The baseline: batches in the given order, left padding, num_return_sequences=k."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, num_return_sequences=k, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, **sampling)
        texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [texts[j * k:(j + 1) * k] for j in range(len(texts) // k)]
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def part_generation(model, n_prompts, k, max_new_tokens, batch_size, repeats) -> list[str]:
    try:
        from hfx_trainers.selfplay import generate_completions
    except ImportError as e:
        line = f"generation: skipped, hfx_trainers.selfplay.generate_completions is not importable ({e})"
        print(line, flush=True)
        return ["## Generation", "", line + ".", ""]
    rng = random.Random(1)
    prompts = [text(rng, rng.randint(8, 160)) for _ in range(n_prompts)]  # lengths spread over 8–160 tokens
    tok = tokenizer()
    model.eval()
    settings = [
        (f"sampled, K={k}", k, dict(do_sample=True, temperature=0.7, top_p=0.9, min_new_tokens=max_new_tokens)),
        ("greedy, K=1", 1, dict(do_sample=False, min_new_tokens=max_new_tokens)),
    ]
    rows, disturbed = [], []
    for label, kk, sampling in settings:
        runners = {
            "plain": partial(plain_generate, model, tok, prompts, kk, max_new_tokens, batch_size, **sampling),
            "driver": partial(generate_completions, model, tok, prompts, num_generations=kk,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, disable_progress=True, **sampling),
        }
        rates = {name: [] for name in runners}
        for r in range(repeats):
            for name in runners if r % 2 == 0 else list(runners)[::-1]:
                torch.manual_seed(r)
                (completions, elapsed), others = undisturbed(partial(timed, runners[name]), f"generation {name}")
                disturbed.append({"others": others})
                assert len(completions) == len(prompts) and all(len(c) == kk for c in completions), name
                rates[name].append(len(prompts) * kk / elapsed)
                print(f"generation {label} {name}: {rates[name][-1]:.1f} seq/s", flush=True)
        plain, driver = (statistics.median(rates[n]) for n in ("plain", "driver"))
        rows.append(f"| {label} | {plain:.1f} | {driver:.1f} | {driver / plain:.2f} |")
    n_params = sum(p.numel() for p in model.parameters())
    return [f"## Generation: driver vs a plain model.generate loop ({n_params / 1e6:.1f}M-parameter Qwen2)", "",
            f"{n_prompts} prompts of 8–160 tokens (random order), {max_new_tokens} new tokens forced "
            f"(`min_new_tokens=max_new_tokens`, so both produce the same number of tokens), {batch_size} prompts per "
            "`generate` call; sampled: temperature 0.7, top-p 0.9. The baseline batches the prompts in the given "
            "order with left padding; the driver sorts them by length. Median of "
            f"{repeats} runs, alternating order.", "",
            "| setting | plain generate (seq/s) | driver (seq/s) | driver ÷ plain |", "|---|---|---|---|", *rows, "",
            "Target: driver ≥ 1.0× plain. " + disturbance_note(disturbed), ""]


# --------------------------------------------------------------------------------------------------
# Part 3: toy self-play accuracy
# --------------------------------------------------------------------------------------------------


TOY_SEEDS = (0, 1, 2)


def toy_sft_control(task, model_path, output_dir, seed: int) -> float:
    """Context for the gains: plain SFT on the same 1024 prompts' ground truth, as many epochs as iterations."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hfx_trainers.demo import TOY_PROMPTS, TOY_SELFPLAY, TOY_TRAIN

    train = {k: v for k, v in TOY_TRAIN.items() if k != "num_train_epochs"}
    args = SFTConfig(output_dir=str(output_dir), seed=seed, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", disable_tqdm=True, num_train_epochs=TOY_SELFPLAY["num_iterations"], **train)
    data = task.dataset("train", format="prompt_completion")
    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = SFTTrainer(model=str(model_path), args=args, train_dataset=data.select(range(TOY_PROMPTS)),
                         processing_class=tok)
    trainer.train()
    return task.evaluate(trainer.model.eval(), tok)


def toy(quick: bool) -> list[str]:
    import tempfile

    from hfx.toy import get_task, warm_start
    from hfx_trainers.demo import TOY_HPARAMS, TOY_PROMPTS, TOY_SELFPLAY, TOY_TRAIN, toy_run

    task = get_task("arithmetic")
    model_path = warm_start(task)
    seeds = TOY_SEEDS[:1] if quick else TOY_SEEDS
    rows, after = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOY_HPARAMS:
            for seed in seeds:
                start = time.perf_counter()
                history = toy_run(name, task, model_path, Path(tmp) / f"{name}-{seed}", seed=seed).history
                accs = [history[0]["eval_before"]] + [h["eval_after"] for h in history]
                pairs = [h["num_pairs"] for h in history]
                rows.append(f"| {name} | {seed} | {' → '.join(f'{a:.3f}' for a in accs)} | {pairs} | "
                            f"{time.perf_counter() - start:.0f} |")
                after.setdefault(name, []).append(accs[-1])
        sft = [toy_sft_control(task, model_path, Path(tmp) / f"sft-{seed}", seed) for seed in seeds]
    before = accs[0]
    summary = [f"| {name} | {before:.3f} | {statistics.mean(v):.3f} | {min(v):.3f}–{max(v):.3f} | "
               f"{'yes' if min(v) > before else 'no'} |" for name, v in after.items()]
    summary.append(f"| (control) SFT on the ground truth, {TOY_SELFPLAY['num_iterations']} epochs | {before:.3f} | "
                   f"{statistics.mean(sft):.3f} | {min(sft):.3f}–{max(sft):.3f} | — |")
    return [
        "## Toy task: 2 self-play iterations from the warm start",
        "",
        f"Arithmetic toy task (`hfx.toy`), from its cached warm start (eval accuracy {before:.3f}, the 200 eval "
        f"problems, greedy). Recipe `hfx_trainers.demo` (also `hfx demo`): {TOY_PROMPTS} train prompts in "
        f"{TOY_SELFPLAY['prompt_splits']} splits (one per iteration), answers of ≤ {TOY_SELFPLAY['max_new_tokens']} "
        f"tokens (SPIN greedy, K=1; SPPO/RSPO K=5 at T=0.7/top-p 0.9; INPO K=8 at T=1.0, tournament), the task's "
        f"oracle `prefer` as preference model, {TOY_TRAIN['optim']} at a constant lr {TOY_TRAIN['learning_rate']:g}, "
        f"batch {TOY_TRAIN['per_device_train_batch_size']}, one epoch per iteration, "
        f"hyper-parameters {TOY_HPARAMS}. Seeds {list(seeds)} (trainer seed = generation seed).",
        "",
        "| trainer | warm start | after 2 iterations (mean) | range over seeds | above the warm start for every seed |",
        "|---|---|---|---|---|",
        *summary,
        "",
        "Per run (accuracy before → after iteration 0 → after iteration 1; training pairs per iteration after "
        "dropping ties; seconds):",
        "",
        "| trainer | seed | eval accuracy | pairs | s |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


# --------------------------------------------------------------------------------------------------


SIZES = {  # step-part sizes; --quick for the smoke run
    "full": dict(hidden=512, layers=4, rows=96, prompt_len=32, completion_len=64, batch=4, steps=20, warmup=3),
    "quick": dict(hidden=128, layers=2, rows=16, prompt_len=16, completion_len=24, batch=2, steps=3, warmup=1),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="step,generation,toy")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="step-part rounds (default 5, --quick 1)")
    parser.add_argument("--out", default=str(RESULTS / "trainers_selfplay.md"))
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    for key in SIZES["full"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    sizes = {k: v if getattr(args, k) is None else getattr(args, k)
             for k, v in SIZES["quick" if args.quick else "full"].items()}
    if args.worker:
        print(json.dumps(run_worker(argparse.Namespace(**{**vars(args), **sizes}))))
        return

    import transformers
    import trl

    torch.set_num_threads(os.cpu_count() or 1)
    global TRIES
    TRIES = 1 if args.quick else TRIES  # a smoke run does not wait for an idle machine
    load = os.getloadavg()
    parts = args.parts.split(",")
    rounds = args.rounds or (1 if args.quick else 5)
    command = f"python benchmarks/trainers_selfplay.py --parts {args.parts}{' --quick' if args.quick else ''}"
    lines = ["# hfx-trainers self-play benchmarks", "",
             f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}, Python "
             f"{platform.python_version()}. Command: `{command}`.", ""]
    model = build_model(sizes["hidden"], sizes["layers"])
    with tempfile.TemporaryDirectory() as model_dir:
        if "step" in parts:
            model.save_pretrained(model_dir)
            lines += part_step(model, Path(model_dir), sizes, rounds, 3 if args.quick else 40)
    if "generation" in parts:
        lines += part_generation(model, 32 if args.quick else 128, 4, 8 if args.quick else 32, 16, 1 if args.quick
                                 else 3)
    if "toy" in parts:
        try:
            lines += toy(args.quick)
        except NotImplementedError as e:
            print(f"toy: skipped ({e})", flush=True)
    lines[2] += (f" 1-minute load average at start / end: {load[0]:.2f} / {os.getloadavg()[0]:.2f} (timings need an "
                 "otherwise idle machine).")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
