"""A trainer contribution for the CLI tests: TRL's SFT, extended by hfx."""

from trl import SFTConfig, SFTTrainer

import hfx

ToySFTTrainer = hfx.extend(SFTTrainer)
ToySFTConfig = hfx.extend(SFTConfig)
