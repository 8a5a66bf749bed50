"""GPU benchmark of our trainers and rollouts on a ~0.4B Llama: SFT and DPO tokens/s and MFU, rollout tokens/s.

    python -m bench.gpu [--json gpu.json] [--peak-tflops 989] [--phases sft,dpo,rollout]   # on a GPU machine
    python -m bench.gpu --tiny --device cpu                                                  # the CPU smoke size

The model is built here, randomly initialised (``transformers.LlamaConfig``: hidden 1024, 24 layers,
16 heads, MLP 2816, vocabulary 32 000, untied head: 0.37 B parameters; nothing is downloaded). The
tokenizer is a word-level one with the project's special tokens and chat template, so that every word
of the generated texts is exactly one token: every sequence has exactly ``--seq-len`` tokens, no
padding, and tokens per step are known exactly.

What is measured, each phase in a fresh worker process (``bench.common.run_worker``):

* ``sft``: ``rlhf_core.trainers.sft.train_sft`` (transformers ``Trainer``), bf16 mixed precision
  (fp32 weights, bf16 autocast: ``precision="bf16"``, as the pipeline runs on a GPU), no activation
  checkpointing, ``--sft-batch`` sequences of ``--seq-len`` tokens per optimizer step.
* ``dpo``: ``rlhf_core.trainers.dpo.train_dpo``, ``reference="precomputed"`` (the pipeline's default):
  the reference log-probs are computed once before training, outside the timed window (their time is
  in ``setup s``); each step is the policy's forward + backward over chosen + rejected
  (``--dpo-batch`` pairs = 2 × ``--dpo-batch`` sequences of ``--seq-len`` tokens).
* ``rollout``: response tokens/s (up to and including the first EOS) of ``--rollout-rows`` rows of
  ``--new-tokens`` new tokens, bf16 weights, plain ancestral sampling (τ = 1, top-k 0, top-p 1), through
  (a) ``rlhf_core.rollout.sample_batch`` with ``group_size`` (what ``GRPOTrainer.sample`` calls),
  (b) the generation phase of PPO's ``RolloutCollector.collect`` (its own ``timing`` log), and
  (c) a plain ``model.generate`` on the same left-padded prompts and settings; ratio = ours / plain.

Throughput is taken between the end of step ``--warmup`` and the end of the last step (CUDA
synchronised at each stamp). Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, app. B):

    F = 6·N + 12·L·h·T

N = weights of the matrix multiplications (every ``nn.Linear``, the LM head included; the input
embedding is a lookup and is not counted), L layers, h hidden size, T sequence length (full T: no
discount for the causal mask, as PaLM and Megatron count). MFU = tokens/s · F / peak, the peak being the
GPU's dense bf16 FLOP/s (``PEAK_BF16_DENSE``, or ``--peak-tflops``); unknown peak: MFU is not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PHASES = ("sft", "dpo", "rollout")
PEAK_BF16_DENSE = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
"""Dense bf16 tensor-core FLOP/s by a substring of ``torch.cuda.get_device_name`` (first match; NVIDIA
datasheets, without sparsity). "H100" alone is the SXM part (its names read e.g. "NVIDIA H100 80GB HBM3")."""
TARGETS = {"dpo_mfu": 0.40, "rollout_ratio": 0.90}


@dataclass
class BenchConfig:
    """Model shape and workload of one benchmark (every phase's worker gets it whole)."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 2816
    vocab: int = 32_000
    seq_len: int = 1024
    """Tokens of every training sequence (prompt + completion + EOS)."""
    prompt_len: int = 128
    """Prompt tokens (chat-template role markers included) of training and rollout examples."""
    sft_batch: int = 16
    dpo_batch: int = 8
    """Preference pairs per step: the policy runs over twice as many sequences."""
    steps: int = 50
    warmup: int = 10
    rollout_rows: int = 64
    group_size: int = 4
    """Responses per prompt of the GRPO path: ``rollout_rows / group_size`` distinct prompts."""
    new_tokens: int = 256
    repeats: int = 3
    """Timed generations per rollout path (median reported), after one untimed warm-up call."""
    device: str = "cuda"
    precision: str = "bf16"
    seed: int = 0
    work_dir: str = ""

    def __post_init__(self) -> None:
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden ({self.hidden}) must split into {self.heads} heads of even size")
        if not 2 < self.prompt_len < self.seq_len - 1:
            raise ValueError(f"prompt_len must be in (2, seq_len - 1 = {self.seq_len - 1}), got {self.prompt_len}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        if self.rollout_rows % self.group_size:
            raise ValueError(f"rollout_rows ({self.rollout_rows}) must be a multiple of group_size ({self.group_size})")
        if min(self.sft_batch, self.dpo_batch, self.new_tokens, self.repeats, self.vocab - 6) < 1:
            raise ValueError("batches, new_tokens and repeats must be >= 1, vocab > 6")


TINY = dict(hidden=64, layers=2, heads=4, intermediate=176, vocab=512, seq_len=32, prompt_len=8, sft_batch=4, dpo_batch=2,
            steps=2, warmup=1, rollout_rows=4, group_size=2, new_tokens=8, repeats=1)
"""``--tiny``: a shape and workload that run on a CPU in seconds (the smoke test's)."""


# ------------------------------------------------------------------------------- model and data


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with the project's special tokens (pad 0, bos 1, eos 2, roles) and chat template.

    Words are ``w0, w1, ...`` up to ``vocab_size`` entries; each is one token, so a text of n words is n tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_core.models.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(vocab_size - len(SPECIAL_TOKENS))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   additional_special_tokens=list(ROLE_TOKENS.values()), padding_side="right",
                                   chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, cfg: BenchConfig):
    """A randomly initialised ``LlamaForCausalLM`` of ``cfg``'s shape, built on ``cfg.device`` (fp32 weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=max(cfg.seq_len, cfg.prompt_len + cfg.new_tokens), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):  # initialise in place: 0.4 B weights are slow to draw on a CPU
        return LlamaForCausalLM(config)


def matmul_params(model) -> int:
    """N of the FLOP count: weights of every ``nn.Linear`` (the LM head included, the embedding lookup not)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def train_flops_per_token(n_matmul: int, layers: int, hidden: int, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6·N (matmuls) + 12·L·h·T (attention scores and mixing, full T)."""
    return 6.0 * n_matmul + 12.0 * layers * hidden * seq_len


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Dense bf16 FLOP/s of the GPU: ``override_tflops``·1e12, else ``PEAK_BF16_DENSE``'s first match, else ``None``."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16_DENSE:
        if device_name and key.lower() in device_name.lower():
            return peak
    return None


def _words(rng: random.Random, n: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(vocab_size - 6)}" for _ in range(n))


def make_records(kind: str, n: int, cfg: BenchConfig, seed: int):
    """``n`` normalised records of exact token lengths: a prompt of ``prompt_len`` tokens (2 of them role markers) and
    completions of ``seq_len − prompt_len − 1`` words + EOS (``kind``: sft, preference or prompt)."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _words(rng, cfg.prompt_len - 2, cfg.vocab)
        row: dict[str, Any] = {"prompt": prompt, "prompt_messages": [{"role": "user", "content": prompt}]}
        completions = {"sft": ("completion",), "preference": ("chosen", "rejected"), "prompt": ()}[kind]
        row.update({c: _words(rng, cfg.seq_len - cfg.prompt_len - 1, cfg.vocab) for c in completions})
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _check_lengths(tokenizer, records, cfg: BenchConfig) -> None:
    """Every sequence must be exactly ``seq_len`` tokens, or tokens/step (and so MFU) would be wrong."""
    from rlhf_core.data.tokenize import encode_completions, encode_prompts

    row = records[0]
    prompt = encode_prompts(tokenizer, [row["prompt"]], [row["prompt_messages"]])[0]
    column = "completion" if "completion" in row else "chosen"
    total = len(prompt) + len(encode_completions(tokenizer, [row[column]])[0])
    if len(prompt) != cfg.prompt_len or total != cfg.seq_len:
        raise RuntimeError(f"records are {len(prompt)} + {total - len(prompt)} tokens, planned {cfg.prompt_len} + "
                           f"{cfg.seq_len - cfg.prompt_len}: the word tokenizer no longer maps a word to one token")


# ------------------------------------------------------------------------------------ training


def _training_phase(phase: str, cfg: BenchConfig) -> dict[str, Any]:
    """Train ``cfg.steps`` steps with our SFT or DPO trainer; tokens/s, FLOP/s, MFU inputs and memory."""
    import torch
    from transformers import TrainerCallback

    from bench.common import PeakMemory, StepClock
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.clock = StepClock(cfg.warmup, sync=torch.cuda.synchronize if cfg.device == "cuda" else None)
            self.memory, self.began, self.peak_mb, self.losses, self.optimizer = PeakMemory(cfg.device), 0.0, 0.0, [], ""

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()
            self.optimizer = type(getattr(kwargs.get("optimizer"), "optimizer", kwargs.get("optimizer"))).__name__
            self.memory.reset()
            self.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_mb = self.memory.peak_mb()  # training only: the final evaluation comes after

    tokenizer = word_tokenizer(cfg.vocab)
    model = build_model(tokenizer, cfg)
    batch = cfg.sft_batch if phase == "sft" else cfg.dpo_batch
    kind = "sft" if phase == "sft" else "preference"
    train, held_out = make_records(kind, batch * cfg.steps, cfg, cfg.seed), make_records(kind, batch, cfg, cfg.seed + 1)
    _check_lengths(tokenizer, train, cfg)
    common = dict(
        output_dir=str(Path(cfg.work_dir) / phase), seed=cfg.seed, max_steps=cfg.steps, per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch, max_length=cfg.seq_len, precision=cfg.precision, logging_steps=1, progress=False,
        resume=False, extra_args={"eval_strategy": "no", "save_strategy": "no", "use_cpu": cfg.device == "cpu"},
    )
    probe = Probe()
    started = time.perf_counter()
    if phase == "sft":
        result = train_sft(model, tokenizer, train, held_out, SFTConfig(learning_rate=1e-4, **common), callbacks=[probe])
    else:
        dpo_cfg = DPOConfig(learning_rate=1e-5, reference="precomputed", eval_on_start=False, overopt_prompts=0, **common)
        result = train_dpo(model, tokenizer, train, held_out, dpo_cfg, callbacks=[probe])
    if len(probe.clock.step_times) != cfg.steps or result.train_stats.n_completion_truncated:
        raise RuntimeError(f"{phase}: {len(probe.clock.step_times)} of {cfg.steps} steps ran, "
                           f"{result.train_stats.n_completion_truncated} completions truncated")
    sequences = batch * (1 if phase == "sft" else 2)
    tokens_per_step = sequences * cfg.seq_len
    steps_per_s = probe.clock.steps_per_second()
    flops_per_token = train_flops_per_token(matmul_params(model), cfg.layers, cfg.hidden, cfg.seq_len)
    return {
        "phase": phase, "sequences_per_step": sequences, "seq_len": cfg.seq_len, "tokens_per_step": tokens_per_step,
        "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * tokens_per_step, "flops_per_token": flops_per_token,
        "flops_per_s": steps_per_s * tokens_per_step * flops_per_token, "timed_steps": probe.clock.timed_steps,
        "setup_s": probe.began - started, "peak_mb": probe.peak_mb, "losses": probe.losses,
        "optimizer": probe.optimizer,
    }


# ------------------------------------------------------------------------------------- rollout


def _timed(fn: Callable[[], float], device: str) -> tuple[float, float]:
    """(seconds, tokens) of ``fn()``, which returns the tokens it produced; CUDA synchronised at both ends."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    tokens = fn()
    sync()
    return time.perf_counter() - start, tokens


def _rollout_phase(cfg: BenchConfig) -> dict[str, Any]:
    """Response tokens/s of our GRPO sampling and PPO rollout collection against plain ``model.generate``."""
    import torch

    from bench.common import PeakMemory, median
    from rlhf_core.data.collate import pad
    from rlhf_core.reward_sources import CombinedReward
    from rlhf_core.rollout import PROMPT_TEXT, sample_batch, tokenize_prompt_records
    from rlhf_core.trainers.ppo import PPOConfig
    from rlhf_core.trainers.ppo.models import PolicyAndValue, value_model_from_policy
    from rlhf_core.trainers.ppo.rollout import RewardNorm, RolloutCollector

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    tokenizer = word_tokenizer(cfg.vocab)
    policy = build_model(tokenizer, cfg).to(dtype).eval()
    memory = PeakMemory(cfg.device)
    n_prompts = cfg.rollout_rows // cfg.group_size
    records = tokenize_prompt_records(make_records("prompt", n_prompts, cfg, cfg.seed), tokenizer,
                                      max_length=cfg.prompt_len + cfg.new_tokens, max_new_tokens=cfg.new_tokens, what="bench")
    prompts = [list(p) for p in records["prompt_input_ids"]]
    rows = [p for p in prompts for _ in range(cfg.group_size)]  # the GRPO layout: k consecutive rows per prompt
    texts = [t for t in records[PROMPT_TEXT] for _ in range(cfg.group_size)]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = pad(rows, pad_id, left=True).to(cfg.device)  # (N, Q)
    mask = pad([[1] * len(p) for p in rows], 0, length=ids.shape[1], left=True).to(cfg.device)  # (N, Q)

    def plain() -> float:
        out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.new_tokens, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id, eos_token_id=eos_id)
        response = out[:, ids.shape[1]:]  # (N, R)
        is_eos = (response == eos_id).int()
        return float(((torch.cumsum(is_eos, dim=1) - is_eos) == 0).sum())  # tokens up to and including the first EOS

    def grpo() -> float:
        batch = sample_batch(policy, tokenizer, prompts, max_new_tokens=cfg.new_tokens, temperature=1.0,
                             batch_size=cfg.rollout_rows, group_size=cfg.group_size)
        return float(batch.response_mask.sum())

    ppo_cfg = PPOConfig(output_dir=str(Path(cfg.work_dir) / "ppo"), max_new_tokens=cfg.new_tokens, temperature=1.0,
                        max_length=cfg.prompt_len + cfg.new_tokens, forward_batch_size=cfg.rollout_rows,
                        rollout_batch_size=cfg.rollout_rows, mini_batch_size=cfg.rollout_rows, precision=cfg.precision)
    collector = RolloutCollector(ppo_cfg, policy, None, CombinedReward({"length": lambda p, r: [len(x) for x in r]}),
                                 tokenizer)
    policy_and_value = PolicyAndValue(policy, value_model_from_policy(policy, pad_id).eval())
    ppo_scoring: list[float] = []

    def ppo() -> tuple[float, float]:
        _, timing = collector.collect(policy_and_value, rows, texts, RewardNorm())
        ppo_scoring.append(timing["scoring"])
        return timing["generation"], timing["generated_tokens"]

    memory.reset()
    rates: dict[str, list[float]] = {"plain": [], "grpo": [], "ppo": []}
    for r in range(-1, cfg.repeats):  # round -1 warms every path up (CUDA kernels, allocator) and is not kept
        order = ("plain", "grpo", "ppo") if r % 2 == 0 else ("ppo", "grpo", "plain")  # alternate who goes first
        for name in order:
            torch.manual_seed(cfg.seed + r)
            if name == "ppo":
                seconds, tokens = ppo()  # the collector's own generation timing (its scoring is timed apart)
            else:
                seconds, tokens = _timed(plain if name == "plain" else grpo, cfg.device)
            if r >= 0:
                rates[name].append(tokens / seconds)
    tps = {name: median(values) for name, values in rates.items()}
    return {
        "phase": "rollout", "rows": cfg.rollout_rows, "group_size": cfg.group_size, "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens, "plain_tokens_per_s": tps["plain"], "grpo_tokens_per_s": tps["grpo"],
        "ppo_tokens_per_s": tps["ppo"], "grpo_ratio": tps["grpo"] / tps["plain"], "ppo_ratio": tps["ppo"] / tps["plain"],
        "ppo_scoring_s": median(ppo_scoring[1:]), "runs": rates, "peak_mb": memory.peak_mb(),
    }


def run_phase(phase: str, cfg: BenchConfig) -> dict[str, Any]:
    """One phase in this process (the CLI runs each in its own worker process)."""
    import torch

    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: torch sees no CUDA device")
    return _rollout_phase(cfg) if phase == "rollout" else _training_phase(phase, cfg)


# -------------------------------------------------------------------------------------- report


def format_report(results: dict[str, dict[str, Any]], peak: float | None) -> str:
    """Training table (tokens/s, achieved TFLOP/s, MFU against ``peak``) and rollout table (ratio to plain generate)."""
    from bench.common import markdown_table

    def mfu(r: dict[str, Any]) -> str:
        return f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a (unknown peak: --peak-tflops)"

    parts = []
    trained = [results[p] for p in ("sft", "dpo") if p in results]
    if trained:
        parts.append(markdown_table(
            ["phase", "sequences × tokens / step", "steps/s", "tokens/s", "TFLOP/s", "MFU", "target", "setup s", "peak MB"],
            [[r["phase"], f"{r['sequences_per_step']} × {r['seq_len']}", f"{r['steps_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['flops_per_s'] / 1e12:.3g}", mfu(r), f"≥ {TARGETS['dpo_mfu']:.0%}" if r["phase"] == "dpo" else "",
              f"{r['setup_s']:.1f}", f"{r['peak_mb']:,.0f}"] for r in trained]))
    if "rollout" in results:
        r = results["rollout"]
        shape = f"{r['rows']} × {r['new_tokens']}"
        target = f"≥ {TARGETS['rollout_ratio']:.2f}×"
        parts.append(markdown_table(
            ["rollout path", "rows × new tokens", "response tokens/s", "ours / plain", "target"],
            [["plain model.generate", shape, f"{r['plain_tokens_per_s']:,.0f}", "1.00×", ""],
             [f"GRPO: rollout.sample_batch (group {r['group_size']})", shape, f"{r['grpo_tokens_per_s']:,.0f}",
              f"{r['grpo_ratio']:.2f}×", target],
             ["PPO: RolloutCollector.collect, generation", shape, f"{r['ppo_tokens_per_s']:,.0f}", f"{r['ppo_ratio']:.2f}×",
              f"{target} (scoring {r['ppo_scoring_s']:.2f} s apart)"]]))
    return "\n\n".join(parts)


def environment(cfg: BenchConfig) -> dict[str, Any]:
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, a few steps: runs on a CPU in seconds")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of sft,dpo,rollout")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees one")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, overriding the table")
    parser.add_argument("--in-process", action="store_true", help="run the phases in this process, not one worker each")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one phase, in this process
    for f in fields(BenchConfig):
        if f.name not in ("device", "work_dir"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                                help=f"default {f.default} ({TINY.get(f.name, f.default)} with --tiny)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args, BenchConfig()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose from {','.join(PHASES)}, got {args.phases}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    values = {**(TINY if args.tiny else {}), "device": device}
    values.update({f.name: getattr(args, f.name) for f in fields(BenchConfig) if getattr(args, f.name, None) is not None})
    try:
        return args, BenchConfig(**values)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker.read_text())
        result = run_phase(spec["phase"], BenchConfig(**spec["config"]))
        Path(spec["result_path"]).write_text(json.dumps(result))
        return result
    from bench.common import OFFLINE_ENV, run_worker

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    began = time.perf_counter()
    env = environment(cfg)
    peak = peak_flops(env["device"] if cfg.device == "cuda" else None, args.peak_tflops)
    env["peak_bf16_flops"] = peak
    print(f"environment: {json.dumps(env)}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        cfg.work_dir = cfg.work_dir or tmp
        for phase in args.phases:
            started = time.perf_counter()
            if args.in_process:
                results[phase] = run_phase(phase, cfg)
            else:
                results[phase] = run_worker("bench.gpu", {"phase": phase, "config": asdict(cfg)}, timeout_s=540)
            print(f"{phase}: done in {time.perf_counter() - started:.0f} s", flush=True)
    model = build_model(word_tokenizer(cfg.vocab), BenchConfig(**{**asdict(cfg), "device": "meta"}))  # shape only: counts
    n_total, n_matmul = sum(p.numel() for p in model.parameters()), matmul_params(model)
    command = "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command.strip()}  # {time.perf_counter() - began:.0f} s wall, {env['device']}, "
          f"Llama {cfg.layers}×{cfg.hidden} (heads {cfg.heads}, MLP {cfg.intermediate}, vocab {cfg.vocab}): "
          f"{n_total / 1e6:.3g} M parameters, N = {n_matmul / 1e6:.3g} M in matmuls; "
          f"F = 6·N + 12·L·h·T = {train_flops_per_token(n_matmul, cfg.layers, cfg.hidden, cfg.seq_len):.3g} FLOP/token\n")
    report = format_report(results, peak)
    print(report)
    out = {"command": command.strip(), "environment": env, "config": asdict(cfg), "parameters": n_total,
           "matmul_parameters": n_matmul, "flops_formula": "6*N + 12*L*h*T per trained token", "targets": TARGETS,
           "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
