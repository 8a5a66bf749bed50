"""PPO step time split into generation, scoring and training; our generation against plain ``generate``.

    python -m bench.ppo_step [--updates 8] [--batch 64] [--new-tokens 16] [--threads 1] [--device cpu]

Setup (not timed): the synthetic task, a tokenizer, a tiny GPT-2 SFT-trained briefly so it emits
EOS like a real policy, and a reward model from it. Then ``train_ppo`` runs ``--updates`` updates
and each phase's wall time is read from its ``timing/*`` logs (medians over updates after the
first). Generation throughput (response tokens up to EOS per second) of ``rlhf_core.generation``
is compared with a bare ``model.generate`` call on the same model, prompts and sampling settings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import OFFLINE_ENV, markdown_table, median


def setup(work: Path, device: str):
    from rlhf_core.data.formats import normalize
    from rlhf_core.data.loading import load_records
    from rlhf_core.models import (
        TinyModelConfig,
        build_tiny_causal_lm,
        load_causal_lm,
        load_reward_model,
        save_model,
        train_tokenizer,
    )
    from rlhf_core.synthetic import generate_task
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    generate_task(work / "task", seed=0, n_sft=1000, n_pref_train=200, n_pref_test=50, n_prompts=256)
    sft = normalize(load_records(work / "task" / "sft.jsonl"), kind="sft")
    prompts = normalize(load_records(work / "task" / "prompts.jsonl"), kind="prompt")
    tok = train_tokenizer([r["prompt"] for r in sft] + [r["completion"] for r in sft], vocab_size=512)
    model = build_tiny_causal_lm(tok, TinyModelConfig(hidden_size=128, n_layer=2, max_positions=64), seed=0)
    result = train_sft(model, tok, sft, sft.select(range(64)), SFTConfig(
        output_dir=str(work / "sft-ckpt"), max_steps=80, learning_rate=2e-3, eval_steps=80, save_steps=10_000,
        logging_steps=80, max_length=64, progress=False, resume=False))
    save_model(result.model, tok, work / "sft")
    return tok, prompts, load_causal_lm(str(work / "sft")).to(device), load_reward_model(str(work / "sft")).to(device)


def plain_generate_tokens_per_s(model, tok, prompt_ids: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Bare ``model.generate`` on the same left-padded batch; counts response tokens up to EOS."""
    import torch

    from rlhf_core.data.collate import pad

    input_ids = pad(prompt_ids, tok.pad_token_id, left=True)  # (B, T) left-padded, as generation wants
    batch = {"input_ids": input_ids, "attention_mask": pad([[1] * len(p) for p in prompt_ids], 0, left=True)}
    batch = {k: v.to(model.device) for k, v in batch.items()}
    rates = []
    for r in range(repeats):
        torch.manual_seed(r)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        elapsed = time.perf_counter() - start
        responses = out[:, batch["input_ids"].shape[1]:]
        is_eos = (responses == tok.eos_token_id).int()
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0  # tokens after the first EOS
        rates.append(float((~after_eos).sum()) / elapsed)
    return median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
    from rlhf_core.trainers.ppo import PPOConfig, train_ppo

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        tok, prompts, policy, reward_model = setup(work, args.device)
        logs: list[dict[str, float]] = []
        cfg = PPOConfig(output_dir=str(work / "ppo"), max_updates=args.updates, rollout_batch_size=args.batch,
                        mini_batch_size=16, ppo_epochs=4, max_new_tokens=args.new_tokens, eval_steps=10_000,
                        save_steps=10_000, logging_steps=1, progress=False, reward_norm_batches=1)
        started = time.perf_counter()
        train_ppo(policy, None, reward_model, tok, prompts, prompts.select(range(32)), cfg, log_fn=lambda m, s: logs.append(m))
        total = time.perf_counter() - started
        steps = [m for m in logs if "timing/generation" in m][1:]  # drop the first update (warm-up)
        gen, score, train = (median([m[f"timing/{k}"] for m in steps]) for k in ("generation", "scoring", "training"))
        ours_tps = median([m["timing/generated_tokens"] / m["timing/generation"] for m in steps])
        tokenized, _ = tokenize_prompts(prompts.select(range(args.batch)), tok, TruncationConfig(max_length=64))
        plain_tps = plain_generate_tokens_per_s(policy, tok, [list(p) for p in tokenized["prompt_input_ids"]],
                                                args.new_tokens, repeats=max(3, len(steps)))
    step = gen + score + train
    print(f"PPO, tiny GPT-2 (2x128), batch {args.batch}, {args.new_tokens} new tokens, {args.updates} updates "
          f"({total:.1f}s with setup of rollouts), torch threads {torch.get_num_threads()}, device {args.device}\n")
    print(markdown_table(["phase", "seconds / update (median)", "share"], [
        ["generation", f"{gen:.3f}", f"{gen / step:.0%}"], ["scoring (policy, ref, value, RM)", f"{score:.3f}", f"{score / step:.0%}"],
        ["training (4 epochs x 4 minibatches)", f"{train:.3f}", f"{train / step:.0%}"], ["total", f"{step:.3f}", "100%"]]))
    print()
    print(markdown_table(["generation", "response tokens/s", "ratio"], [
        ["rlhf_core.generation.generate", f"{ours_tps:.0f}", f"{ours_tps / plain_tps:.2f}x"],
        ["plain model.generate", f"{plain_tps:.0f}", "1.00x"]]))


if __name__ == "__main__":
    main()
