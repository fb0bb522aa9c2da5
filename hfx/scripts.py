"""``hfx <method>``: train with a registered trainer from the command line, TRL-style.

    hfx spin --config spin.yaml --learning_rate 1e-6      # YAML values become defaults, flags override them

Arguments are those of :class:`HfxScriptArguments`, the trainer's config (with the ``hfx_*`` fields) and TRL's
``ModelConfig``. The dataset defaults to a built-in toy task (``toy:arithmetic``) and the model to the toy warm
start, so ``hfx <method>`` runs offline with no arguments at all. A trainer may ship its own script instead
(``registry.trainer(..., script="pkg.mod")`` with TRL's ``make_parser()``/``main(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .compose import extend
from .registry import import_string

TOY_PREFIX = "toy:"


@dataclass
class HfxScriptArguments:
    dataset_name: str = field(
        default="toy:arithmetic",
        metadata={"help": "'toy:<task>' for a built-in hfx.toy task, or a local path/file for datasets.load_dataset."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    warm_start_steps: int | None = field(
        default=None, metadata={"help": "Without --model_name_or_path: steps of the toy warm start (default: the toy's)."}
    )


def model_or_warm_start(model_path: str | None, task, warm_start_steps: int | None = None,
                        missing: str = "--model_name_or_path is required unless the dataset is a built-in toy task"
                        ) -> str:
    """``model_path``, or (when it is None) the toy warm start of ``task`` (a toy task or its name); without a task
    a ``ValueError`` with ``missing``."""
    if model_path is not None:
        return model_path
    if task is None:
        raise ValueError(missing)
    from .toy import warm_start

    steps = {"steps": warm_start_steps} if warm_start_steps else {}
    return str(warm_start(task, **steps))


def run_trainer(contribution, argv: list[str]) -> int:
    """Parse ``argv`` for the trainer ``contribution``, build it and train; returns an exit code."""
    if "script" in contribution.extras:
        module = import_string(contribution.extras["script"])
        parser = module.make_parser()
        module.main(*parser.parse_args_and_config(args=argv))
        return 0

    from transformers import AutoTokenizer
    from trl import ModelConfig, TrlParser, get_peft_config

    config_cls = extend(contribution.load("config"))
    parser = TrlParser((HfxScriptArguments, config_cls, ModelConfig), prog=f"hfx {contribution.name}")
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    dataset_format = contribution.extras.get("dataset_format", "prompt_completion")

    name = script_args.dataset_name
    try:
        model_path = model_or_warm_start(model_args.model_name_or_path,
                                         name[len(TOY_PREFIX):] if name.startswith(TOY_PREFIX) else None,
                                         script_args.warm_start_steps)
    except ValueError as e:
        parser.error(str(e))
    if hasattr(training_args, "model_init_kwargs"):
        init = {"revision": model_args.model_revision, "dtype": model_args.dtype,
                "attn_implementation": model_args.attn_implementation}
        training_args.model_init_kwargs = {**{k: v for k, v in init.items() if v is not None},
                                           **(training_args.model_init_kwargs or {})}

    dataset, extra = load_train_dataset(script_args, dataset_format)
    trainer = extend(contribution.load())(
        model=model_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=get_peft_config(model_args),
        **extra,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return 0


def load_train_dataset(script_args: HfxScriptArguments, dataset_format: str):
    """The train split, and extra trainer kwargs a toy task supplies (its reward function for RL formats)."""
    name = script_args.dataset_name
    if name.startswith(TOY_PREFIX):
        from .toy import get_task

        task = get_task(name[len(TOY_PREFIX):])
        if dataset_format not in task.formats:
            raise ValueError(f"this trainer trains on {dataset_format!r} data; toy task {task.name!r} offers "
                             f"{', '.join(task.formats)}: pick another --dataset_name")
        extra = {"reward_funcs": [task.reward_fn]} if dataset_format == "prompt" else {}
        return task.dataset(script_args.dataset_train_split, format=dataset_format), extra
    from datasets import load_dataset

    return load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split), {}
