"""hfx-kernels attention benchmarks (GPU only): the softplus attention kernel (LSSA, LSSAR) forward + backward against
``torch.nn.functional.scaled_dot_product_attention`` forward + backward, and ``attn_colsum`` / ``tpa_decode`` against
their torch references, measured in the same run. Writes benchmarks/results/attention_kernels.md.

    python benchmarks/attention_kernels.py            # B=1, H=16, D=64/128, bf16, T = 4096 and 16384
    python benchmarks/attention_kernels.py --quick    # T = 1024 only, for a smoke run

Without CUDA it says so and exits 0 (Triton's CPU interpreter is for the tests, not for timing). The softplus rows
are causal (mask None); the ratio is softplus time / SDPA time (flash backend on the GPU), so > 1 means slower than
softmax flash attention. Torch references that would materialise a T x T matrix per head beyond ``--max-ref-t`` are
not run (n/a).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` on CUDA after two warm-up calls."""
    fn()
    fn()
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def peak_memory(fn: Callable[[], object]) -> float:
    """Peak CUDA memory of one call above what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def fwd_bwd(attn: Callable, q, k, v) -> Callable[[], None]:
    grad = torch.randn_like(q)

    def run():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(grad)

    return run


def softplus_rows(ts, ds, repeats: int, max_ref_t: int) -> list[str]:
    from hfx_kernels.softplus_attention import softplus_attention_reference, softplus_attention_triton

    rows = ["### Softplus attention, forward + backward (B=1, H=16, bf16, causal)", "",
            "| T | D | path | time (ms) | ÷ SDPA | peak extra memory (GiB) |", "|---|---|---|---|---|---|"]
    for t in ts:
        for d in ds:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, 16, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                       for _ in range(3))
            paths = {
                "SDPA (softmax)": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                "LSSA (Triton)": lambda a, b, c, s=math.log(d): softplus_attention_triton(a, b, c, scale=s),
                "LSSAR p=15 (Triton)": lambda a, b, c, s=math.log(d): softplus_attention_triton(a, b, c, scale=s,
                                                                                                power=15.0),
            }
            if t <= max_ref_t:
                paths["LSSA (torch reference)"] = lambda a, b, c, s=math.log(d): softplus_attention_reference(
                    a, b, c, scale=s)
            times, mems = {}, {}
            for name, attn in paths.items():
                run = fwd_bwd(attn, q, k, v)
                times[name] = timed(run, repeats)
                mems[name] = peak_memory(run)
                print(f"softplus T={t} D={d} {name}: {times[name] * 1e3:.2f} ms, {mems[name]:.2f} GiB", flush=True)
            base = times["SDPA (softmax)"]
            rows += [f"| {t} | {d} | {name} | {times[name] * 1e3:.2f} | {times[name] / base:.2f} | {mems[name]:.2f} |"
                     for name in paths]
            if t > max_ref_t:
                rows.append(f"| {t} | {d} | LSSA (torch reference) | n/a (T×T per head) | | |")
            del q, k, v
            torch.cuda.empty_cache()
    return [*rows, ""]


def colsum_rows(ts, ds, repeats: int, max_ref_t: int) -> list[str]:
    from hfx_kernels.attn_colsum import attn_colsum_reference, attn_colsum_triton

    rows = ["### attn_colsum (H2O scores; B=1, H=16, Hkv=4, bf16, causal prefill)", "",
            "| T | D | Triton (ms) | torch reference (ms) | reference ÷ Triton |", "|---|---|---|---|---|"]
    for t in ts:
        for d in ds:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 16, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, 4, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            tri = timed(lambda q=q, k=k: attn_colsum_triton(q, k), repeats)
            ref = timed(lambda q=q, k=k: attn_colsum_reference(q, k), repeats) if t <= max_ref_t else None
            print(f"colsum T={t} D={d}: triton {tri * 1e3:.2f} ms, reference {ref and ref * 1e3}", flush=True)
            rows.append(f"| {t} | {d} | {tri * 1e3:.2f} | " + (f"{ref * 1e3:.2f} | {ref / tri:.2f} |" if ref else
                                                               "n/a (T×T per head) | |"))
            del q, k
            torch.cuda.empty_cache()
    return [*rows, ""]


def tpa_rows(tks, repeats: int) -> list[str]:
    from hfx_kernels.tpa_decode import tpa_decode_reference, tpa_decode_triton, tpa_materialize

    b, h, d, rk, rv = 8, 32, 128, 2, 2
    rows = [f"### tpa_decode (one decode step: B={b}, H={h}, D={d}, Rk=Rv={rk}, bf16)", "",
            "| Tk | Triton on factors (ms) | reference: materialise + attend (ms) | SDPA on pre-materialised K/V (ms) "
            "| reference ÷ Triton | cache bytes factors / dense |", "|---|---|---|---|---|---|"]
    for tk in tks:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        fs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen)
              for s in ((b, tk, h, rk), (b, tk, rk, d), (b, tk, h, rv), (b, tk, rv, d))]
        keys, values = tpa_materialize(fs[0], fs[1]), tpa_materialize(fs[2], fs[3])
        tri = timed(lambda q=q, fs=fs: tpa_decode_triton(q, *fs), repeats)
        ref = timed(lambda q=q, fs=fs: tpa_decode_reference(q, *fs), repeats)
        dense = timed(lambda q=q, k=keys, v=values: F.scaled_dot_product_attention(q, k, v), repeats)
        ratio = (rk + rv) * (h + d) / (2 * h * d)
        print(f"tpa Tk={tk}: triton {tri * 1e3:.3f} ms, reference {ref * 1e3:.3f} ms, sdpa {dense * 1e3:.3f} ms",
              flush=True)
        rows.append(f"| {tk} | {tri * 1e3:.3f} | {ref * 1e3:.3f} | {dense * 1e3:.3f} | {ref / tri:.2f} | "
                    f"{ratio:.3f} |")
        del q, fs, keys, values
        torch.cuda.empty_cache()
    return [*rows, ""]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="T = 1024 only, a smoke run")
    parser.add_argument("--max-ref-t", type=int, default=4096, help="largest T for the T×T torch references")
    parser.add_argument("--out", default=str(RESULTS / "attention_kernels.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention_kernels.py needs a CUDA GPU (Triton kernels; the CPU interpreter is for the tests "
              "only). Nothing was measured and no results were written.")
        return 0
    from hfx_kernels._backend import triton_available

    if not triton_available():
        print("benchmarks/attention_kernels.py needs Triton (pip install 'hfx-kernels[triton]'); nothing measured.")
        return 0
    ts = (1024,) if args.quick else (4096, 16384)
    repeats = 5 if args.quick else 10
    props = torch.cuda.get_device_properties(0)
    machine = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), CUDA "
               f"{torch.version.cuda}; torch {torch.__version__}, Python {platform.python_version()}")
    lines = ["# hfx-kernels attention benchmarks", "",
             f"Machine: {machine}. Command: `python benchmarks/attention_kernels.py{' --quick' if args.quick else ''}`."
             " Times are medians of CUDA-synchronised wall clock; every ratio compares paths measured in the same "
             "run.", ""]
    lines += softplus_rows(ts, (64, 128), repeats, args.max_ref_t)
    lines += colsum_rows(ts, (64, 128), repeats, args.max_ref_t)
    lines += tpa_rows((4096,) if args.quick else (4096, 16384, 65536), repeats)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
