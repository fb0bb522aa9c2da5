"""RPG online RL from the command line (TRL-style: YAML, then flags). On the toy arithmetic task by default (toy
warm start, toy prompts, the task's binary reward), or any model, prompt dataset and reward functions:

    python examples/rpg.py --config examples/rpg.yaml
    python examples/rpg.py --config examples/rpg.yaml --model_name_or_path ./my-sft-model \
        --dataset_name ./math.jsonl --reward_funcs my_rewards:accuracy --output_dir rpg-run

The same as `hfx rpg`; the arguments are listed by `python examples/rpg.py --help` (hfx_trainers.rl_script).
"""

from hfx_trainers.rl_script import rpg as script

if __name__ == "__main__":
    script.main(*script.make_parser().parse_args_and_config())
