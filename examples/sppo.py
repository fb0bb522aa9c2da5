"""SPPO self-play from the command line: generate with π_t, build pairs, train π_{t+1}, repeat (TRL-style: YAML, then
flags). On the toy task by default (toy warm start, toy data, toy preference oracle), or any model and dataset:

    python examples/sppo.py --config examples/sppo.yaml
    python examples/sppo.py --config examples/sppo.yaml --model_name_or_path ./my-sft-model \
        --dataset_name ./prompts.jsonl --output_dir sppo-run     # + --preference_model for SPPO/RSPO/INPO

The same as `hfx sppo`; the arguments are listed by `python examples/sppo.py --help`
(hfx_trainers.selfplay_script).
"""

from hfx_trainers.selfplay_script import sppo as script

if __name__ == "__main__":
    script.main(*script.make_parser().parse_args_and_config())
