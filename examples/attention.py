"""hfx attention modules on the toy model, from the command line (TRL-style: YAML, then flags).

    python examples/attention.py --config examples/attention.yaml          # fine-tune with GRAPE (FoX gates)
    python examples/attention.py --config examples/attention.yaml --hfx_attention tpa --hfx_attention_args '{"init": "gqa"}'
    python examples/attention.py --config examples/attention.yaml --generate sinks --new_tokens 4096  # flat memory
    python examples/attention.py --config examples/attention.yaml --generate h2o --cache_args '{"heavy": 64}'

Fine-tuning (GRAPE, TPA, CASTLE, softplus) goes through the ``hfx_attention`` / ``hfx_attention_args`` fields of an
hfx-extended SFTConfig and prints the task metric before and after. ``--generate`` (sinks, H2O) greedily generates
``--new_tokens`` tokens with and without the cache policy and prints the cache's bytes at a few lengths.
Without --model_name_or_path it starts from the toy warm start (trained and cached on first use).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import hfx


@dataclass
class ExampleArguments:
    task: str = field(default="arithmetic", metadata={"help": "hfx.toy task"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "local model; default: the toy warm start"})
    warm_start_steps: int | None = field(default=None, metadata={"help": "warm-start steps (default: the task's)"})
    generate: str | None = field(default=None, metadata={"help": "sinks or h2o: long generation instead of training"})
    new_tokens: int = field(default=2048, metadata={"help": "--generate: tokens to generate"})
    cache_args: dict | str | None = field(default=None, metadata={"help": "--generate: options of the cache policy "
                                                                          "(JSON), e.g. '{\"window\": 252}'"})


DEFAULT_CACHE_ARGS = {"sinks": {"num_sink_tokens": 4, "window": 252}, "h2o": {"heavy": 128, "recent": 128}}


def make_parser():
    from trl import SFTConfig, TrlParser

    return TrlParser((ExampleArguments, hfx.extend(SFTConfig)))


def generate_lengths(path: str, method: str, new_tokens: int, cache_args: dict) -> list[dict]:
    """Greedy generation of 1/4, 1/2 and all of ``new_tokens`` tokens, dense and with ``method``: cache bytes and
    decode speed of each run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfx._compat import output_cache
    from hfx_attention._core import cache_bytes

    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok(["12+7="], return_tensors="pt")
    rows = []
    for name in ("dense", method):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if name != "dense":
            hfx.attention.apply(model, method, **cache_args)
        for n in (new_tokens // 4, new_tokens // 2, new_tokens):
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            seconds = time.perf_counter() - start
            rows.append({"method": name, "generated": n, "cache_bytes": cache_bytes(output_cache(out)),
                         "tokens_per_s": n / seconds})
            print(f"{name:>6}: {n:>6} tokens, cache {rows[-1]['cache_bytes'] / 2**10:8.1f} KiB, "
                  f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return rows


def main(example_args: ExampleArguments, training_args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from hfx.toy import get_task, warm_start

    task = get_task(example_args.task)
    path = example_args.model_name_or_path or str(warm_start(task, example_args.warm_start_steps))
    if example_args.generate:
        method = example_args.generate
        if method not in DEFAULT_CACHE_ARGS:
            raise SystemExit(f"--generate takes one of {sorted(DEFAULT_CACHE_ARGS)}, got {method!r}")
        cache_args = example_args.cache_args
        cache_args = json.loads(cache_args) if isinstance(cache_args, str) else cache_args
        return {"rows": generate_lengths(path, method, example_args.new_tokens,
                                         cache_args or DEFAULT_CACHE_ARGS[method])}
    tok = AutoTokenizer.from_pretrained(path)
    before = task.evaluate(AutoModelForCausalLM.from_pretrained(path).eval(), tok)
    trainer = hfx.extend(SFTTrainer)(model=path, args=training_args, processing_class=tok,
                                     train_dataset=task.dataset("train", format=task.sft_format))
    trainer.train()
    after = task.evaluate(trainer.model.eval(), tok)
    print(f"{training_args.hfx_attention or 'sdpa'}: {task.name} eval metric {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "applied": hfx.attention.applied(trainer.model)}


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
