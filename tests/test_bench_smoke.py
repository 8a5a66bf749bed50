"""Smoke test of the training-throughput benchmark: its whole code path on a tiny model, 2 steps per run.

The runs happen in this process (the CLI runs each in its own worker process, through the same
``run_one``); what is checked is that the benchmark still runs against our trainers and TRL's, that
both sides see the same tokens (equal losses), and that the report renders.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("trl")

from bench.common import StepClock, markdown_table
from bench.train_throughput import (
    TRAINERS,
    RunSpec,
    Workload,
    format_report,
    parse_args,
    prepare_workload,
    run_one,
    summarise,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16's own deprecation warnings


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    root = tmp_path_factory.mktemp("bench")
    return prepare_workload(root, n_train=16, n_eval=8, vocab_size=300, n_layer=1, hidden_size=32, n_head=2)


def test_every_trainer_runs_on_both_sides_with_the_same_losses(workload: Workload, tmp_path: Path) -> None:
    results = []
    for trainer in TRAINERS:
        for impl in ("ours", "trl"):
            spec = RunSpec(trainer=trainer, impl=impl, workload=asdict(workload), output_dir=str(tmp_path / f"{trainer}-{impl}"),
                           steps=2, warmup=1, batch_size=8)
            result = run_one(spec)
            assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
            assert result.timed_steps == 1 and result.steps_per_s > 0
            assert result.setup_s > 0 and result.peak_mb > 0 and result.cpu_steps_per_s > 0
            results.append(result)
    summaries = summarise(results)
    assert [s.trainer for s in summaries] == list(TRAINERS)
    for s in summaries:
        assert s.setting_differences == {}, s.setting_differences  # TRL's defaults were all overridden
        assert s.ours[0].settings["activation_checkpointing"] == "False"
        # Same model, tokens, batches and optimizer: the loss curves agree to float noise.
        assert s.max_loss_diff < 1e-4, f"{s.trainer}: ours {s.ours[0].losses} vs TRL {s.trl[0].losses}"
    dpo = summaries[-1]
    assert dpo.ours[0].losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    report = format_report(summaries)
    for trainer in TRAINERS:
        assert f"| {trainer} |" in report
    assert "ours steps/s" in report and r"max \|Δloss\|" in report  # pipes escaped: still one column
    assert "WARNING" not in report


def test_step_clock_times_only_the_steps_after_warmup() -> None:
    clock = StepClock(warmup_steps=1)
    clock.step_times = [(10.0, 5.0), (11.0, 5.5), (13.0, 6.0)]  # (wall, CPU) at the end of steps 1, 2, 3
    assert clock.timed_steps == 2
    assert clock.steps_per_second() == pytest.approx(2 / 3)  # steps 2..3 took 13 - 10 s
    assert clock.steps_per_second(cpu=True) == pytest.approx(2 / 1)  # ... and 6 - 5 CPU seconds
    with pytest.raises(ValueError, match="no timed steps"):
        StepClock(warmup_steps=3, sync=None).steps_per_second()


def test_markdown_table_escapes_pipes_and_rejects_ragged_rows() -> None:
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines()[2] == "| 1 | 2 |"
    assert markdown_table(["|x|"], [["y"]]).splitlines()[0] == r"| \|x\| |"
    with pytest.raises(ValueError, match="expected 2"):
        markdown_table(["a", "b"], [[1]])


@pytest.mark.parametrize("argv", [["--trainers", "ppo"], ["--warmup", "30", "--steps", "30"], ["--runs", "0"], ["--threads", "-1"]])
def test_cli_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


# --- bench/packing.py: our packed trainers against TRL on HH-RLHF lengths (tiny: the 20-dialogue fixture, 2 steps) ---


def test_packing_bench_runs_every_variant_on_hh_data_with_the_same_losses(tmp_path: Path) -> None:
    from bench import packing

    data = Path(__file__).parent / "fixtures" / "public" / "hh-rlhf-harmless-base-test.jsonl.gz"
    hh = packing.prepare_hh_workload(tmp_path / "workload", data, n_train=4, n_eval=2, max_length=512, vocab_size=300,
                                     n_layer=1, hidden_size=32, n_head=2)
    assert hh.workload.n_train == 4 and 0 < hh.lengths["median"] <= hh.lengths["max"] == hh.workload.longest_sequence <= 512
    assert hh.tokens["preference"] > hh.tokens["sft"] > 0  # pairs: both sides
    results = []
    for trainer, variants in packing.VARIANTS.items():
        for variant in variants:
            spec = RunSpec(trainer=trainer, impl=variant.impl, workload=asdict(hh.workload), steps=2, warmup=1, batch_size=2,
                           output_dir=str(tmp_path / f"{trainer}-{variant.impl}-{variant.padding_free}"),
                           padding_free=variant.padding_free)
            results.append(run_one(spec))
    summaries = packing.summarise(results, hh, steps=2)
    assert [s.trainer for s in summaries] == list(TRAINERS)
    for s in summaries:
        assert set(s.runs) == {v.label for v in packing.VARIANTS[s.trainer]}
        assert s.tokens_per_step == hh.tokens["sft" if s.trainer == "sft" else "preference"] / 2
        for label in s.runs:  # ours packed, ours padded, TRL padded (and TRL's padding_free SFT): the same losses
            if label != packing.OURS_PACKED.label:
                assert s.max_loss_diff(label) < 1e-4, (s.trainer, label, s.runs[label][0].losses)
    report = packing.format_report(summaries)
    assert all(f"| {t} |" in report for t in TRAINERS)
    assert "TRL padding_free" in report and r"max \|Δloss\| vs TRL" in report
    for argv in (["--trainers", "ppo"], ["--data", str(tmp_path / "missing.jsonl.gz")], ["--warmup", "5", "--steps", "5"]):
        with pytest.raises(SystemExit):
            packing.parse_args(argv)


# --- bench/gpu.py: SFT/DPO tokens/s and MFU, rollout tokens/s against plain generate (tiny, on the CPU) ---


def test_gpu_bench_tiny_runs_every_phase_and_reports_mfu(tmp_path: Path) -> None:
    import json

    from bench import gpu

    out = gpu.main(["--tiny", "--device", "cpu", "--in-process", "--peak-tflops", "1", "--json", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text())["results"].keys() == {"sft", "dpo", "rollout"}
    sft, dpo, rollout = (out["results"][p] for p in ("sft", "dpo", "rollout"))
    # 2 layers, h 64, MLP 176, vocab 512, untied head: N = 2·(4·64² + 3·64·176) + 512·64; F = 6·N + 12·L·h·T, T = 32.
    n_matmul = 2 * (4 * 64 * 64 + 3 * 64 * 176) + 512 * 64
    assert out["matmul_parameters"] == n_matmul and out["parameters"] == n_matmul + 512 * 64 + (2 * 2 + 1) * 64
    assert sft["flops_per_token"] == dpo["flops_per_token"] == 6 * n_matmul + 12 * 2 * 64 * 32
    assert sft["tokens_per_step"] == 4 * 32 and dpo["tokens_per_step"] == 2 * 2 * 32  # DPO: chosen + rejected
    for r in (sft, dpo):
        assert r["timed_steps"] == 1 and r["tokens_per_s"] == pytest.approx(r["steps_per_s"] * r["tokens_per_step"])
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
    # Step 1, policy = precomputed reference: DPO's ln 2 plus the RPO term, the chosen NLL of a near-uniform model (ln V).
    assert dpo["losses"][0] == pytest.approx(math.log(2) + math.log(512), abs=0.1)
    for name in ("plain", "grpo", "ppo"):
        assert rollout[f"{name}_tokens_per_s"] > 0
    assert rollout["grpo_ratio"] == pytest.approx(rollout["grpo_tokens_per_s"] / rollout["plain_tokens_per_s"])
    report = gpu.format_report(out["results"], peak=1e12)
    assert f"| {sft['flops_per_s'] / 1e12:.1%} |" in report  # MFU against the 1 TFLOP/s peak given
    assert "| dpo |" in report and "| plain model.generate |" in report and "GRPO: rollout.sample_batch" in report


def test_gpu_bench_peak_table_and_cli_checks() -> None:
    from bench import gpu

    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Tesla T4") is None and gpu.peak_flops("Tesla T4", 65.0) == 65e12
    assert "n/a" in gpu.format_report({"sft": {"phase": "sft", "sequences_per_step": 1, "seq_len": 8, "steps_per_s": 1.0,
                                               "tokens_per_s": 8.0, "flops_per_s": 1.0, "setup_s": 0.0, "peak_mb": 1.0}}, None)
    for argv in (["--phases", "ppo"], ["--tiny", "--warmup", "2"], ["--tiny", "--rollout-rows", "3"], ["--heads", "3"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(argv)
