"""The recover losses against hand-computed values, naive full-vocabulary references and TRL."""

from __future__ import annotations

import math

import pytest
import torch

from dadpo.recover import losses
from dadpo.recover.losses import (
    dadpo_loss,
    dadpo_margins,
    dpo_loss,
    linear_token_logps,
    sequence_logps,
    sft_loss,
    token_kd_loss,
    token_logps,
    topk_with_tail,
)

torch.manual_seed(0)


def test_token_logps_match_log_softmax_values_and_grads():
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)
    ours = token_logps(logits, labels, chunk=8)  # 5 chunks, the last one ragged
    (ours.double() * weights).sum().backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    assert torch.allclose(g_ours, logits.grad, atol=1e-6)


@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["recompute", "keep-softmax"])
def test_linear_token_logps_never_needs_logits_and_matches_reference(keep_bytes, monkeypatch):
    monkeypatch.setattr(losses, "KEEP_PROBS_BYTES", keep_bytes)
    hidden = torch.randn(29, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (29,))
    w = torch.randn(29)
    (linear_token_logps(hidden, weight, labels, chunk=7) * w).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    assert torch.allclose(linear_token_logps(hidden, weight, labels, chunk=7), ref, atol=1e-5)
    assert torch.allclose(gh, hidden.grad, atol=1e-5)
    assert torch.allclose(gw, weight.grad, atol=1e-5)


def test_linear_token_logps_bf16_hidden_close_to_fp32():
    hidden = torch.randn(64, 32)
    weight = torch.randn(100, 32) / 4
    labels = torch.randint(0, 100, (64,))
    ref = linear_token_logps(hidden, weight, labels)
    low = linear_token_logps(hidden.bfloat16(), weight, labels)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: bf16 matmuls in forward and backward
        auto = linear_token_logps(h, weight, labels)
    auto.sum().backward()
    assert (auto - ref).abs().max() < 0.1 and h.grad.dtype == torch.float32 and (auto != ref).any()


@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["recompute", "keep-softmax"])
def test_linear_token_logps_bf16_gradient_of_a_confident_label(keep_bytes, monkeypatch):
    """p(label) ≈ 0.9997: its logit's gradient 1 − p must not drown in bf16 rounding of p (≈ 0.002)."""
    monkeypatch.setattr(losses, "KEEP_PROBS_BYTES", keep_bytes)
    weight = torch.eye(8)
    hidden = torch.zeros(1, 8)
    hidden[0, 3] = 9.0  # logit 9 against seven zeros: 1 − p = 7e⁻⁹/(1 + 7e⁻⁹) ≈ 8.6e-4
    labels = torch.tensor([3])
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_token_logps(hidden, w, labels).sum().backward()
    ref = weight.clone().requires_grad_()
    torch.log_softmax(hidden @ ref.T, -1)[0, 3].backward()
    assert torch.allclose(w.grad[3, 3], ref.grad[3, 3], rtol=0.02)
    assert torch.allclose(w.grad, ref.grad, atol=1e-3)


def test_sequence_logps_skip_prompt_and_padding():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    sums, counts = sequence_logps(logits, labels, chunk=2)
    lsm = torch.log_softmax(logits, -1)
    # position t predicts label t+1
    row0 = lsm[0, 1, 3] + lsm[0, 2, 4]
    row1 = lsm[1, 0, 1] + lsm[1, 1, 2] + lsm[1, 2, 6] + lsm[1, 3, 0]
    assert torch.allclose(sums, torch.stack([row0, row1]), atol=1e-6)
    assert counts.tolist() == [2, 4]


def test_dpo_loss_hand_computed():
    # Δ_ref = (-1 - -1.5) - (-2 - -1.5) = 1.0 → loss = −log σ(0.5·1) = log(1 + e^-0.5)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-7)


def test_dadpo_loss_hand_computed_and_margins():
    pc, pr, rc, rr, tc, tr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5, -8.0, -15.0))
    d_ref, d_te = dadpo_margins(pc, pr, rc, rr, tc, tr)
    assert d_ref.item() == pytest.approx(2.0 - 0.5)  # (pc−pr) − (rc−rr)
    assert d_te.item() == pytest.approx(2.0 - 7.0)  # (pc−pr) − (tc−tr)
    u = 0.2 * 1.5 + 0.3 * -5.0
    loss = dadpo_loss(pc, pr, rc, rr, tc, tr, beta1=0.2, beta2=0.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-u)), abs=1e-6)


def test_mean_margins_divide_each_response_by_its_own_length():
    """margin: mean — the same pair as above with a 4-token chosen and a 10-token rejected response."""
    from dadpo.recover.pairs import pair_logps

    batch = {"ref_chosen_logps": torch.tensor([-11.0]), "ref_rejected_logps": torch.tensor([-11.5]),
             "teacher_chosen_logps": torch.tensor([-8.0]), "teacher_rejected_logps": torch.tensor([-15.0])}
    sums, counts = torch.tensor([-10.0, -12.0]), torch.tensor([4, 10])
    summed = pair_logps(sums, counts, batch, 1, "sum")
    assert [x.item() for x in summed] == [-10.0, -12.0, -11.0, -11.5, -8.0, -15.0]
    pc, pr, rc, rr, tc, tr = pair_logps(sums, counts, batch, 1, "mean")
    assert [x.item() for x in (pc, pr, rc, rr, tc, tr)] == pytest.approx([-2.5, -1.2, -2.75, -1.15, -2.0, -1.5])
    d_ref, d_te = dadpo_margins(pc, pr, rc, rr, tc, tr)
    assert d_ref.item() == pytest.approx((-2.5 + 1.2) - (-2.75 + 1.15))  # +0.3
    assert d_te.item() == pytest.approx((-2.5 + 1.2) - (-2.0 + 1.5))  # −0.8
    u = 0.1 * 0.3 + 0.5 * -0.8
    loss = dadpo_loss(pc, pr, rc, rr, tc, tr, beta1=0.1, beta2=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-u)), abs=1e-6)
    assert losses.per_token(torch.tensor([-6.0]), torch.tensor([0])).item() == -6.0  # an empty response: no /0


def test_teacher_term_stats_on_a_saturated_and_a_live_pair():
    # pair 1: Δ_te = −130 nats (sequence sums of long answers): u = 0.1·0 + 0.1·(−130) = −13, σ(13) ≈ 1
    # pair 2: Δ_te = +2: u = 0.1·1 + 0.1·2 = 0.3, σ(−0.3) = 0.4256
    stats = losses.teacher_term_stats(torch.tensor([0.0, 1.0]), torch.tensor([-130.0, 2.0]), 0.1, 0.1)
    assert stats["pairs"] == 2 and stats["saturated"] == 0.5
    assert stats["u_mean"] == pytest.approx((-13 + 0.3) / 2)
    assert stats["weight"] == pytest.approx((1 / (1 + math.exp(-13)) + 1 / (1 + math.exp(0.3))) / 2)
    assert stats["margin_ref"] == 0.5 and stats["margin_te"] == -64.0
    assert stats["u_q05"] == pytest.approx(-13 + 0.05 * 13.3) and stats["u_q95"] == pytest.approx(-13 + 0.95 * 13.3)


def test_dadpo_with_beta2_zero_is_ddpo_exactly():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, generator=g) * 20 for _ in range(6)]
    assert torch.equal(dadpo_loss(*xs, beta1=0.3, beta2=0.0), dpo_loss(*xs[:4], beta=0.3))


def test_dadpo_equals_rescaled_dpo_minus_constant_teacher_offset():
    """u = (β1+β2)·Δ_ref − β2·δ_te, δ_te a per-pair constant: the teacher costs one scoring pass."""
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr, tc, tr = (torch.randn(32, generator=g) * 10 for _ in range(6))
    b1, b2 = 0.1, 0.4
    d_ref, _ = dadpo_margins(pc, pr, rc, rr, tc, tr)
    delta_te = (tc - rc) - (tr - rr)
    expected = -torch.nn.functional.logsigmoid((b1 + b2) * d_ref - b2 * delta_te)
    assert torch.allclose(dadpo_loss(pc, pr, rc, rr, tc, tr, b1, b2), expected, atol=1e-5)


def test_sft_loss_is_mean_token_nll():
    assert sft_loss(torch.tensor([-1.0, -2.0, -3.0])).item() == pytest.approx(2.0)


def test_topk_with_tail_holds_the_rest_of_the_mass():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    full = topk_with_tail(lp)
    assert torch.allclose(full.exp(), torch.tensor([[0.5, 0.2, 0.3]]), atol=1e-6)


def test_kd_forward_kl_hand_computed_with_tail():
    # teacher p = (0.6, 0.3, 0.1), k = 1 → buckets (0.6 | 0.4); student q = (0.2, 0.5, 0.3) → (0.2 | 0.8)
    student_logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    t_lp, t_id = torch.log(torch.tensor([[0.6]])), torch.tensor([[0]])
    fwd = token_kd_loss(student_logits, t_lp, t_id, "fwd")
    rev = token_kd_loss(student_logits, t_lp, t_id, "rev")
    assert fwd.item() == pytest.approx(0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8), abs=1e-5)
    assert rev.item() == pytest.approx(0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4), abs=1e-5)


@pytest.mark.parametrize("kind,beta", [("fwd", 0.5), ("rev", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0),
                                       ("jsd", 1.0)])
def test_kd_with_full_vocabulary_equals_trl_generalized_jsd(kind, beta):
    from trl.experimental.gkd import GKDTrainer

    V = 30
    s, t = torch.randn(6, V) * 2, torch.randn(6, V) * 2
    t_lp, t_id = torch.log_softmax(t, -1).topk(V, -1)  # k = V: the tail is empty, so this is exact
    ours = token_kd_loss(s, t_lp, t_id, kind, beta)
    trl_beta = {"fwd": 0.0, "rev": 1.0}.get(kind, beta)
    theirs = GKDTrainer.generalized_jsd_loss(s[None], t[None], beta=trl_beta, reduction="none")[0].sum(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_kd_topk_is_lower_bound_of_full_kl():
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    full_lp, full_id = torch.log_softmax(t, -1).topk(50, -1)
    k_lp, k_id = torch.log_softmax(t, -1).topk(5, -1)
    full = token_kd_loss(s, full_lp, full_id, "fwd")
    coarse = token_kd_loss(s, k_lp, k_id, "fwd")
    assert (coarse <= full + 1e-6).all() and (coarse > 0).all()


def test_dpo_loss_equals_trl_sigmoid_dpo_loss(tmp_path, smollm_dir):
    """Same two pairs through TRL 1.16's DPOTrainer (policy + resident reference) and through our chunked
    sequence log-probs + dpo_loss: the losses agree to 1e-6."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from dadpo.models import load_tokenizer
    from dadpo.recover.forward import response_logps

    tok = load_tokenizer(str(smollm_dir))
    tok.padding_side = "right"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)

    def turn(role, text):
        return [{"role": role, "content": text}]

    rows = [{"prompt": turn("user", "Name a colour."), "chosen": turn("assistant", "Blue, like the sky."),
             "rejected": turn("assistant", "Seven.")},
            {"prompt": turn("user", "What is 2+2?"), "chosen": turn("assistant", "4"),
             "rejected": turn("assistant", "It is five, I think.")}]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, beta=0.3, report_to="none",
                     use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    n_resp = batch["input_ids"].shape[1] - 1
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
              "use_cache": False, "fused_lm_head": True}
        pol = trainer.model(**kw).log_probs[:, -n_resp:].sum(1)  # TRL's own sequence log-probs
        rf = trainer.ref_model(**kw).log_probs[:, -n_resp:].sum(1)
        ours_pol = response_logps(policy, batch["input_ids"], batch["attention_mask"], labels).sums
    ours = dpo_loss(pol[:2], pol[2:], rf[:2], rf[2:], beta=0.3).mean()
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert abs(ours.item() - math.log(2)) > 1e-4  # different models: not the trivial log 2 of equal pairs
    assert torch.allclose(ours_pol, pol, rtol=1e-4)  # and our chunked log-probs agree with TRL's
