"""Fine-tune the toy model with any hfx optimizer, from the command line (TRL-style: YAML, then flags).

    python examples/optimizers.py --config examples/optimizers.yaml
    python examples/optimizers.py --hfx_optimizer galore2 --hfx_optimizer_args '{"rank": 32}' --max_steps 100

Without --model_name_or_path it starts from the toy warm start (trained and cached on first use), then prints the
task metric before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hfx


@dataclass
class ExampleArguments:
    task: str = field(default="arithmetic", metadata={"help": "hfx.toy task"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "local model; default: the toy warm start"})
    warm_start_steps: int | None = field(default=None, metadata={"help": "warm-start steps (default: the task's)"})


def make_parser():
    from trl import SFTConfig, TrlParser

    return TrlParser((ExampleArguments, hfx.extend(SFTConfig)))


def main(example_args: ExampleArguments, training_args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from hfx.toy import get_task, warm_start

    task = get_task(example_args.task)
    path = example_args.model_name_or_path or str(warm_start(task, example_args.warm_start_steps))
    tok = AutoTokenizer.from_pretrained(path)
    before = task.evaluate(AutoModelForCausalLM.from_pretrained(path).eval(), tok)
    trainer = hfx.extend(SFTTrainer)(model=path, args=training_args, processing_class=tok,
                                     train_dataset=task.dataset("train", format=task.sft_format))
    trainer.train()
    after = task.evaluate(trainer.model.eval(), tok)
    print(f"{training_args.hfx_optimizer or training_args.optim}: {task.name} eval metric {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "optimizer": type(getattr(trainer.optimizer, "optimizer",
                                                                            trainer.optimizer)).__name__}


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
