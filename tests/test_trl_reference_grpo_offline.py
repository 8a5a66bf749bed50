"""GRPO/RLOO advantages, the GRPO loss and the KTO, ORPO and SimPO losses against TRL 1.16 (fp32, CPU).

TRL is only the reference. It has no standalone tensor loss for GRPO or KTO, so each test runs TRL's own trainer
code on a tiny GPT-2 made in a temporary directory (no network):

* GRPO loss: ``GRPOTrainer._compute_loss`` on an inputs dict holding our old/ref log-probs and advantages; the only
  thing replaced is the trainer's per-token log-prob function, which returns our policy log-probs (with grad), so
  loss, gradient and TRL's logged clip/KL metrics are compared on identical tensors.
* Advantages: ``GRPOTrainer``/``RLOOTrainer._generate_and_score_completions`` unpatched, with a reward function that
  returns a reward column of the dataset (TRL passes extra columns to reward functions), so TRL's own
  normalisation code runs on our rewards; generated completions are ignored.
* KTO: ``KTOTrainer.compute_loss`` on TRL's collated batch vs ``kto_loss`` on our ``sequence_logprobs`` of the same
  batch, with the KL reference point estimated as TRL does (mean log-ratio on the mismatched KL pairs).
* ORPO and SimPO exist in TRL 1.16 only under ``trl.experimental`` (``ORPOTrainer.odds_ratio_loss``,
  ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``); both are tensor-level methods of a trainer, called on
  length-averaged log-probs. TRL's ORPO returns ``+β·log σ(log OR)`` and subtracts its mean from the NLL; ours
  returns the loss term ``−β·log σ(log OR)`` that the trainer adds, so ours = −TRL's per pair.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from tokenizers import trainers as tok_trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from rlhf_core.logprobs import sequence_logprobs  # noqa: E402
from rlhf_core.losses import kto_loss, orpo_loss, simpo_loss  # noqa: E402
from rlhf_core.rl import group_advantages, grpo_loss, rloo_advantages  # noqa: E402

PROMPTS = ["question : what colour is the sky ? answer :", "question : what does the cat eat ? answer :",
           "question : name a small animal ? answer :", "question : what colour is grass ? answer :"]
GOOD = [" blue", " the cat eats fish", " a mouse", " grass is green"]
BAD = [" green grass and trees", " blue", " the big red sky is blue", " red"]
TOL = 1e-5
K = 3  # completions per prompt
MAX_COMPLETION = 8  # > T below, so dr_grpo's divisor is not just T

pytestmark = [
    # TRL 1.16 itself uses deprecated transformers names and warns on experimental imports; not ours to fix.
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'"),
]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer GPT-2 with a word-level tokenizer trained on the strings above."""
    root = tmp_path_factory.mktemp("trl_ref_group")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok.train_from_iterator(PROMPTS + GOOD + BAD, tok_trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic forwards
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return root / "lm"


def _args(out: Path, batch_size: int) -> dict[str, object]:
    return {"output_dir": str(out), "use_cpu": True, "bf16": False, "report_to": [], "disable_tqdm": True,
            "per_device_train_batch_size": batch_size, "seed": 0}


def _reward_column(prompts: list, completions: list, reward: list[float], **_: object) -> list[float]:
    """Reward function handing TRL the dataset's ``reward`` column unchanged."""
    return list(reward)


def _perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Deterministic noise on the (tied) output embedding, so that two copies of the model differ."""
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.add_(scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------------- advantages

REWARDS = [0.5, 1.0, 3.0, 2.0, 2.0, 2.0, -1.0, 0.25, 4.0, 7.0, -3.0, 0.0]  # 4 prompts × K; group 2 all equal


def _trl_advantages(trainer: object, rewards: list[float]) -> torch.Tensor:
    inputs = [{"prompt": PROMPTS[i // K], "reward": r} for i, r in enumerate(rewards)]  # consecutive groups
    trainer.model.eval()
    return trainer._generate_and_score_completions(inputs)["advantages"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo(lm_dir: Path, tmp_path: Path, scale: str) -> None:
    config = trl.GRPOConfig(**_args(tmp_path, len(REWARDS)), num_generations=K, max_completion_length=3,
                            scale_rewards=scale, beta=0.0)
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "reward": [0.0] * len(PROMPTS)})
    trainer = trl.GRPOTrainer(model=str(lm_dir), reward_funcs=_reward_column, args=config, train_dataset=data)
    expected = _trl_advantages(trainer, REWARDS)
    ours = group_advantages(torch.tensor(REWARDS), K, scale=scale)
    assert expected.shape == ours.shape
    assert (ours - expected).abs().max().item() < TOL
    assert ours[3:6].abs().max() == 0  # the equal-reward group


def test_rloo_advantages_match_trl_rloo(lm_dir: Path, tmp_path: Path) -> None:
    config = trl.RLOOConfig(**_args(tmp_path, len(REWARDS)), num_generations=K, max_completion_length=3,
                            beta=0.0, normalize_advantages=False)
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "reward": [0.0] * len(PROMPTS)})
    trainer = trl.RLOOTrainer(model=str(lm_dir), reward_funcs=_reward_column, args=config, train_dataset=data)
    expected = _trl_advantages(trainer, REWARDS)
    ours = rloo_advantages(torch.tensor(REWARDS), K)
    assert (ours - expected).abs().max().item() < TOL


# -------------------------------------------------------------------------------------------- GRPO loss


def _grpo_tensors(seed: int, b: int = 2 * K, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(b, t, generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    for row, n in enumerate([t, 2, 4, 1, t, 3][:b]):
        mask[row, :n] = 1  # right padding after EOS, as TRL's completion_mask
    return {
        "logps": logps,
        "old": logps + 0.5 * torch.randn(b, t, generator=g),  # ratios beyond both clip bounds
        "ref": logps + 0.5 * torch.randn(b, t, generator=g),
        "advantages": group_advantages(torch.randn(b, generator=g), K),
        "mask": mask,
    }


def _trl_grpo(lm_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch, x: dict[str, torch.Tensor],
              **config: object) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """TRL's ``_compute_loss`` on ``x``: (loss, gradient w.r.t. the policy log-probs, logged metrics)."""
    b, t = x["mask"].shape
    args = trl.GRPOConfig(**_args(out, b), num_generations=K, max_completion_length=MAX_COMPLETION, **config)
    data = datasets.Dataset.from_dict({"prompt": PROMPTS[:2]})
    trainer = trl.GRPOTrainer(model=str(lm_dir), reward_funcs=_reward_column, args=args, train_dataset=data)
    trainer.model.eval()  # eval: no gradient-accumulation divisor in TRL's normaliser
    logps = x["logps"].clone().requires_grad_(True)
    # The one replaced piece: the model forward that would compute the policy's per-token log-probs.
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": x["mask"],
        "advantages": x["advantages"], "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"],
        "num_items_in_batch": x["mask"].sum(),  # dapo's normaliser: this batch's tokens (one process)
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps_high"),
    [("grpo", 0.0, 0.28), ("grpo", 0.1, None), ("bnpo", 0.0, None), ("bnpo", 0.2, 0.28),
     ("dr_grpo", 0.0, 0.28), ("dr_grpo", 0.04, 0.28), ("dapo", 0.1, 0.28)],
)
def test_grpo_loss_matches_trl(lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               loss_type: str, beta: float, eps_high: float | None) -> None:
    x = _grpo_tensors(seed=len(loss_type) + int(100 * beta))
    # use_bias_correction_kl=False: TRL 1.16 defaults to weighting the KL by ρ (see the next test).
    trl_loss, trl_grad, metrics = _trl_grpo(lm_dir, tmp_path, monkeypatch, x, loss_type=loss_type, beta=beta,
                                            epsilon=0.2, epsilon_high=eps_high, use_bias_correction_kl=False)
    logps = x["logps"].clone().requires_grad_(True)
    loss, stats = grpo_loss(logps, x["old"], x["advantages"], x["mask"], epsilon_low=0.2, epsilon_high=eps_high,
                            loss_type=loss_type, ref_logps=x["ref"] if beta else None, beta=beta,
                            max_completion_length=MAX_COMPLETION)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < TOL
    assert (logps.grad - trl_grad).abs().max().item() < TOL
    assert stats["clipfrac"].item() == pytest.approx(metrics["clip_ratio/region_mean"], abs=TOL)
    assert stats["clipfrac_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"], abs=TOL)
    assert stats["clipfrac_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], abs=TOL)
    assert stats["clipfrac_low"] > 0 and stats["clipfrac_high"] > 0  # both clip bounds were exercised
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"], abs=TOL)


def test_trl_default_weights_the_kl_term_by_the_ratio(lm_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL 1.16's default ``use_bias_correction_kl=True`` (DeepSeek-V3.2) multiplies the per-token KL by ρ;
    ``grpo_loss`` keeps the GRPO paper's unweighted ``β·k3``. Pinned down: the two differ exactly by that weight."""
    x, beta = _grpo_tensors(seed=11), 0.2
    trl_loss, _, _ = _trl_grpo(lm_dir, tmp_path, monkeypatch, x, loss_type="bnpo", beta=beta)
    ours, _ = grpo_loss(x["logps"], x["old"], x["advantages"], x["mask"], loss_type="bnpo",
                            ref_logps=x["ref"], beta=beta)
    m = x["mask"].bool()
    ratio = torch.exp(x["logps"] - x["old"])[m]
    d = (x["ref"] - x["logps"])[m]
    k3 = torch.exp(d) - d - 1
    weighted = ours + beta * ((ratio - 1) * k3).mean()  # swap β·k3 for β·ρ·k3, token mean (bnpo)
    assert abs(trl_loss.item() - ours.item()) > 10 * TOL
    assert abs(trl_loss.item() - weighted.item()) < TOL


# ------------------------------------------------------------------------------------------------ KTO


@pytest.mark.parametrize(("ref_noise", "policy_noise", "kl_clamped"), [(0.1, 0.0, False), (0.0, 0.5, True)])
def test_kto_loss_matches_trl(lm_dir: Path, tmp_path: Path, ref_noise: float, policy_noise: float,
                              kl_clamped: bool) -> None:
    beta, w_d, w_u = 0.5, 1.0, 1.5
    config = trl.KTOConfig(**_args(tmp_path, 8), activation_checkpointing=False, beta=beta,
                           desirable_weight=w_d, undesirable_weight=w_u)
    data = datasets.Dataset.from_dict({"prompt": PROMPTS * 2, "completion": GOOD + BAD,
                                       "label": [True, False, True, True, False, True, False, False]})
    trainer = trl.KTOTrainer(model=str(lm_dir), args=config, train_dataset=data)
    _perturb(trainer.ref_model, ref_noise, seed=1)  # a noisier reference: log π − log π_ref > 0, KL > 0
    _perturb(trainer.model, policy_noise, seed=2)  # a noisier policy: KL estimate < 0, clamped to 0
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()

        def logps(model: torch.nn.Module, prefix: str = "") -> torch.Tensor:
            ids, att, comp = (batch[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask"))
            return sequence_logprobs(model, ids, att, comp)  # (B,) summed, as TRL's KTO

        policy, ref = logps(trainer.model), logps(trainer.ref_model)
        kl = (logps(trainer.model, "KL_") - logps(trainer.ref_model, "KL_")).mean()
    losses, rewards = kto_loss(policy, ref, batch["label"], kl, beta=beta, desirable_weight=w_d,
                               undesirable_weight=w_u)
    assert (kl.item() < 0) == kl_clamped and abs(kl.item()) > 0.5  # the case we meant to build
    assert abs(losses.mean().item() - trl_loss) < TOL
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    desirable = batch["label"].bool()
    assert rewards[desirable].mean().item() == pytest.approx(metrics["rewards/chosen"], abs=TOL)
    assert rewards[~desirable].mean().item() == pytest.approx(metrics["rewards/rejected"], abs=TOL)
    assert max(kl.item(), 0.0) == pytest.approx(metrics["kl"], abs=TOL)


# ------------------------------------------------------------------------------------------ ORPO, SimPO


def _avg_logps() -> tuple[torch.Tensor, torch.Tensor]:
    """Length-averaged log-probs: random ones plus the numerically hard spots (near 0, around −ln 2, far out)."""
    g = torch.Generator().manual_seed(7)
    edge_c = torch.tensor([-1e-7, -1e-3, -0.6931, -0.6932, -25.0, -0.05])
    edge_r = torch.tensor([-2.0, -1e-5, -0.6932, -0.6931, -0.01, -25.0])
    return (torch.cat([-4 * torch.rand(16, generator=g), edge_c]),
            torch.cat([-4 * torch.rand(16, generator=g), edge_r]))


def _pairs() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_matches_trl_experimental(lm_dir: Path, tmp_path: Path, beta: float) -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer = ORPOTrainer(model=str(lm_dir), args=ORPOConfig(**_args(tmp_path, 4), beta=beta),
                          train_dataset=_pairs(), processing_class=PreTrainedTokenizerFast.from_pretrained(lm_dir))
    c, r = _avg_logps()
    c_trl, r_trl = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    trl_losses, _, _, _, trl_mean_log_odds = trainer.odds_ratio_loss(c_trl, r_trl)
    (-trl_losses.sum()).backward()
    c_ours, r_ours = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    losses, log_odds = orpo_loss(c_ours, r_ours, beta=beta)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert (losses + trl_losses).abs().max().item() < TOL
    assert log_odds.mean().item() == pytest.approx(trl_mean_log_odds.item(), abs=TOL)
    assert (c_ours.grad - c_trl.grad).abs().max().item() < TOL
    assert (r_ours.grad - r_trl.grad).abs().max().item() < TOL


@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.5, 0.0), (10.0, 3.0, 0.1)])
def test_simpo_loss_matches_trl_experimental_cpo(lm_dir: Path, tmp_path: Path, beta: float, gamma: float,
                                                 eps: float) -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = CPOConfig(**_args(tmp_path, 4), loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0,
                       label_smoothing=eps)
    trainer = CPOTrainer(model=str(lm_dir), args=config, train_dataset=_pairs(),
                         processing_class=PreTrainedTokenizerFast.from_pretrained(lm_dir))
    c, r = _avg_logps()
    trl_losses, _, _ = trainer.cpo_loss(c, r)
    ours = simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=eps)
    assert (ours - trl_losses).abs().max().item() < TOL
