"""RSPO self-play from the command line: generate with π_t, build pairs, train π_{t+1}, repeat (TRL-style: YAML, then
flags). On the toy task by default (toy warm start, toy data, toy preference oracle), or any model and dataset:

    python examples/rspo.py --config examples/rspo.yaml
    python examples/rspo.py --config examples/rspo.yaml --model_name_or_path ./my-sft-model \
        --dataset_name ./prompts.jsonl --output_dir rspo-run     # + --preference_model for SPPO/RSPO/INPO

The same as `hfx rspo`; the arguments are listed by `python examples/rspo.py --help`
(hfx_trainers.selfplay_script).
"""

from hfx_trainers.selfplay_script import rspo as script

if __name__ == "__main__":
    script.main(*script.make_parser().parse_args_and_config())
