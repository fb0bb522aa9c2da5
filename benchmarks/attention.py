"""hfx-attention benchmarks: what each attention module buys at inference, against the dense model measured in the
same run. Writes benchmarks/results/attention.md.

    python benchmarks/attention.py            # KV-cache bytes and decode speed up to 16k generated tokens
    python benchmarks/attention.py --quick    # up to 2k tokens, for a smoke run

Sections are functions returning markdown (``SECTIONS``); add one (TPA cache bytes, a GPU softplus timing, ...) by
writing ``def my_section(args) -> list[str]`` and appending it.

KV cache section: one greedy ``generate`` per method on a small random Llama (fp32, CPU unless CUDA is present), the
same prompt, ``min_new_tokens = max_new_tokens``; a stopping-criteria hook records, at 1k / 4k / 16k generated tokens,
the bytes of keys + values held by the cache and the decode speed over the 256 steps before that point. Ratios are
against the dense ``DynamicCache`` run of the same script run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from hfx_attention._core import cache_bytes

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"Machine: {device}, {platform.machine()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}.")


# ---------------------------------------------------------------------------------------------------------------
# KV cache: sinks and H2O against dense
# ---------------------------------------------------------------------------------------------------------------


def small_llama(device):
    """A small random Llama (4 layers, hidden 256, 8 query / 2 KV heads of 32): the cache policy, not the model,
    is what is measured."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=40000, pad_token_id=0, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()


class Probe(transformers.StoppingCriteria):
    """Called once per generated token: records step times and, at the checkpoints, the cache's bytes."""

    def __init__(self, cache, checkpoints: list[int], window: int = 256):
        self.cache, self.checkpoints, self.window = cache, set(checkpoints), window
        self.times: list[float] = []
        self.rows: dict[int, tuple[int, int, float]] = {}

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        n = len(self.times)
        if n in self.checkpoints:
            span = self.times[-1] - self.times[-1 - min(self.window, n - 1)]
            self.rows[n] = (cache_bytes(self.cache, ("keys", "values")), cache_bytes(self.cache),
                            min(self.window, n - 1) / span)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_run(model, cache, prompt, checkpoints: list[int]) -> dict[int, tuple[int, int, float]]:
    from hfx._compat import cache_argument

    probe = Probe(cache, checkpoints)
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max(checkpoints),
                       min_new_tokens=max(checkpoints), do_sample=False, pad_token_id=0,
                       stopping_criteria=transformers.StoppingCriteriaList([probe]), **{cache_argument(): cache})
    return probe.rows


def kv_cache_section(args) -> list[str]:
    import hfx
    from hfx_attention.h2o import H2OCache
    from hfx_attention.sinks import SinkCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = [1024, 2048] if args.quick else [1024, 4096, 16384]
    prompt = torch.randint(2, 512, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    sinks, window, heavy, recent = 4, 1020, 512, 512
    methods: dict[str, Callable] = {
        "dense (DynamicCache)": lambda m: transformers.DynamicCache(),
        f"sinks (S={sinks}, W={window}, positions=cache)": lambda m: SinkCache(m, sinks, window, "cache"),
        f"H2O (heavy={heavy}, recent={recent}, positions=original)": lambda m: H2OCache(m, heavy, recent),
    }
    results = {}
    for name, build in methods.items():
        model = small_llama(device)
        if name.startswith("sinks"):
            hfx.attention.apply(model, "sinks", num_sink_tokens=sinks, window=window)
        elif name.startswith("H2O"):
            hfx.attention.apply(model, "h2o", heavy=heavy, recent=recent)
        print(f"[attention] {name} ...", flush=True)
        results[name] = decode_run(model, build(model), prompt, checkpoints)
    dense = results["dense (DynamicCache)"]
    lines = [
        "## KV cache: attention sinks and H2O vs dense",
        "",
        f"Small random Llama (4 layers, hidden 256, 8 query / 2 KV heads, head_dim 32, fp32) on {device.type}; "
        f"prompt of 32 tokens, greedy `generate`, one run per method. Both policies hold a 1024-token budget. "
        "KV bytes: keys + values held by the cache at that point; with metadata: plus the per-slot original "
        "positions, validity and scores of the policy caches. tokens/s: decode speed over the 256 steps before "
        "that point.",
        "",
        "| method | generated | KV bytes | ÷ dense | with metadata | tokens/s | ÷ dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for n, (nbytes, total, speed) in sorted(rows.items()):
            lines.append(f"| {name} | {n} | {nbytes / 2**20:.2f} MiB | {nbytes / dense[n][0]:.3f} | "
                         f"{total / 2**20:.2f} MiB | {speed:.1f} | {speed / dense[n][2]:.2f} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# TPA: factor-cache bytes against the GQA cache
# ---------------------------------------------------------------------------------------------------------------


def tpa_cache_section(args) -> list[str]:
    """Bytes TPA's factor cache holds after a prefill, against the stock GQA cache of the same model, with the
    distance of the logits from the GQA model (0 = the same model: equal quality by construction)."""
    import hfx
    from hfx._compat import output_cache
    from hfx_attention.tpa import factor_cache_numbers

    tokens = 512 if args.quick else 2048
    prompt = torch.randint(2, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    settings = {
        "GQA (stock)": None,
        "TPA init='gqa' (exact conversion, R = KV heads)": {"init": "gqa"},
        "TPA init='svd', rank 1 (lossy conversion)": {"init": "svd", "rank": 1},
        "TPA init='random', q_rank 6 / rank 2 (the paper's small config; needs training)": {"init": "random"},
    }
    rows, reference = [], None
    for name, options in settings.items():
        model = small_llama(torch.device("cpu"))
        if options is not None:
            hfx.attention.apply(model, "tpa", allow_untrained=True, **options)
        with torch.no_grad():
            out = model(prompt, use_cache=True)
        logits = out.logits.double()
        reference = logits if reference is None else reference
        rows.append((name, cache_bytes(output_cache(out)), (logits - reference).abs().max().item()))
    gqa = rows[0][1]
    c = small_llama(torch.device("cpu")).config
    lines = [
        "## TPA: factor cache vs the GQA cache", "",
        f"The same small random Llama ({c.num_attention_heads} query / {c.num_key_value_heads} KV heads, head_dim "
        f"{c.head_dim}, {c.num_hidden_layers} layers, fp32) after a {tokens}-token prefill; bytes of every tensor "
        "the cache holds (`hfx_attention._core.cache_bytes`), and the largest logit difference from the GQA model.",
        "", "| setting | cache bytes | ÷ GQA | max abs logit difference vs GQA |", "|---|---|---|---|",
        *(f"| {name} | {b / 2**20:.2f} MiB | {b / gqa:.3f} | {d:.2e} |" for name, b, d in rows), "",
        "Per token and layer, (R_K + R_V)(H + d) numbers for TPA vs 2·H_kv·d for GQA (`factor_cache_numbers`), at the "
        "dimensions of common models:", "",
        "| model dims | GQA | TPA exact conversion (R = H_kv) | ÷ GQA | TPA rank 2 | ÷ GQA |", "|---|---|---|---|---|---|",
    ]
    for label, h, hkv, d in (("Llama-3-8B (H 32, H_kv 8, d 128)", 32, 8, 128),
                             ("Qwen2.5-7B (H 28, H_kv 4, d 128)", 28, 4, 128),
                             ("Llama-2-7B MHA (H 32, H_kv 32, d 128)", 32, 32, 128)):
        dense, exact, two = 2 * hkv * d, factor_cache_numbers(h, d, hkv, hkv), factor_cache_numbers(h, d, 2, 2)
        lines.append(f"| {label} | {dense} | {exact} | {exact / dense:.2f} | {two} | {two / dense:.2f} |")
    lines += ["", "The exact conversion keeps the model (difference 0) but holds more than GQA (the head factors "
              "are stored per token); the saving needs low ranks with contextual factors, i.e. training (the paper "
              "trains T6 from scratch).", ""]
    return lines


SECTIONS: list[Callable[[argparse.Namespace], list[str]]] = [kv_cache_section, tpa_cache_section]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--output", default=str(RESULTS / "attention.md"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    lines = ["# hfx-attention benchmarks", "",
             f"{machine()} Command: `python benchmarks/attention.py{' --quick' if args.quick else ''}`.", ""]
    for section in SECTIONS:
        lines += section(args)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
