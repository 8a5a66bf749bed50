"""Every stage on a pretrained-format model folder (`model.name_or_path`), and `auto` lengths.

The folders are built locally (tests/pretrained_folders.py: a Llama with a ChatML template and
no pad token, a GPT-2 with no pad token and no template). Each stage runs in this process through
its ``run(params, ws)`` (what ``python -m tasks.<stage>`` runs), on the synthetic task with tiny
step counts. In the LoRA run, two stages go through their entry point (``stage_main``), so MLflow
records what their `auto` lengths resolved to.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from tasks.params import load_params
from tasks.workspace import Workspace
from tests.pretrained_folders import gpt2_folder, llama_folder
from tests.workspace_factory import ALL_AUTO, PIPELINE, make_workspace, run_in_process, stage_workspace
from tests.workspace_factory import stage_metrics as _metrics

pytestmark = pytest.mark.slow
POLICIES = ("sft", "ppo", "dpo")
TRACKED = ("sft", "ppo")  # run through stage_main in the LoRA test (the others through run(): faster)


def _workspace(root: Path, folder: Path, tracking_uri: str, *overrides: str) -> tuple[Workspace, dict]:
    return stage_workspace(root / "ws", [f"model.name_or_path={folder}", f"tracking.uri={tracking_uri}",
                                         "tracking.registered_model=pretrained-policy", *overrides])


def _check_outputs(ws: Workspace, folder: Path, arch_prefix: str) -> None:
    """Tokenizer used as it is, policies load with plain transformers, reward head attached, pad handling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_core.logprobs import causal_lm_logits
    from rlhf_core.models.tokenizer import tokenizer_files

    originals = tokenizer_files(folder)
    assert originals
    for out in (ws.tokenizer, *(ws.model(s) for s in (*POLICIES, "reward"))):
        for original in originals:  # nothing retrained, no pad token written
            assert (out / original.name).read_bytes() == original.read_bytes(), (out, original.name)
    base = json.loads((folder / "config.json").read_text())
    for policy in POLICIES:
        model = AutoModelForCausalLM.from_pretrained(ws.model(policy))  # plain transformers, no project code
        assert type(model).__name__ == base["architectures"][0]
        assert model.config.vocab_size == base["vocab_size"]  # no embedding resized
        assert (model.config.pad_token_id, model.config.eos_token_id) == (base.get("pad_token_id"), base["eos_token_id"])
    reward = json.loads((ws.model("reward") / "config.json").read_text())
    assert reward["architectures"] == [f"{arch_prefix}ForSequenceClassification"] and len(reward["id2label"]) == 1
    assert reward["pad_token_id"] is None  # the eos borrowed for batches stays in memory

    # pad = eos for batching: a padded batch gives the unpadded logits (saved SFT model, saved tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(ws.model("sft"))
    assert tokenizer.pad_token is None
    model = AutoModelForCausalLM.from_pretrained(ws.model("sft")).eval()
    texts = ["Name 4 words about tool.", "Fruit?"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows])  # left-padded with eos
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = causal_lm_logits(model, ids, mask)
        for row, r in enumerate(rows):
            alone = causal_lm_logits(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
            torch.testing.assert_close(batched[row, width - len(r):], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_stage_on_a_pretrained_folder(arch, tmp_path, tracking_uri):
    """Llama: params.yaml's explicit lengths; GPT-2: every length `auto` (its context of 96 caps none)."""
    build, prefix = {"llama": (llama_folder, "Llama"), "gpt2": (gpt2_folder, "GPT2")}[arch]
    folder = build(tmp_path / "base")
    ws, params = _workspace(tmp_path, folder, tracking_uri, *(ALL_AUTO if arch == "gpt2" else []))
    run_in_process(params, ws)

    _check_outputs(ws, folder, prefix)
    prepare = _metrics(ws, "prepare")
    assert prepare["vocab_size"] == json.loads((folder / "config.json").read_text())["vocab_size"]
    assert prepare["lengths/context_length"] == 96
    if arch == "llama":  # the chat template is applied: its markers are in every prompt's tokens
        from rlhf_core.data.tokenize import encode_prompts
        from rlhf_core.models import load_tokenizer

        tokenizer = load_tokenizer(str(ws.tokenizer))
        (ids,) = encode_prompts(tokenizer, ["Hi"], [[{"role": "user", "content": "Hi"}]])
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens[0] == "<|im_start|>" and tokens.count("<|im_start|>") == 2 and tokenizer.unk_token_id not in ids
        assert "lengths/sft.max_length" not in _metrics(ws, "sft")  # explicit numbers: nothing resolved
    else:  # uncapped: auto is the data's 99th percentile
        assert _metrics(ws, "sft")["lengths/sft.max_length"] == prepare["lengths/sft/total/p"] < 96
        assert _metrics(ws, "dpo")["lengths/dpo.max_length"] == prepare["lengths/preference/total/p"]
        assert _metrics(ws, "ppo")["lengths/ppo.max_new_tokens"] == prepare["lengths/preference/completion/p"]
        assert _metrics(ws, "validate")["lengths/validate.max_prompt_tokens"] == prepare["lengths/auto/validate.max_prompt_tokens"]
        assert _metrics(ws, "evaluate")["lengths/evaluate.max_new_tokens"] == prepare["lengths/preference/completion/p"]
    assert _metrics(ws, "evaluate")["n_prompts"] > 0 and _metrics(ws, "promote")["n_prompts"] > 0
    _check_overoptimization_curves(ws)


def _check_overoptimization_curves(ws: Workspace) -> None:
    """Each policy stage's curve: a point (proxy, gold, KL) at every evaluation, the initial policy's first, as CSV,
    plot and summary (peak gold) in its metrics."""
    import csv

    from rlhf_core import metrics as M

    for policy, steps in (("ppo", [0, 2]), ("dpo", [0, 4, 8])):  # TINY: ppo evaluates at 0 and 2, dpo at 0, 4 and 8
        rows = list(csv.DictReader((ws.plots(policy) / "overoptimization.csv").open()))
        assert [int(r["step"]) for r in rows] == steps, policy
        for row in rows:
            for column in ("kl", "sqrt_kl", "proxy_reward", "gold_reward"):
                assert math.isfinite(float(row[column])), (policy, row)
        assert abs(float(rows[0]["kl"])) < 1e-5 and float(rows[-1]["kl"]) != float(rows[0]["kl"])  # from the reference
        assert (ws.plots(policy) / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
        metrics = _metrics(ws, policy)
        gold = {int(r["step"]): float(r["gold_reward"]) for r in rows}
        assert metrics[M.OVEROPT_N_POINTS] == len(steps)
        assert metrics[M.OVEROPT_PEAK_GOLD] == pytest.approx(max(gold.values()))
        assert gold[int(metrics[M.OVEROPT_PEAK_GOLD_STEP])] == pytest.approx(max(gold.values()))
        assert metrics[M.key(M.EVAL, M.OVEROPT_GOLD)] == pytest.approx(gold[steps[-1]])  # the output policy's point


def test_lora_with_auto_lengths_capped_by_a_short_context(tmp_path, tracking_uri, monkeypatch):
    """LoRA on the Llama folder (adapters merged into plain models), every length `auto`, context 30 < the data's lengths."""
    from mlflow import MlflowClient

    from tasks.stage_main import stage_main

    folder = llama_folder(tmp_path / "base", max_position_embeddings=30)
    lora = ["sft.lora={r: 4, alpha: 8}", "reward.lora={r: 4, alpha: 8}", "dpo.lora={r: 4, alpha: 8}"]
    ws = Workspace(make_workspace(tmp_path / "ws", [  # a git + DVC repo: stage_main reads its stage from dvc.yaml
        f"model.name_or_path={folder}", f"tracking.uri={tracking_uri}", "tracking.registered_model=pretrained-policy",
        "tracking.experiment=pretrained-lora", *ALL_AUTO, *lora, "sft.max_prompt_length=auto"]))
    monkeypatch.setenv("RLHF_WORKSPACE", str(ws.root))
    params = load_params(ws.params_file)
    for stage in PIPELINE:
        if stage in TRACKED:  # the stage's entry point: its MLflow run records the lengths it used
            stage_main(stage, importlib.import_module(f"tasks.{stage}").run)
        else:
            importlib.import_module(f"tasks.{stage}").run(params, ws, None)

    _check_outputs(ws, folder, "Llama")
    for policy in ("sft", "dpo"):
        assert not list(ws.model(policy).glob("adapter_*")), "LoRA merged: a plain model"
    prepare = _metrics(ws, "prepare")
    assert prepare["lengths/context_length"] == 30
    assert prepare["lengths/sft/total/p"] > 30 and prepare["lengths/preference/total/p"] > 30  # the data needs more
    used = {**_metrics(ws, "validate"), **_metrics(ws, "sft"), **_metrics(ws, "reward"), **_metrics(ws, "dpo"),
            **_metrics(ws, "ppo"), **_metrics(ws, "evaluate")}
    prompt = prepare["lengths/prompt/prompt/p"]
    assert used["lengths/sft.max_length"] == used["lengths/reward.max_length"] == used["lengths/dpo.max_length"] == 30
    assert used["lengths/sft.max_prompt_length"] == min(prepare["lengths/sft/prompt/p"], 29)
    assert used["lengths/validate.max_prompt_tokens"] == prompt
    assert used["lengths/ppo.max_new_tokens"] == used["lengths/evaluate.max_new_tokens"] == 30 - prompt  # the room prompts leave
    assert used["lengths/ppo.max_length"] == 30
    assert _metrics(ws, "evaluate")["n_prompts_too_long"] == 0  # held-out prompts fit with their responses

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("pretrained-lora")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(TRACKED)
    assert runs["sft"].data.params["sft.max_length"] == "auto"
    assert runs["sft"].data.metrics["lengths/sft.max_length"] == 30  # the run records what it used
    assert runs["ppo"].data.metrics["lengths/ppo.max_new_tokens"] == used["lengths/ppo.max_new_tokens"]
