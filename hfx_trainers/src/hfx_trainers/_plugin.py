"""Entry point of hfx-trainers (group ``hfx``): declares the trainers and owns the ``[trainers]`` table.

Imports only hfx and the standard library: discovery must not import torch or trl."""

from hfx import hookimpl

SPIN_PAPER = ("Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", "2401.01335")
SPPO_PAPER = ("Self-Play Preference Optimization for Language Model Alignment", "2405.00675")
RSPO_PAPER = ("Game-Theoretic Regularized Self-Play Alignment of Large Language Models", "2503.00030")
INPO_PAPER = (
    "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning",
    "2407.00617",
)

# name -> (module, description, paper)
SELF_PLAY = {
    "spin": ("SPIN: DPO-style logistic/hinge loss, real answers vs the opponent's generations, iterated",
             SPIN_PAPER),
    "sppo": ("SPPO: squared regression of log-ratios vs π_t onto η·(win rate − ½)", SPPO_PAPER),
    "rspo": ("RSPO: SPPO against π_t plus a divergence regularizer toward a fixed π_ref", RSPO_PAPER),
    "inpo": ("INPO: no-regret squared loss on pairs with anchors π_t and π_ref", INPO_PAPER),
}

RPG_PAPER = ("On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning", "2505.17508")
DRPO_PAPER = ("DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization", "2510.04474")

# name -> (description, paper): online RL on TRL's GRPOTrainer, trained on prompts with reward functions
RL = {
    "rpg": ("RPG: KL-regularized policy gradient (FKL/RKL/UFKL/URKL; dual-clip or REINFORCE with RPG-Style Clip)",
            RPG_PAPER),
    "drpo": ("DRPO: length-weighted positives and log-mean-exp negatives, decoupled, with a KL trust region",
             DRPO_PAPER),
}

SWEET_RL_PAPER = ("SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks", "2503.15478")


@hookimpl
def hfx_register(registry):
    registry.options("trainers", {})
    for name, (description, paper) in SELF_PLAY.items():
        cls = name.upper()
        registry.trainer(
            name,
            f"hfx_trainers.{name}:{cls}Trainer",
            config=f"hfx_trainers.{name}:{cls}Config",
            dataset_format="preference",
            script=f"hfx_trainers.selfplay_script:{name}",  # hfx <name>: the whole iterative run
            demo=f"hfx_trainers.demo:{name}",
            description=description,
            paper=paper,
            requires={"trl": ">=1.16"},
        )
    for name, (description, paper) in RL.items():
        cls = name.upper()
        registry.trainer(
            name,
            f"hfx_trainers.{name}:{cls}Trainer",
            config=f"hfx_trainers.{name}:{cls}Config",
            dataset_format="prompt",
            script=f"hfx_trainers.rl_script:{name}",  # hfx <name>: toy task + its reward by default
            demo=f"hfx_trainers.rl_demo:{name}",
            description=description,
            paper=paper,
            requires={"trl": ">=1.16"},
        )
    registry.trainer(
        "sweet-rl",
        "hfx_trainers.sweet_rl:SweetRLTrainer",
        config="hfx_trainers.sweet_rl:SweetRLConfig",
        dataset_format="messages",  # offline multi-turn trajectories
        script="hfx_trainers.sweet_rl_script",
        demo="hfx_trainers.sweet_rl_script:demo",  # hfx demo --task collaborator
        description="SWEET-RL: a critic with training-time information ranks candidate turns for turn-level DPO",
        paper=SWEET_RL_PAPER,
        requires={"trl": ">=1.16"},
    )
