"""Training throughput: our SFT, reward-model and DPO trainers against TRL 1.16's, on identical work.

    python -m bench.train_throughput [--runs 3] [--steps 30] [--trainers sft,reward,dpo]
                                     [--batch-size 16] [--device cpu|cuda] [--json results.json]

What both sides share, so that only the trainer code differs:

* the model: one tiny GPT-2 saved once and loaded by every run (the reward model gets its score head
  from ``load_reward_model(seed=0)`` on both sides), fp32, dropout 0;
* the data: the project's synthetic task (``rlhf_core.synthetic.generate_task``), normalised once.
  Ours tokenises ``prompt_messages`` through the chat template; TRL gets the same chat template
  rendered to text plus the completion text, which the tokenizer splits at the same special
  tokens, and appends the same EOS, so both see the same token sequences (the first-step losses
  and the whole loss curves are compared to prove it); every sequence fits ``max_length``, so
  neither side's truncation rule is used;
* the optimisation: batch size, AdamW (transformers' default), learning rate, linear schedule
  and its warm-up, gradient clipping, seed and data order; activation checkpointing off; DPO with
  reference log-probs precomputed before training on both; a log every step.

The settings each side's ``Trainer`` actually ran with are recorded and compared (``settings``),
so a silently different default on either side shows up in the report.

Timing: a callback stamps the end of every optimizer step; steps/s is taken between the end of
step ``--warmup`` and the end of the last step, so setup (tokenisation, reference log-probs, model
preparation) is outside it and reported on its own, and so is steps per CPU second. Each run is a
fresh process with ``--threads`` torch threads (default 1: see ``docs/benchmarks.md``); peak memory
is the RSS high-water mark from start to the end of training (CUDA: ``max_memory_allocated``), and
the training window's growth over the memory held when it began is reported too. Ours and TRL's
runs alternate so that load from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import PreTrainedTokenizerBase, TrainerCallback

from bench.common import PeakMemory, StepClock, markdown_table, median, run_worker

TRAINERS = ("sft", "reward", "dpo")
IMPLS = ("ours", "trl")
LEARNING_RATES = {"sft": 5e-4, "reward": 5e-4, "dpo": 5e-4}
"""Large enough that every loss curve moves, so diverging inputs would show in max |Δloss|."""
LR_WARMUP_RATIO = 0.1
DPO_BETA = 0.1
COMPARED_SETTINGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "seed", "data_seed", "bf16", "fp16", "activation_checkpointing", "max_steps", "logging_steps",
    "eval_strategy", "save_strategy", "dataloader_num_workers", "torch_compile",
)
"""``TrainingArguments`` fields that must be equal on both sides for the comparison to be fair."""


# --------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Files every run of one benchmark shares: the saved model + tokenizer and normalised records."""

    root: str
    n_train: int
    n_eval: int
    max_length: int
    vocab_size: int = 0
    longest_sequence: int = 0

    @property
    def model_dir(self) -> str:
        return str(Path(self.root) / "model")

    def records_path(self, kind: str, split: str) -> Path:
        return Path(self.root) / f"{kind}_{split}.jsonl"


def prepare_workload(
    root: str | Path,
    *,
    n_train: int,
    n_eval: int = 32,
    max_length: int = 128,
    vocab_size: int = 512,
    n_layer: int = 2,
    hidden_size: int = 128,
    n_head: int = 4,
    seed: int = 0,
) -> Workload:
    """Generate the synthetic task, normalise it, train the tokenizer and save a tiny GPT-2 into ``root``.

    Raises ``ValueError`` if a prompt + completion would not fit ``max_length``: TRL and we truncate
    by different rules, so a truncated example would make the two sides train on different tokens.
    """
    from rlhf_core.data.formats import normalize
    from rlhf_core.data.tokenize import encode_completions, encode_prompts
    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, save_model, train_tokenizer
    from rlhf_core.synthetic import generate_task

    root = Path(root)
    raw = root / "synthetic"
    generate_task(raw, seed=seed, n_sft=n_train + n_eval, n_pref_train=n_train, n_pref_test=n_eval, n_prompts=8)
    sft = normalize(_read_jsonl_dataset(raw / "sft.jsonl"), "sft")
    pref = {split: normalize(_read_jsonl_dataset(raw / f"preferences_{split}.jsonl"), "preference") for split in ("train", "test")}
    texts = [*sft["prompt"], *sft["completion"], *pref["train"]["chosen"], *pref["train"]["rejected"]]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)

    workload = Workload(root=str(root), n_train=n_train, n_eval=n_eval, max_length=max_length, vocab_size=len(tokenizer))
    splits = {
        ("sft", "train"): sft.select(range(n_train)),
        ("sft", "eval"): sft.select(range(n_train, n_train + n_eval)),
        ("preference", "train"): pref["train"],
        ("preference", "eval"): pref["test"],
    }
    longest = 0
    for (kind, split), ds in splits.items():
        rows = ds.to_list()
        prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], [r["prompt_messages"] for r in rows])
        for column in ("completion",) if kind == "sft" else ("chosen", "rejected"):
            for p, c in zip(prompts, encode_completions(tokenizer, [r[column] for r in rows])):
                longest = max(longest, len(p) + len(c))
        _write_jsonl(workload.records_path(kind, split), rows)
    if longest > max_length:
        raise ValueError(f"the longest prompt + completion has {longest} tokens > max_length={max_length}; raise --max-length")
    workload.longest_sequence = longest

    model_cfg = TinyModelConfig(arch="gpt2", n_layer=n_layer, hidden_size=hidden_size, n_head=n_head, max_positions=max_length)
    save_model(build_tiny_causal_lm(tokenizer, model_cfg, seed=seed), tokenizer, workload.model_dir)
    return workload


def _read_jsonl_dataset(path: Path) -> datasets.Dataset:
    """An in-memory dataset (no Arrow cache files: every run tokenises from scratch, on both sides)."""
    with path.open(encoding="utf-8") as fh:
        return datasets.Dataset.from_list([json.loads(line) for line in fh if line.strip()])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _trl_text(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, columns: tuple[str, ...]) -> datasets.Dataset:
    """TRL's plain-text form of normalised records: the chat-template-rendered prompt plus ``columns``."""
    rows = ds.to_list()
    prompts = [tokenizer.apply_chat_template(r["prompt_messages"], add_generation_prompt=True, tokenize=False) for r in rows]
    return datasets.Dataset.from_dict({"prompt": prompts, **{c: [r[c] for r in rows] for c in columns}})


# -------------------------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One measured run: one trainer, one implementation, in its own process."""

    trainer: str
    impl: str
    workload: dict[str, Any]
    output_dir: str
    steps: int = 30
    warmup: int = 5
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    threads: int = 1
    """torch intra-op threads; 0 keeps torch's default (one per core)."""
    padding_free: bool = False
    """Ours: ``TrainConfig.padding_free`` (packed rows); TRL: ``SFTConfig.padding_free`` (one flattened row).
    TRL 1.16 has none for its reward trainer and disables its DPO one, so those stay padded. This benchmark
    compares padded against padded (both sides' ``padding_free`` off); ``bench/packing.py`` turns it on."""

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")

    @property
    def lr_warmup_steps(self) -> int:
        return math.ceil(LR_WARMUP_RATIO * self.steps)  # what our TrainConfig derives from warmup_ratio


@dataclass
class RunResult:
    trainer: str
    impl: str
    steps_per_s: float
    cpu_steps_per_s: float
    """Steps per CPU second of this process: unaffected by waiting for a core on a shared machine."""
    setup_s: float
    """From the trainer entry point's call to the start of training (tokenisation, reference log-probs, set-up)."""
    peak_mb: float
    """Peak memory from process start to the end of training (CPU: RSS; CUDA: allocated)."""
    train_growth_mb: float
    """Peak memory during training minus the memory held when training began (activations, gradients, optimizer state)."""
    losses: list[float] = field(default_factory=list)
    """Training loss logged at every step."""
    timed_steps: int = 0
    padding_free: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    """``COMPARED_SETTINGS`` as the Trainer ran with them, plus the model's dtype and the optimizer class."""


class _Probe(TrainerCallback):
    """Stamps steps, reads peak memory before and during training, and records each step's loss."""

    def __init__(self, clock: StepClock, memory: PeakMemory) -> None:
        self.clock = clock
        self.memory = memory
        self.train_begin: float | None = None
        self.setup_peak_mb = 0.0
        self.begin_mb = 0.0
        self.train_peak_mb = 0.0
        self.losses: list[float] = []
        self.settings: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.settings = {name: str(getattr(args, name, None)) for name in COMPARED_SETTINGS}
        self.settings["model_dtype"] = str(getattr(kwargs.get("model"), "dtype", None))
        self.settings["optimizer"] = type(getattr(kwargs.get("optimizer"), "optimizer", kwargs.get("optimizer"))).__name__
        self.train_begin = time.perf_counter()
        self.setup_peak_mb = self.memory.peak_mb()
        self.begin_mb = self.memory.current_mb()
        self.memory.reset()
        self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.train_peak_mb = self.memory.peak_mb()


def _our_config(spec: RunSpec, workload: Workload, cls: type, **extra: Any) -> Any:
    return cls(
        output_dir=spec.output_dir,
        seed=spec.seed,
        learning_rate=LEARNING_RATES[spec.trainer],
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        warmup_ratio=LR_WARMUP_RATIO,
        logging_steps=1,
        max_length=workload.max_length,
        precision="fp32",
        progress=False,
        resume=False,
        # No evaluation or checkpoint inside training (train_* still evaluates once afterwards, untimed).
        extra_args={"eval_strategy": "no", "save_strategy": "no", "use_cpu": spec.device == "cpu"},
        padding_free=spec.padding_free,
        **extra,
    )


def _trl_args(spec: RunSpec, workload: Workload, cls: type, **extra: Any) -> Any:
    return cls(
        output_dir=spec.output_dir,
        seed=spec.seed,
        data_seed=spec.seed,  # ours sets data_seed = seed too: the same batches in the same order
        learning_rate=LEARNING_RATES[spec.trainer],
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        warmup_steps=spec.lr_warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=spec.device == "cpu",
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # TRL turns it on by default
        dataloader_num_workers=0,
        dataloader_pin_memory=spec.device == "cuda",
        **{"max_length": workload.max_length, **extra},
    )


def _run_ours(spec: RunSpec, workload: Workload, tokenizer: PreTrainedTokenizerBase, probe: _Probe) -> float:
    """Train with our trainer; returns the time the entry point was called (setup starts there)."""
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    kind = "sft" if spec.trainer == "sft" else "preference"
    train = _read_jsonl_dataset(workload.records_path(kind, "train"))
    held_out = _read_jsonl_dataset(workload.records_path(kind, "eval"))
    if spec.trainer == "sft":
        model, cfg, entry = load_causal_lm(workload.model_dir), _our_config(spec, workload, SFTConfig), train_sft
    elif spec.trainer == "reward":
        model, cfg = load_reward_model(workload.model_dir, seed=spec.seed), _our_config(spec, workload, RewardConfig)
        entry = train_reward_model
    else:
        model = load_causal_lm(workload.model_dir)
        cfg = _our_config(spec, workload, DPOConfig, beta=DPO_BETA, loss_type="sigmoid", reference="precomputed",
                          rpo_alpha=0.0)  # plain DPO, as TRL's default (our pipeline default adds the chosen NLL)
        entry = train_dpo
    start = time.perf_counter()
    entry(model, tokenizer, train, held_out, cfg, callbacks=[probe])
    return start


def _run_trl(spec: RunSpec, workload: Workload, tokenizer: PreTrainedTokenizerBase, probe: _Probe) -> float:
    """Train with TRL's trainer on the same model, tokens and settings; returns when setup started."""
    import trl

    from rlhf_core.models import load_causal_lm, load_reward_model

    kind = "sft" if spec.trainer == "sft" else "preference"
    columns = ("completion",) if kind == "sft" else ("chosen", "rejected")
    train = _trl_text(_read_jsonl_dataset(workload.records_path(kind, "train")), tokenizer, columns)
    held_out = _trl_text(_read_jsonl_dataset(workload.records_path(kind, "eval")), tokenizer, columns)
    if spec.trainer == "sft":
        model = load_causal_lm(workload.model_dir)
        # TRL refuses padding_free with max_length without packing; nothing here is longer than max_length anyway.
        free = {"padding_free": True, "max_length": None} if spec.padding_free else {"padding_free": False}
        args = _trl_args(spec, workload, trl.SFTConfig, completion_only_loss=True, packing=False, **free)
        trainer_cls: Callable[..., Any] = trl.SFTTrainer
    elif spec.trainer == "reward":
        model = load_reward_model(workload.model_dir, seed=spec.seed)
        args, trainer_cls = _trl_args(spec, workload, trl.RewardConfig), trl.RewardTrainer
    else:
        model = load_causal_lm(workload.model_dir)
        args = _trl_args(
            spec, workload, trl.DPOConfig, beta=DPO_BETA, loss_type="sigmoid",
            precompute_ref_log_probs=True, precompute_ref_batch_size=spec.batch_size,
        )
        trainer_cls = trl.DPOTrainer
    start = time.perf_counter()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer, callbacks=[probe]
    )
    trainer.train()
    return start


def run_one(spec: RunSpec) -> RunResult:
    """Measure one run in this process (the CLI calls it in a fresh worker process per run)."""
    from rlhf_core.models import load_tokenizer

    datasets.disable_caching()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    workload = Workload(**spec.workload)
    tokenizer = load_tokenizer(workload.model_dir)
    sync = torch.cuda.synchronize if spec.device == "cuda" else None
    probe = _Probe(StepClock(spec.warmup, sync=sync), PeakMemory(spec.device))
    start = (_run_ours if spec.impl == "ours" else _run_trl)(spec, workload, tokenizer, probe)
    if probe.train_begin is None or len(probe.clock.step_times) != spec.steps:
        raise RuntimeError(
            f"{spec.impl} {spec.trainer}: expected {spec.steps} timed steps, saw {len(probe.clock.step_times)}"
        )
    return RunResult(
        trainer=spec.trainer,
        impl=spec.impl,
        steps_per_s=probe.clock.steps_per_second(),
        cpu_steps_per_s=probe.clock.steps_per_second(cpu=True),
        setup_s=probe.train_begin - start,
        peak_mb=max(probe.setup_peak_mb, probe.train_peak_mb),
        train_growth_mb=probe.train_peak_mb - probe.begin_mb,
        losses=probe.losses,
        timed_steps=probe.clock.timed_steps,
        padding_free=spec.padding_free,
        settings=probe.settings,
    )


# ------------------------------------------------------------------------------------ the report


@dataclass
class Summary:
    """Medians over runs for one trainer, ours against TRL."""

    trainer: str
    ours: list[RunResult]
    trl: list[RunResult]

    def med(self, impl: str, name: str) -> float:
        return median([getattr(r, name) for r in (self.ours if impl == "ours" else self.trl)])

    @property
    def ratio(self) -> float:
        return self.med("ours", "steps_per_s") / self.med("trl", "steps_per_s")

    @property
    def cpu_ratio(self) -> float:
        return self.med("ours", "cpu_steps_per_s") / self.med("trl", "cpu_steps_per_s")

    @property
    def setting_differences(self) -> dict[str, tuple[str, str]]:
        """Settings that differ between our first run and TRL's: ``{name: (ours, TRL)}``; empty when fair."""
        ours, trl = self.ours[0].settings, self.trl[0].settings
        return {k: (ours.get(k, "?"), trl.get(k, "?")) for k in sorted(set(ours) | set(trl)) if ours.get(k) != trl.get(k)}

    @property
    def max_loss_diff(self) -> float:
        """Largest |loss_ours − loss_TRL| at any logged step, over all pairs of runs with the same index."""
        diffs = [
            abs(a - b)
            for ours, trl in zip(self.ours, self.trl)
            for a, b in zip(ours.losses, trl.losses, strict=True)
        ]
        return max(diffs)


def summarise(results: list[RunResult]) -> list[Summary]:
    summaries = []
    for trainer in TRAINERS:
        ours = [r for r in results if r.trainer == trainer and r.impl == "ours"]
        trl = [r for r in results if r.trainer == trainer and r.impl == "trl"]
        if ours and trl:
            summaries.append(Summary(trainer, ours, trl))
    return summaries


def format_report(summaries: list[Summary]) -> str:
    """The main table (the issue's columns) and a second one with what it leaves out.

    Medians over runs; ratio = ours / TRL. The second table: steps per CPU second (steadier than wall
    time when other processes share the cores), the spread of steps/s over runs, setup time,
    how much memory training added on top of what was held when it began, and step 1's loss.
    """
    main = markdown_table(
        ["trainer", "ours steps/s", "TRL steps/s", "ratio", "ours peak MB", "TRL peak MB", "max |Δloss|"],
        [
            [
                s.trainer,
                f"{s.med('ours', 'steps_per_s'):.1f}",
                f"{s.med('trl', 'steps_per_s'):.1f}",
                f"{s.ratio:.2f}×",
                f"{s.med('ours', 'peak_mb'):.0f}",
                f"{s.med('trl', 'peak_mb'):.0f}",
                f"{s.max_loss_diff:.1e}",
            ]
            for s in summaries
        ],
    )

    def pair(s: Summary, name: str, fmt: str) -> str:
        return f"{format(s.med('ours', name), fmt)} / {format(s.med('trl', name), fmt)}"

    def spread(runs: list[RunResult]) -> str:
        values = [r.steps_per_s for r in runs]
        return f"{min(values):.1f}–{max(values):.1f}"

    detail = markdown_table(
        ["trainer", "steps per CPU-s ours / TRL", "CPU ratio", "steps/s range ours / TRL", "setup s ours / TRL",
         "training-window growth MB ours / TRL", "first loss ours / TRL"],
        [
            [
                s.trainer,
                pair(s, "cpu_steps_per_s", ".1f"),
                f"{s.cpu_ratio:.2f}×",
                f"{spread(s.ours)} / {spread(s.trl)}",
                pair(s, "setup_s", ".2f"),
                pair(s, "train_growth_mb", ".0f"),
                f"{s.ours[0].losses[0]:.5f} / {s.trl[0].losses[0]:.5f}",
            ]
            for s in summaries
        ],
    )
    unfair = [f"{s.trainer}: {name} ours={a} TRL={b}" for s in summaries for name, (a, b) in s.setting_differences.items()]
    warning = "\n\nWARNING, the two sides ran with different settings: " + "; ".join(unfair) if unfair else ""
    return main + "\n\n" + detail + warning


def environment(threads: int) -> dict[str, Any]:
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


# -------------------------------------------------------------------------------------------- CLI


def benchmark(args: argparse.Namespace, work_dir: Path, log: Callable[[str], None] = print) -> tuple[list[RunResult], Workload]:
    """Prepare the workload, then run every (trainer, impl) ``args.runs`` times, each in a fresh process."""
    workload = prepare_workload(work_dir / "workload", n_train=args.steps * args.batch_size, max_length=args.max_length)
    log(f"workload: vocab {workload.vocab_size}, longest sequence {workload.longest_sequence} tokens, "
        f"{workload.n_train} training records per trainer")
    results = []
    for run in range(args.runs):
        for trainer in args.trainers:
            for impl in IMPLS if run % 2 == 0 else IMPLS[::-1]:  # alternate who goes first
                spec = RunSpec(
                    trainer=trainer, impl=impl, workload=asdict(workload), output_dir=str(work_dir / f"{trainer}-{impl}-{run}"),
                    steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=args.device, seed=args.seed,
                    threads=args.threads,
                )
                result = RunResult(**run_worker("bench.train_throughput", asdict(spec)))
                log(f"run {run + 1}/{args.runs} {trainer:<6} {impl:<4} {result.steps_per_s:6.1f} steps/s "
                    f"({result.cpu_steps_per_s:.1f} per CPU-s)  setup {result.setup_s:5.2f} s  peak {result.peak_mb:5.0f} MB")
                results.append(result)
    return results, workload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer and implementation (medians are reported)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of sft,reward,dpo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="max prompt + completion tokens (nothing may exceed it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per run (0: torch's default, one per core); see docs/benchmarks.md for why 1 is the default",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where models and run outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's raw result here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one run, in this process
    args = parser.parse_args(argv)
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = sorted(set(args.trainers) - set(TRAINERS))
    if unknown or not args.trainers:
        parser.error(f"--trainers: unknown {unknown}; choose from {','.join(TRAINERS)}")
    if args.runs < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--runs, --steps and --batch-size must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: torch's default)")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker.read_text())
        result_path = Path(spec.pop("result_path"))
        result_path.write_text(json.dumps(asdict(run_one(RunSpec(**spec)))))
        return
    began = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        env = environment(args.threads)
        print(f"environment: {json.dumps(env)}")
        results, workload = benchmark(args, work_dir)
    summaries = summarise(results)
    command = "python -m bench.train_throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command.strip()}  # {time.perf_counter() - began:.0f} s wall, load avg after {os.getloadavg()[0]:.2f}\n")
    print(format_report(summaries))
    if args.json:
        args.json.write_text(json.dumps(
            {"command": command.strip(), "environment": env, "workload": asdict(workload), "results": [asdict(r) for r in results]},
            indent=1,
        ))


if __name__ == "__main__":
    main()
