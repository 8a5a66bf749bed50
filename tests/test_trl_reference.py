"""Our losses and log-probs reproduce TRL 1.16's trainers' losses on identical batches (fp32, CPU).

TRL is used only as a reference here. A tiny word-level tokenizer and a 2-layer GPT-2 are made in a temporary
directory; TRL tokenises and collates, and we compute on TRL's collated tensors, so any difference is in the
numerics of the loss and log-prob code, not in tokenisation.

Found in TRL 1.16 (see ``trl/trainer/dpo_trainer.py``):
* DPO sums completion log-probs; ``ipo`` divides each sum by the completion length (our ``average=True``).
* the ``sigmoid`` loss ignores ``label_smoothing`` (only ``robust``/``exo_pair``/``aot*`` read it), whereas our
  ``sigmoid`` with ``ε > 0`` is conservative DPO. ``test_trl_sigmoid_ignores_label_smoothing`` pins this down.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from tokenizers import trainers as tok_trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from rlhf_core.logprobs import causal_lm_logits, sequence_logprobs  # noqa: E402
from rlhf_core.losses import dpo_loss, reward_loss, sft_loss  # noqa: E402

PROMPTS = [
    "question : what colour is the sky ? answer :",
    "question : what does the cat eat ? answer :",
    "question : name a small animal ? answer :",
    "question : what colour is grass ? answer :",
]
CHOSEN = [" blue", " the cat eats fish", " a mouse", " grass is green"]
REJECTED = [" green grass and trees", " blue", " the big red sky is blue", " red"]
MARGINS = [0.0, 1.0, 0.5, 2.0]
TOL = 1e-5

# TRL 1.16 itself still calls the deprecated `is_gradient_checkpointing`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _tokenizer() -> PreTrainedTokenizerFast:
    corpus = PROMPTS + CHOSEN + REJECTED
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, tok_trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def _gpt2_config(tok: PreTrainedTokenizerFast, **extra: object) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,  # deterministic forwards
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny causal LM and sequence-classification model, each with the tokenizer beside it."""
    root = tmp_path_factory.mktemp("trl_ref")
    tok = _tokenizer()
    torch.manual_seed(0)
    lm_dir, rm_dir = root / "lm", root / "rm"
    GPT2LMHeadModel(_gpt2_config(tok)).save_pretrained(lm_dir)
    GPT2ForSequenceClassification(_gpt2_config(tok, num_labels=1)).save_pretrained(rm_dir)
    tok.save_pretrained(lm_dir)
    tok.save_pretrained(rm_dir)
    return {"root": root, "lm": lm_dir, "rm": rm_dir}


def _common_args(out: Path) -> dict[str, object]:
    return {
        "output_dir": str(out), "use_cpu": True, "bf16": False, "report_to": [],
        "activation_checkpointing": False,  # the new name of `gradient_checkpointing` (TRL defaults it to True)
        "per_device_train_batch_size": len(PROMPTS), "disable_tqdm": True, "seed": 0,
    }


def _collate(trainer: object, columns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    rows = [{c: trainer.train_dataset[i][c] for c in columns} for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


# ----------------------------------------------------------------------------------------------- DPO


def _dpo_trainer(assets: dict[str, Path], loss_type: str, beta: float, eps: float) -> object:
    config = trl.DPOConfig(
        **_common_args(assets["root"] / f"dpo_{loss_type}"),
        loss_type=loss_type, beta=beta, label_smoothing=eps, precompute_ref_log_probs=False,
    )
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    return trl.DPOTrainer(model=str(assets["lm"]), args=config, train_dataset=data)


def _perturb(model: torch.nn.Module) -> None:
    """A deterministic change to the (tied) output embedding so that π_θ ≠ π_ref clearly."""
    weight = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        weight.add_(0.5 * torch.randn(weight.shape, generator=g))


def _our_dpo(trainer: object, batch: dict, *, loss_type: str, beta: float, eps: float) -> tuple[torch.Tensor, ...]:
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    average = loss_type == "ipo"  # TRL length-normalises IPO only
    with torch.no_grad():
        policy = sequence_logprobs(trainer.model, *args, average=average)  # (2B,) chosen rows first
        ref = sequence_logprobs(trainer.ref_model, *args, average=average)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)


def test_dpo_first_loss_with_policy_equal_to_reference_is_ln2(assets: dict[str, Path]) -> None:
    trainer = _dpo_trainer(assets, "sigmoid", beta=0.1, eps=0.0)
    batch = _collate(trainer, ("prompt_ids", "chosen_ids", "rejected_ids"))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    ours, _, _ = _our_dpo(trainer, batch, loss_type="sigmoid", beta=0.1, eps=0.0)
    assert trl_loss.item() == pytest.approx(math.log(2), abs=TOL)
    assert ours.mean().item() == pytest.approx(math.log(2), abs=TOL)


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.2, 0.0), ("robust", 0.3, 0.2)],
)
def test_dpo_loss_matches_trl(assets: dict[str, Path], loss_type: str, beta: float, eps: float) -> None:
    trainer = _dpo_trainer(assets, loss_type, beta, eps)
    _perturb(trainer.model)
    batch = _collate(trainer, ("prompt_ids", "chosen_ids", "rejected_ids"))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    ours, chosen_r, rejected_r = _our_dpo(trainer, batch, loss_type=loss_type, beta=beta, eps=eps)
    assert (chosen_r - rejected_r).abs().max() > 0.1  # the perturbation really moved the policy
    assert ours.mean().item() == pytest.approx(trl_loss.item(), abs=TOL)


def test_trl_sigmoid_ignores_label_smoothing(assets: dict[str, Path]) -> None:
    trainer = _dpo_trainer(assets, "sigmoid", beta=0.1, eps=0.2)
    _perturb(trainer.model)
    batch = _collate(trainer, ("prompt_ids", "chosen_ids", "rejected_ids"))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    plain, _, _ = _our_dpo(trainer, batch, loss_type="sigmoid", beta=0.1, eps=0.0)
    conservative, _, _ = _our_dpo(trainer, batch, loss_type="sigmoid", beta=0.1, eps=0.2)
    assert trl_loss == pytest.approx(plain.mean().item(), abs=TOL)
    assert abs(trl_loss - conservative.mean().item()) > 1e-3


# -------------------------------------------------------------------------------------------- reward


def test_reward_loss_matches_trl(assets: dict[str, Path]) -> None:
    config = trl.RewardConfig(**_common_args(assets["root"] / "rm_out"))
    data = datasets.Dataset.from_dict(
        {"chosen": [p + c for p, c in zip(PROMPTS, CHOSEN)], "rejected": [p + r for p, r in zip(PROMPTS, REJECTED)],
         "margin": MARGINS}
    )
    trainer = trl.RewardTrainer(model=str(assets["rm"]), args=config, train_dataset=data)
    batch = _collate(trainer, ("chosen_ids", "rejected_ids", "margin"))
    assert "margin" in batch
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        # Our own pooling: the score head on the hidden state of each row's last attended token.
        model = trainer.model
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]  # (2B,T,H)
        positions = torch.arange(batch["attention_mask"].shape[1])  # (T,)
        last = (batch["attention_mask"] * positions).argmax(-1)  # (2B,) index of the last real token
        scores = model.score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1)  # (2B,)
    chosen, rejected = scores.chunk(2)
    ours = reward_loss(chosen, rejected, batch["margin"]).mean().item()
    assert ours == pytest.approx(trl_loss, abs=TOL)
    assert ours != pytest.approx(reward_loss(chosen, rejected).mean().item(), abs=1e-4)  # the margin mattered


# ----------------------------------------------------------------------------------------------- SFT


def test_sft_completion_only_loss_matches_trl(assets: dict[str, Path]) -> None:
    config = trl.SFTConfig(**_common_args(assets["root"] / "sft_out"), completion_only_loss=True)
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    trainer = trl.SFTTrainer(model=str(assets["lm"]), args=config, train_dataset=data)
    _perturb(trainer.model)
    batch = _collate(trainer, ("input_ids", "labels"))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        logits = causal_lm_logits(trainer.model, batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = labels != -100
    # Independent check that TRL's labels are completion-only: completion tokens + EOS per row.
    tok = trainer.processing_class
    for row, (prompt, completion) in enumerate(zip(PROMPTS, CHOSEN)):
        n_completion = len(tok(prompt + completion)["input_ids"]) - len(tok(prompt)["input_ids"]) + 1
        assert int(mask[row].sum()) == n_completion
    ours = sft_loss(logits[:, :-1], labels, mask).item()
    assert ours == pytest.approx(trl_loss, abs=TOL)
