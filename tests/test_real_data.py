"""The shared public files, unedited, through the pipeline on a pretrained-format model folder.

``tests/fixtures/public/full/`` holds byte-identical copies of the project's shared samples
(``SOURCES.md`` there): the Alpaca demo (SFT), the HH-RLHF harmless-base test file (preference
pairs, with the 4 empty chosen replies it really has) and the ShareGPT DPO demo. The model is a
GPT-2 folder built as the README's walkthrough builds one (``rlhf_core.models.demo_base``: a
byte-level tokenizer trained on the Alpaca and HH texts), with a context of 512 tokens, which
every length setting (all ``auto``) is capped by. Stages run in this process through their
``run(params, ws)``, with few rows (``prepare.max_rows``) and few steps: these tests check that
real data and a pretrained-format model go through every stage, not what the models learn; the
reward model's test trains longer and checks that it beats chance on held-out HH pairs.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from rlhf_core import metrics as M
from tasks.params import apply_overrides, load_params
from tasks.workspace import Workspace
from tests.conftest import FIXTURES
from tests.workspace_factory import ALL_AUTO, run_in_process, stage_metrics, stage_workspace

pytestmark = pytest.mark.slow
FULL = FIXTURES / "public" / "full"
ALPACA, HH, SHAREGPT = (FULL / n for n in ("alpaca-en-demo.json", "hh-rlhf-harmless-base-test.jsonl.gz",
                                           "sharegpt-dpo-en-demo.json"))
CONTEXT = 512  # the HH prompts' 95th percentile fits (~430 tokens), so the gate passes with every length auto
SMALL = [f"{stage}.{key}={value}" for stage in ("sft", "reward", "dpo")
         for key, value in (("max_steps", 4), ("per_device_train_batch_size", 8), ("eval_steps", 4), ("save_steps", 4))]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    from rlhf_core.models.demo_base import build_gpt2_folder, texts_of

    folder = build_gpt2_folder(tmp_path_factory.mktemp("base") / "gpt2", texts_of([ALPACA, HH]))  # the README's
    assert json.loads((folder / "config.json").read_text())["n_positions"] == CONTEXT
    return folder


def _workspace(root: Path, base: Path, tracking_uri: str, *overrides: str) -> tuple[Workspace, dict]:
    return stage_workspace(root, [f"model.name_or_path={base}", f"tracking.uri={tracking_uri}",
                                  "tracking.registered_model=real-data-policy", f"prepare.sft_data={ALPACA}",
                                  f"prepare.preference_data={HH}", *overrides])


@pytest.fixture(scope="module")
def pipeline(base_folder, tmp_path_factory, tracking_uri) -> Workspace:
    """prepare → validate → sft → reward → ppo → dpo → evaluate → promote on 200 rows of each file.

    200: the 20 held-out pairs pass the gate's prompt-length check (at most 5% above 511 tokens;
    about 2% of HH prompts are), where 160 rows leave 2 of 16 above and the gate stops the run.
    """
    ws, params = _workspace(tmp_path_factory.mktemp("real") / "ws", base_folder, tracking_uri,
                            "prepare.max_rows=200", *ALL_AUTO, *SMALL)
    run_in_process(params, ws)
    return ws


def test_alpaca_and_hh_unedited_through_every_stage(pipeline, base_folder):
    ws = pipeline
    prepare = stage_metrics(ws, "prepare")
    # The files' real defects are dropped, counted and quarantined with their rows, not fatal.
    assert prepare["invalid_rows/duplicate"] == 14 and prepare["invalid_rows/blank_text"] == 4, prepare
    quarantined = [json.loads(line) for line in (ws.prepared / "quarantine.jsonl").read_text().splitlines()]
    assert {(Path(q["source_file"]).name, q["rule"]) for q in quarantined} == {
        (ALPACA.name, "duplicate"), (HH.name, "blank_text")}
    assert stage_metrics(ws, "validate")["success"] is True
    for split in ("sft_train", "pref_train"):  # prepared rows name their row in the unedited file
        row = json.loads(ws.split(split).read_text().splitlines()[0])
        assert Path(row["source_file"]).name == (ALPACA if split == "sft_train" else HH).name and row["source_row"] >= 0

    # Every length from the data, capped by the model's context (the data needs more than 512).
    assert prepare["lengths/context_length"] == CONTEXT < prepare["lengths/preference/total/p"]
    used = {k: v for s in ("validate", "sft", "reward", "dpo", "ppo", "evaluate") for k, v in stage_metrics(ws, s).items()}
    assert used["lengths/sft.max_length"] == used["lengths/reward.max_length"] == used["lengths/dpo.max_length"] == CONTEXT
    assert used["lengths/validate.max_prompt_tokens"] == CONTEXT - 1
    assert 0 < used["lengths/ppo.max_new_tokens"] == used["lengths/evaluate.max_new_tokens"] < CONTEXT

    for policy in ("sft", "ppo", "dpo", "reward"):
        assert (ws.model(policy) / "model.safetensors").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the folder's tokenizer, as it is
        assert (ws.tokenizer / name).read_bytes() == (base_folder / name).read_bytes()
    reward = stage_metrics(ws, "reward")
    ci = reward[M.key(M.EVAL, M.ci_low(M.ACCURACY))], reward[M.key(M.EVAL, M.ci_high(M.ACCURACY))]
    assert ci[0] <= reward[M.key(M.EVAL, M.ACCURACY)] <= ci[1]
    assert M.key(M.EVAL, M.BAYES_ACCURACY) not in reward  # real labels: no known noise ceiling

    for policy in ("ppo", "dpo"):  # over-optimisation curves without a gold reward: proxy and KL at every evaluation
        rows = list(csv.DictReader((ws.plots(policy) / "overoptimization.csv").open()))
        assert [int(r["step"]) for r in rows][0] == 0 and len(rows) >= 2, policy
        assert all(r["gold_reward"] == "" and math.isfinite(float(r["proxy_reward"])) for r in rows)
        assert (ws.plots(policy) / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
        assert M.OVEROPT_PEAK_GOLD_STEP not in stage_metrics(ws, policy)
        assert stage_metrics(ws, policy)[M.OVEROPT_N_POINTS] == len(rows)

    evaluate = stage_metrics(ws, "evaluate")
    assert evaluate["n_prompts"] > 0 and "ppo/rm_score" in evaluate and "dpo/rm_score" in evaluate
    assert not any(k.endswith(M.GOLD_REWARD) for k in evaluate)  # no gold reward on real data
    promote = stage_metrics(ws, "promote")
    assert promote["metric"] == "rm_score" and promote["n_prompts"] == evaluate["n_prompts"]  # judged by the RM


def test_sharegpt_dpo_pairs_through_prepare_and_dpo(pipeline, tmp_path):
    """The preference data swapped for the ShareGPT DPO demo, then prepare → validate → dpo (the SFT data, unchanged).

    The ShareGPT demo's conversations are long (40% of prompts exceed this 512-token context):
    the gate stops the run, naming the rule; keeping each prompt's last 256 tokens
    (``dpo.max_prompt_length``) and switching off the gate's drop check lets DPO train on them.
    """
    from tasks.stage_main import StageError

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(pipeline.root, ws.root)
    apply_overrides(ws.params_file, [f"prepare.preference_data={SHAREGPT}"])
    sft_split = ws.split("sft_train").read_bytes()
    with pytest.raises(StageError, match="data validation failed"):
        run_in_process(load_params(ws.params_file), ws, ["prepare", "validate"])
    failed = json.loads((ws.reports("validate") / "validation.json").read_text())["datasets"]["pref_train"]["rules"]
    assert [r["rule"] for r in failed if not r["success"]] == ["prompt tokens within max_prompt_tokens"]

    apply_overrides(ws.params_file, ["dpo.max_prompt_length=256", "validate.max_prompt_tokens=null"])
    run_in_process(load_params(ws.params_file), ws, ["validate", "dpo"])
    assert ws.split("sft_train").read_bytes() == sft_split  # the same SFT rows: the SFT model stays a valid start
    rows = [json.loads(line) for line in ws.split("pref_train").read_text().splitlines()]
    assert {Path(r["source_file"]).name for r in rows} == {SHAREGPT.name} and len(rows) == 180  # max_rows 200, 10% held out
    assert any(len(r["prompt_messages"]) > 1 for r in rows)  # multi-turn conversations kept as messages
    dpo = stage_metrics(ws, "dpo")
    assert dpo["data/train/n_input"] == dpo["data/train/n_kept"] == len(rows) and dpo["data/train/n_prompt_truncated"] > 0
    assert dpo["lengths/dpo.max_length"] == CONTEXT
    assert (ws.model("dpo") / "model.safetensors").stat().st_mtime > (ws.model("sft") / "model.safetensors").stat().st_mtime


def test_reward_model_beats_chance_on_held_out_hh_pairs(base_folder, tmp_path, tracking_uri):
    """All 2,308 valid HH pairs, a fifth held out (462): the RM's accuracy, with its 95% bootstrap interval, is above 0.5.

    About 1.5 epochs (90 steps of 32 pairs, ~35 s). The reply decides, so each pair keeps the
    last 32 prompt tokens (the end of the last human turn) and up to 96 of the reply. Measured
    here: 0.606 [0.563, 0.652]; with prepare/sft/reward seeds 1 and 2: 0.626 [0.582, 0.669] and
    0.578 [0.530, 0.621]. That is weak but above chance: preferring the shorter reply gets 0.568,
    0.597 and 0.537 on the same held-out pairs (HH is hard: large pretrained reward models reach
    about 0.7); 64 prompt tokens gave 0.561–0.617, lr 1e-3 for 120 steps 0.543–0.604.
    """
    ws, params = _workspace(tmp_path / "ws", base_folder, tracking_uri, "prepare.test_fraction=0.2",
                            "sft.max_steps=1", "sft.max_length=128", "reward.max_steps=90", "reward.eval_steps=90",
                            "reward.save_steps=90", "reward.per_device_train_batch_size=32", "reward.learning_rate=0.002",
                            "reward.max_length=128", "reward.max_prompt_length=32")
    run_in_process(params, ws, ["prepare", "sft", "reward"])

    reward = stage_metrics(ws, "reward")
    accuracy = reward[M.key(M.EVAL, M.ACCURACY)]
    low, high = reward[M.key(M.EVAL, M.ci_low(M.ACCURACY))], reward[M.key(M.EVAL, M.ci_high(M.ACCURACY))]
    print(f"held-out HH accuracy {accuracy:.3f} [{low:.3f}, {high:.3f}] on {reward['data/eval/n_kept']} pairs")
    assert reward["data/eval/n_kept"] >= 450
    assert low <= accuracy <= high and high - low < 0.1
    assert low > 0.5, (accuracy, low, high)
