"""Time `import hfx` and `import hfx` + plugin discovery in fresh interpreters, against `import pluggy` (the anchor:
what the core cannot avoid) and `import torch` (what it must avoid). Writes benchmarks/results/import.md.

    python benchmarks/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

PROBES = {
    "import pluggy (anchor)": "import pluggy",
    "import hfx": "import hfx",
    "import hfx + discovery": "import hfx; hfx.get_registry()",
    "import hfx + discovery + hfx.<optimizer> name lookup": "import hfx; hfx.get_registry().names('optimizer')",
    "import torch (for scale)": "import torch",
}
HEAVY = ("torch", "transformers", "trl")


def measure(code: str) -> tuple[float, list[str]]:
    probe = (f"import time, sys, json; t = time.perf_counter(); {code}; dt = time.perf_counter() - t; "
             f"print(json.dumps([dt, [m for m in {HEAVY!r} if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    dt, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return dt, heavy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "import.md"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for label, code in PROBES.items():
        runs = [measure(code) for _ in range(args.repeats)]
        times = sorted(dt for dt, _ in runs)
        rows.append((label, statistics.median(times), times[0], runs[0][1]))
        print(f"{label}: median {statistics.median(times) * 1000:.1f} ms", flush=True)
    anchor = rows[0][1]
    lines = [
        "# Import time of the hfx core",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"{platform.platform()}; load average {load:.1f} when the run started (other work on the "
        "machine inflates every row, the ratios less).",
        f"Command: `python benchmarks/import_time.py --repeats {args.repeats}` (each probe in a fresh interpreter; "
        "time measured inside it, excluding interpreter start).",
        "",
        "| probe | median (ms) | best (ms) | ÷ import pluggy | heavy modules loaded |",
        "|---|---|---|---|---|",
    ]
    for label, med, best, heavy in rows:
        lines.append(f"| {label} | {med * 1000:.1f} | {best * 1000:.1f} | {med / anchor:.2f} | "
                     f"{', '.join(heavy) or 'none'} |")
    lines += ["", "Target (issue #2): `import hfx` + discovery under 0.3 s, with none of torch/transformers/trl loaded."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
