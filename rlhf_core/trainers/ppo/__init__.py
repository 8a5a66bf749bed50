"""PPO for language models (RLHF, Ziegler et al. 2019; Ouyang et al. 2022) on Accelerate.

Each update: sample responses to a batch of prompts from the policy, score them, turn scores
and the KL to the frozen reference into per-token rewards, estimate advantages with GAE, then
run K epochs of clipped PPO over shuffled minibatches. The math is ``rlhf_core.rl``; sampling and
log-prob recomputation are ``rlhf_core.rollout``; this package is the loop, the models and the
bookkeeping, one role per module:

- ``config``: :class:`PPOConfig`, the shared trainer fields plus PPO's;
- ``models``: policy and value under one module, dropout off, a value model from the policy;
- ``rollout``: a scored rollout batch, the reward normalisation and the missing-EOS penalty;
- ``trainer``: the update loop and evaluation;
- ``checkpoint``: save and resume through Accelerate;
- ``train``: :func:`train_ppo`, which builds all of the above and runs it.

Implementation details followed (numbers as in Huang et al. 2024, "The N+ Implementation Details
of RLHF with PPO: A Case Study on TL;DR Summarization", and the ICLR 2024 blog post "The N
Implementation Details of RLHF with PPO"; OpenAI's lm-human-preferences is the reference code):

1. **Reward normalisation** (Ziegler et al. 2019 §2.2): before training, a gain and a bias are
   fitted so the scores of the INITIAL policy's samples (``reward_norm_batches`` rollout
   batches) have mean 0 and standard deviation 1: ``s' = g·s + b`` with ``g = 1/σ``,
   ``b = −μ/σ``. They are fixed for the run and saved in every checkpoint.
2. **KL penalty per token, score at EOS** (Ziegler et al. 2019 Eq. 2; Ouyang et al. 2022 Eq. 2):
   ``R_t = −β·kl_t`` on every response token plus the score on the last one
   (``rl.compute_rewards``; estimator ``k1`` by default).
3. **EOS truncation and missing-EOS penalty**: a response ends at its first EOS (kept, scored;
   later tokens masked, ``generation.generate``). A response with no EOS within
   ``max_new_tokens`` gets ``missing_eos_penalty`` subtracted from its score (TRL's former
   ``PPOTrainer``) or its score replaced by ``−missing_eos_penalty`` (lm-human-preferences'
   ``penalty_reward_value``; ``missing_eos_mode="replace"``).
4. **Temperature-scaled log-probs**: rollouts sample at temperature τ with top-k 0 and top-p 1;
   the log-probs of the sampled tokens are RECOMPUTED with a forward pass, ``log softmax(z/τ)``,
   for the policy (old and new) and the reference alike; ``generate``'s scores are not used.
5. **Reward whitening** (optional, ``whiten_rewards``): shaped rewards rescaled to unit variance
   over the batch, mean kept (TRL's ``whiten_rewards``).
6. **Advantage whitening** over the batch (``whiten_advantages``, on by default).
7. **Value model initialised from the reward model** (a trainable copy; a
   ``*ForSequenceClassification`` with ``num_labels=1`` whose per-token head output is V(s_t),
   ``models.token_scores``). Without a reward model: the policy's backbone with a new head.
8. **Value clipping** (PPO2): ``½·max((V−R)², (V_clip−R)²)``, ``clip_range_value``.
9. **Adaptive KL controller** (Ziegler et al. 2019 §2.2) or a fixed β (``kl_control``).
10. **Dropout off** in the policy, reference, reward and value models (module ``p`` and config
    probabilities set to 0), so the old log-probs of the rollout and the new log-probs of the
    first PPO epoch agree exactly (ratio 1). Rollouts, scoring and evaluation run in
    ``eval()`` mode; the optimisation passes call ``train()``, which changes nothing once
    dropout is 0 but keeps train-mode-only machinery (e.g. gradient checkpointing) working.
11. **Minibatches × epochs with gradient accumulation**: each update's rollout batch is
    shuffled and split ``ppo_epochs`` times; an optimizer step sees
    ``mini_batch_size × gradient_accumulation_steps`` responses (``Accelerator.accumulate``).
12. **Left-padded queries with position ids from the attention mask**, so a prompt's log-probs
    and values do not depend on its padding (``logprobs.causal_lm_logits``).
13. **GAE with γ = 1, λ = 0.95**, value targets = λ-returns (Schulman et al. 2016).
14. **Adam ε = 1e-5** (lm-human-preferences' value, Huang et al. 2024) and a learning-rate
    schedule stepped once per update.
15. **Checkpoint and resume with Accelerate**: ``save_state``/``load_state`` hold the policy and
    value weights, optimizer, scheduler and RNG states (python, numpy, torch) and the small state
    registered with ``register_for_checkpointing`` (the update counter, the KL controller and the
    reward-normalisation statistics); Accelerate names the folders and keeps ``save_total_limit``
    of them (``checkpoint``). Prompt batches are a pure function of ``(seed, update)`` and each
    ``generate`` call of a rollout draws from a seed of ``(seed, update, row)``, so a resumed run ends
    with exactly the weights of an uninterrupted one.
16. **Data parallel as one process** (``accelerate launch``, ``rlhf_core.trainers.online``): with N
    processes of ``rollout_batch_size`` prompts each, the update's prompts and samples are those of one
    process given ``N × rollout_batch_size``; whitening uses the whole batch's statistics and the
    losses' token means every process's tokens, so with one mini-batch per update the weights match
    one process's (several mini-batches differ only in how the shuffled rows are grouped).

Evaluation (at update 0 with ``eval_on_start``, every ``eval_steps`` updates and at the end) samples
one response per held-out prompt at the rollout temperature from a fixed seed (``eval_do_sample=True``,
so evaluations at different steps see the same random numbers and do not touch the training RNG) or
greedily, and reports the normalised score, the KL to the reference (k1, summed over response tokens)
and the monitor (gold) reward, plus the point of the over-optimisation curve (``eval/overopt/...``:
the reward model's raw score, gold, KL and sqrt(KL); ``rlhf_core.overoptimization``). With
``best_metric`` the output is the policy (and value model) of the best evaluation
(``rlhf_core.trainers.online``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_core.lazy_exports import lazy_exports

# Re-exported lazily (PEP 562): ``ppo.config`` is torch-free, so checking ``params.yaml`` (``tasks.preflight``)
# imports PPOConfig without the trainer's torch and transformers.
_EXPORTS: dict[str, str] = {
    "PPOConfig": "rlhf_core.trainers.ppo.config",
    "PPOResult": "rlhf_core.trainers.ppo.train",
    "PPOState": "rlhf_core.trainers.ppo.checkpoint",
    "PPOTrainer": "rlhf_core.trainers.ppo.trainer",
    "PolicyAndValue": "rlhf_core.trainers.ppo.models",
    "RewardNorm": "rlhf_core.trainers.ppo.rollout",
    "Rollout": "rlhf_core.trainers.ppo.rollout",
    "SamplesFn": "rlhf_core.trainers.ppo.trainer",
    "disable_dropout": "rlhf_core.trainers.ppo.models",
    "response_logprobs": "rlhf_core.rollout",
    "saved_checkpoints": "rlhf_core.trainers.online",
    "train_ppo": "rlhf_core.trainers.ppo.train",
    "value_model_from_policy": "rlhf_core.trainers.ppo.models",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # also what tests/test_stage_deps.py follows to the modules
    from rlhf_core.rollout import response_logprobs
    from rlhf_core.trainers.online import saved_checkpoints
    from rlhf_core.trainers.ppo.checkpoint import PPOState
    from rlhf_core.trainers.ppo.config import PPOConfig
    from rlhf_core.trainers.ppo.models import PolicyAndValue, disable_dropout, value_model_from_policy
    from rlhf_core.trainers.ppo.rollout import RewardNorm, Rollout
    from rlhf_core.trainers.ppo.train import PPOResult, train_ppo
    from rlhf_core.trainers.ppo.trainer import PPOTrainer, SamplesFn

__getattr__ = lazy_exports(__name__, _EXPORTS)
