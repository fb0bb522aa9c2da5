"""A SWEET-RL round from the command line (TRL-style: YAML, then flags): the agent plays the toy collaborator task
(it must ask for a hidden number before answering) a few times per task, a critic that sees the answer learns to
tell better trajectories from worse, candidate next turns are ranked by the critic, and the agent is trained with
turn-level DPO. Or any agent and offline trajectories:

    python examples/sweet_rl.py --config examples/sweet_rl.yaml
    python examples/sweet_rl.py --config examples/sweet_rl.yaml --model_name_or_path ./agent \\
        --trajectories ./offline.jsonl --output_dir sweet-run

The same as `hfx sweet-rl`; the arguments are listed by `python examples/sweet_rl.py --help`
(hfx_trainers.sweet_rl_script).
"""

from hfx_trainers import sweet_rl_script as script

if __name__ == "__main__":
    script.main(*script.make_parser().parse_args_and_config())
