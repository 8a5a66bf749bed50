"""Padding-free training on HH-RLHF lengths: our packed SFT, reward-model and DPO trainers against TRL 1.16.

    python -m bench.packing [--runs 1] [--steps 20] [--warmup 3] [--batch-size 16] [--max-length 512]
                            [--vocab 1024] [--trainers sft,reward,dpo] [--data HH.jsonl.gz] [--json out.json]

Workload: the Anthropic HH-RLHF harmless-base test file (``../shared/data``, 2,312 dialogues of 20 to
1,600 tokens), normalised (``hh_rlhf`` format: the shared dialogue as the prompt, the last assistant
turn as chosen/rejected), a byte-level BPE tokenizer trained on it (``--vocab``), and the pairs whose
prompt + longer reply fits ``--max-length`` (no truncation, so both sides train on the same tokens); SFT
trains on prompt + chosen. The model is the pipeline's tiny GPT-2 (2 layers, 128 wide) with
``--max-length`` positions. Everything else (optimiser, schedule, seeds, batches, timing window, one
torch thread, a fresh process per run) is ``bench/train_throughput.py``'s, whose worker runs each run.

Variants per trainer: ours packed (``padding_free``, our default), ours padded, TRL padded; for SFT also
TRL's own ``padding_free`` (it flattens a batch into ONE row; TRL 1.16 has no padding-free reward trainer
and disables its DPO one). The fastest TRL variant is the baseline of the ratio.

tokens/s counts real (non-pad) tokens: steps/s × the mean real tokens per step, i.e. every training
sequence's length (a pair's prompt counted on both sides, as both sides compute it) summed over the
run's ``steps × batch`` records, divided by ``steps``. Both sides see the same batches, so the tokens/s
ratio equals the steps/s ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import transformers

from bench.common import markdown_table, median, run_worker
from bench.train_throughput import (
    TRAINERS,
    RunResult,
    RunSpec,
    Workload,
    _write_jsonl,
    environment,
)

REPO = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = (REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz",
                   REPO / "tests" / "fixtures" / "public" / "full" / "hh-rlhf-harmless-base-test.jsonl.gz")


@dataclass(frozen=True)
class Variant:
    label: str
    impl: str
    padding_free: bool


OURS_PACKED = Variant("ours packed", "ours", True)
OURS_PADDED = Variant("ours padded", "ours", False)
TRL_PADDED = Variant("TRL padded", "trl", False)
TRL_FLAT = Variant("TRL padding_free", "trl", True)
VARIANTS = {"sft": (OURS_PACKED, OURS_PADDED, TRL_PADDED, TRL_FLAT), "reward": (OURS_PACKED, OURS_PADDED, TRL_PADDED),
            "dpo": (OURS_PACKED, OURS_PADDED, TRL_PADDED)}


def default_data() -> Path:
    return next((p for p in DATA_CANDIDATES if p.is_file()), DATA_CANDIDATES[0])


@dataclass
class HHWorkload:
    workload: Workload
    tokens: dict[str, int]
    """Real tokens of all training sequences: ``sft`` (prompt + chosen), ``preference`` (both sides)."""
    lengths: dict[str, float]
    """Sequence lengths of the training pairs' sides: median, p90, max."""


def prepare_hh_workload(
    root: str | Path,
    data: str | Path,
    *,
    n_train: int,
    n_eval: int = 16,
    max_length: int = 512,
    vocab_size: int = 1024,
    n_layer: int = 2,
    hidden_size: int = 128,
    n_head: int = 4,
    seed: int = 0,
) -> HHWorkload:
    """Write ``train_throughput.Workload``'s files from the HH-RLHF file: records, tokenizer and a tiny GPT-2."""
    from rlhf_core.data.formats import normalize
    from rlhf_core.data.tokenize import encode_completions, encode_prompts
    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, save_model, train_tokenizer

    with gzip.open(data, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh if line.strip()]
    rows = normalize(datasets.Dataset.from_list(raw), "preference").to_list()
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["chosen"] for r in rows], vocab_size=vocab_size)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], [r["prompt_messages"] for r in rows])
    chosen, rejected = (encode_completions(tokenizer, [r[side] for r in rows]) for side in ("chosen", "rejected"))
    fits = [i for i, p in enumerate(prompts) if len(p) + max(len(chosen[i]), len(rejected[i])) <= max_length]
    if len(fits) < n_train + n_eval:
        raise ValueError(f"only {len(fits)} pairs fit max_length={max_length}; need {n_train + n_eval} "
                         "(lower --steps/--batch-size or raise --max-length)")
    train, held_out = fits[:n_train], fits[n_train : n_train + n_eval]
    workload = Workload(root=str(root), n_train=n_train, n_eval=n_eval, max_length=max_length, vocab_size=len(tokenizer))
    Path(root).mkdir(parents=True, exist_ok=True)
    keys = ("prompt", "prompt_messages", "chosen", "rejected")
    for split, idx in (("train", train), ("eval", held_out)):
        pref = [{k: rows[i][k] for k in keys} for i in idx]
        _write_jsonl(workload.records_path("preference", split), pref)
        _write_jsonl(workload.records_path("sft", split), [{"prompt": r["prompt"], "prompt_messages": r["prompt_messages"],
                                                             "completion": r["chosen"]} for r in pref])
    sides = [len(prompts[i]) + len(c[i]) for i in train for c in (chosen, rejected)]
    workload.longest_sequence = max(sides)
    model_cfg = TinyModelConfig(arch="gpt2", n_layer=n_layer, hidden_size=hidden_size, n_head=n_head, max_positions=max_length)
    save_model(build_tiny_causal_lm(tokenizer, model_cfg, seed=seed), tokenizer, workload.model_dir)
    deciles = statistics.quantiles(sides, n=10) if len(sides) > 1 else sides * 9
    return HHWorkload(
        workload=workload,
        tokens={"sft": sum(len(prompts[i]) + len(chosen[i]) for i in train), "preference": sum(sides)},
        lengths={"median": float(statistics.median(sides)), "p90": float(deciles[-1]), "max": float(max(sides))},
    )


def tokens_per_step(hh: HHWorkload, trainer: str, steps: int) -> float:
    return hh.tokens["sft" if trainer == "sft" else "preference"] / steps


# ------------------------------------------------------------------------------------ the report


@dataclass
class TrainerSummary:
    trainer: str
    tokens_per_step: float
    runs: dict[str, list[RunResult]]
    """Variant label -> its runs."""

    def med(self, label: str, name: str = "steps_per_s") -> float:
        return median([getattr(r, name) for r in self.runs[label]])

    @property
    def trl_best(self) -> str:
        """The TRL variant with the most steps per second (the baseline)."""
        return max((v.label for v in VARIANTS[self.trainer] if v.impl == "trl" and v.label in self.runs), key=self.med)

    def ratio(self, label: str, cpu: bool = False) -> float:
        name = "cpu_steps_per_s" if cpu else "steps_per_s"
        return self.med(OURS_PACKED.label, name) / self.med(label, name)

    def max_loss_diff(self, label: str) -> float:
        """Largest |loss_ours_packed − loss_variant| at any step, over the runs paired by index."""
        return max(abs(a - b) for ours, other in zip(self.runs[OURS_PACKED.label], self.runs[label])
                   for a, b in zip(ours.losses, other.losses, strict=True))


def summarise(results: list[RunResult], hh: HHWorkload, steps: int) -> list[TrainerSummary]:
    out = []
    for trainer in TRAINERS:
        runs: dict[str, list[RunResult]] = {}
        for variant in VARIANTS[trainer]:
            found = [r for r in results if r.trainer == trainer and r.impl == variant.impl and r.padding_free == variant.padding_free]
            if found:
                runs[variant.label] = found
        if OURS_PACKED.label in runs and any(v.impl == "trl" and v.label in runs for v in VARIANTS[trainer]):
            out.append(TrainerSummary(trainer, tokens_per_step(hh, trainer, steps), runs))
    return out


def format_report(summaries: list[TrainerSummary]) -> str:
    """The main table (tokens/s and steps/s of ours packed against TRL's fastest) and every variant's numbers."""
    main = markdown_table(
        ["trainer", "tokens/step", "ours packed tok/s", "TRL best", "TRL tok/s", "ratio", "CPU ratio",
         "ours packed steps/s", "TRL steps/s", r"max |Δloss| vs TRL", r"max |Δloss| vs ours padded"],
        [
            [s.trainer, f"{s.tokens_per_step:.0f}", f"{s.med(OURS_PACKED.label) * s.tokens_per_step:,.0f}", s.trl_best,
             f"{s.med(s.trl_best) * s.tokens_per_step:,.0f}", f"{s.ratio(s.trl_best):.2f}×",
             f"{s.ratio(s.trl_best, cpu=True):.2f}×", f"{s.med(OURS_PACKED.label):.2f}", f"{s.med(s.trl_best):.2f}",
             f"{s.max_loss_diff(s.trl_best):.1e}",
             f"{s.max_loss_diff(OURS_PADDED.label):.1e}" if OURS_PADDED.label in s.runs else "—"]
            for s in summaries
        ],
    )
    detail = markdown_table(
        ["trainer", "variant", "steps/s", "tokens/s", "steps per CPU-s", "ours packed ÷ this", "setup s", "peak MB",
         "first loss"],
        [
            [s.trainer, label, f"{s.med(label):.2f}", f"{s.med(label) * s.tokens_per_step:,.0f}",
             f"{s.med(label, 'cpu_steps_per_s'):.2f}", f"{s.ratio(label):.2f}×", f"{s.med(label, 'setup_s'):.1f}",
             f"{s.med(label, 'peak_mb'):.0f}", f"{runs[0].losses[0]:.5f}"]
            for s in summaries for label, runs in s.runs.items()
        ],
    )
    return main + "\n\n" + detail


# -------------------------------------------------------------------------------------------- CLI


def benchmark(args: argparse.Namespace, work_dir: Path, log=print) -> tuple[list[RunResult], HHWorkload]:
    hh = prepare_hh_workload(work_dir / "workload", args.data, n_train=args.steps * args.batch_size,
                             max_length=args.max_length, vocab_size=args.vocab, seed=args.seed)
    log(f"workload: {args.data.name}, vocab {hh.workload.vocab_size}, {hh.workload.n_train} training pairs, "
        f"sequence lengths median {hh.lengths['median']:.0f}, p90 {hh.lengths['p90']:.0f}, max {hh.lengths['max']:.0f} tokens")
    results = []
    for run in range(args.runs):
        for trainer in args.trainers:
            variants = VARIANTS[trainer] if run % 2 == 0 else VARIANTS[trainer][::-1]  # alternate who goes first
            for variant in variants:
                spec = RunSpec(trainer=trainer, impl=variant.impl, workload=asdict(hh.workload),
                               output_dir=str(work_dir / f"{trainer}-{variant.impl}-{variant.padding_free}-{run}"),
                               steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, seed=args.seed,
                               threads=args.threads, padding_free=variant.padding_free)
                result = RunResult(**run_worker("bench.train_throughput", asdict(spec)))
                log(f"run {run + 1}/{args.runs} {trainer:<6} {variant.label:<17} {result.steps_per_s:6.2f} steps/s "
                    f"({result.cpu_steps_per_s:.2f} per CPU-s)  setup {result.setup_s:5.1f} s  first loss {result.losses[0]:.5f}")
                results.append(result)
    return results, hh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per trainer and variant (medians are reported)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (each training pair used once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of sft,reward,dpo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="pairs longer than this are left out (never cut)")
    parser.add_argument("--vocab", type=int, default=1024, help="size of the BPE tokenizer trained on the data")
    parser.add_argument("--data", type=Path, default=default_data(), help="HH-RLHF JSON lines (.gz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every run's raw result here")
    args = parser.parse_args(argv)
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not args.trainers or set(args.trainers) - set(TRAINERS):
        parser.error(f"--trainers: choose from {','.join(TRAINERS)}")
    if args.runs < 1 or args.steps < 1 or args.batch_size < 1 or args.threads < 0:
        parser.error("--runs, --steps and --batch-size must be >= 1, --threads >= 0")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps})")
    if not args.data.is_file():
        parser.error(f"--data: no file {args.data}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    env = environment(args.threads)
    print(f"environment: {json.dumps(env)}")
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        results, hh = benchmark(args, args.work_dir or Path(tmp))
    summaries = summarise(results, hh, args.steps)
    command = "python -m bench.packing " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command.strip()}  # {time.perf_counter() - began:.0f} s wall, load avg after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(format_report(summaries))
    if args.json:
        args.json.write_text(json.dumps({"command": command.strip(), "environment": env, "workload": asdict(hh),
                                         "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
