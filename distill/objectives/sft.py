"""Supervised fine-tuning on chat data (distill/chat_data.py), optionally with logit distillation from a teacher:

    loss = (1 - a) * CE + a * KL(teacher || student), on the assistant's tokens only,

summed over those tokens and divided by their number in the whole optimizer step (every micro-batch and rank: the
loop's normalisation, distill/train.py), so a long answer weighs by its tokens and gradient accumulation equals one
big batch. Ministral 3 trains its small models this way ("SFT with logit distillation": plain SFT looped, the
teacher's logits fixed it and stabilised the RL after). The loss is KD's (chunked or fused, distill/losses.py) with
the weights set from `a` (`sft.teacher_weight`, distill/config.py); everything else (teacher, fused path) is kd.py's.
"""

from __future__ import annotations

from distill.config import TrainConfig
from distill.losses import LossConfig
from distill.objectives.kd import Distillation


class SupervisedFineTuning(Distillation):
    @staticmethod
    def loss_config(config: TrainConfig) -> LossConfig:
        a = config.sft.weight(config.teacher is not None)
        return config.loss.model_copy(update={"kd_weight": a, "ce_weight": 1.0 - a})

    def describe(self) -> str:
        a = self.loss.kd_weight
        mix = f"{1 - a:g} CE + {a:g} KL(teacher || student)" if a else "CE"
        return f"sft ({mix} on the assistant's tokens; {super().describe()})"
