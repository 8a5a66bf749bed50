"""Trainers: SFT, reward model and DPO on transformers' ``Trainer``; PPO on Accelerate.

Each takes normalised records, a typed config and a ``log_fn(metrics, step)`` callback,
checkpoints every ``save_steps`` and resumes from the latest checkpoint.
"""
