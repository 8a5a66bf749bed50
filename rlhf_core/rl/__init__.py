"""Pure RL math for PPO on language models: tensors in, tensors out, no models or I/O.

The steps run in the order of OpenAI's lm-human-preferences (Ziegler et al. 2019), which
TRL's PPO trainer and Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO")
reproduce. Shapes: B sequences of T tokens; ``mask`` (B, T) is 1 on response tokens, each
row one contiguous block (left zeros: prompt, right zeros: padding after EOS).

Implementation details:

1. Per-token KL penalty ``kl_t`` against the frozen reference, estimator ``k1`` by default
   (``kl_penalty``; Ziegler et al. 2019 Eq. 2, Ouyang et al. 2022 Eq. 2; ``k2``/``k3`` from
   Schulman's "Approximating KL Divergence").
2. Shaped reward ``−β·kl_t`` on every response token plus the reward-model score on the
   last one, the EOS token (``compute_rewards``; Huang et al. 2024, "reward at EOS").
3. Optional reward whitening that keeps the mean, ``masked_whiten(r, m, shift_mean=False)``
   (TRL's ``whiten_rewards``). Statistics use the biased variance over unmasked tokens of
   the whole batch; masked positions of the output are 0.
4. GAE(γ, λ) computed backwards per response; padding neither contributes nor receives and
   the last token is not bootstrapped (``compute_gae``; Schulman et al. 2016). γ = 1,
   λ = 0.95 in TRL/Huang et al. defaults.
5. Advantage whitening over the batch, ``masked_whiten(A, m)`` (lm-human-preferences).
6. Clipped surrogate policy loss, token mean over the mask; ``approxkl`` is
   ½·mean((log π − log π_old)²) as in PPO2 (``ppo_policy_loss``; Schulman et al. 2017 Eq. 7).
7. Clipped value loss ``½·max((V − R)², (V_clip − R)²)``, token mean over the mask
   (``ppo_value_loss``; PPO2, Huang et al. 2024).
8. β fixed or adapted toward a target KL with a clipped proportional controller
   (``FixedKLController``, ``AdaptiveKLController``; Ziegler et al. 2019 §2.2), with
   ``state_dict`` for resume.

Critic-free group methods live in ``rlhf_core.rl.group``: GRPO and RLOO advantages from ``k``
samples per prompt and GRPO's clipped loss with its token aggregations (see that module).
"""

from rlhf_core.rl.gae import compute_gae
from rlhf_core.rl.group import (
    GROUP_SCALES,
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    rloo_advantages,
)
from rlhf_core.rl.kl_control import AdaptiveKLController, FixedKLController, KLController
from rlhf_core.rl.masked import masked_mean, masked_var, masked_whiten
from rlhf_core.rl.ppo_losses import ppo_policy_loss, ppo_value_loss
from rlhf_core.rl.reward_shaping import KL_ESTIMATORS, compute_rewards, kl_penalty

__all__ = [
    "GROUP_SCALES",
    "GRPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "compute_gae",
    "compute_rewards",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
]
