"""GRPO math against hand-computed values, a toy GRPO step, rollouts, pass@k / maj@k, rejection sampling, and
the `sobre grpo` / `sobre eval` CLI contract."""

import copy
import json
import math
import subprocess
import sys
import zlib
from dataclasses import replace

import pytest
import torch

import sobre
from sobre.cli import main
from sobre.grpo import GRPOArgs
from sobre.objective import Surrogate, advantages, completion_mask, kl_k3, policy_loss, token_logprobs
from sobre.rollout import Rollout, maj_at_k, pass_at_k, sign_test
from sobre.update import policy_step

from conftest import SPARSE_MODELS, crash_then_resume, random_model, untimed_rows, v4_model

# two completions: ratios 1.5, 0.9 (advantage +1) and 0.7, padding (advantage -1)
RATIO = torch.tensor([[1.5, 0.9], [0.7, 1.0]])
MASK = torch.tensor([[True, True], [True, False]])
ADV = torch.tensor([1.0, -1.0])


def loss_of(variant, eps_high=0.2, logp=None, ref_logp=None, weight=None, sampled=None, adv=ADV, **kw):
    """policy_loss of the ratios RATIO (old log-probs 0) or of logp, Surrogate(variant, 0.2, eps_high, **kw)."""
    return policy_loss(RATIO.log() if logp is None else logp, torch.zeros(2, 2), adv, MASK,
                       Surrogate(variant, 0.2, eps_high, **kw), n_seqs=2, n_tokens=3, max_len=2, ref_logp=ref_logp,
                       weight=weight, sampled=sampled)


def test_group_relative_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(advantages(r)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(advantages(r)[1], torch.zeros(4))  # identical rewards: no signal
    assert torch.equal(advantages(r, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch = math.sqrt(4 * 0.5 ** 2 / 7)  # unbiased std of all eight rewards (mean 0.5)
    assert torch.allclose(advantages(r, "batch"), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / (batch + 1e-4))
    equal = torch.full((1, 7), 1.3)  # its mean rounds to 1.3 + 1.2e-7 (1e-3 once std-scaled): 0 all the same
    for scale in ("group", "batch", "none"):
        assert torch.equal(advantages(equal, scale), torch.zeros(1, 7))
    with pytest.raises(ValueError, match="reward scaling"):
        advantages(r, "z")
    with pytest.raises(ValueError, match="--scale-rewards"):
        GRPOArgs(scale_rewards="z").validate()


def test_loss_variants_match_hand_computed_values():
    # per token: -min(r A, clip(r, 0.8, 1.2) A) -> seq 0: -1.2, -0.9; seq 1: +0.8 (its 2nd token is padding)
    loss, st = loss_of("grpo")
    assert loss.item() == pytest.approx(((-1.2 - 0.9) / 2 + 0.8) / 2)  # mean per sequence, then over sequences
    assert st["clip_high"] == 1 and st["clip_low"] == 1  # 1.5 > 1.2 with A > 0; 0.7 < 0.8 with A < 0
    assert loss_of("dapo")[0].item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)  # token-level mean
    assert loss_of("dr_grpo")[0].item() == pytest.approx((-1.2 - 0.9 + 0.8) / (2 * 2))  # constant normaliser
    assert loss_of("dapo", eps_high=0.28)[0].item() == pytest.approx((-1.28 - 0.9 + 0.8) / 3)  # clip-higher
    with pytest.raises(ValueError, match="loss must be"):
        loss_of("ppo")
    # GSPO: each token takes its sequence's ratio exp(mean log-ratio): seq 0 sqrt(1.5 * 0.9) = 1.162 (not clipped),
    # seq 1 0.7 (clipped to 0.8 with A < 0)
    s0 = math.sqrt(1.5 * 0.9)
    loss, st = loss_of("grpo", importance="sequence")
    assert loss.item() == pytest.approx((-s0 + 0.8) / 2)
    assert st["clip_high"] == 0 and st["clip_low"] == 1
    assert loss_of("dapo", importance="sequence")[0].item() == pytest.approx((-2 * s0 + 0.8) / 3)
    with pytest.raises(ValueError, match="importance must be"):
        loss_of("grpo", importance="word")
    with pytest.raises(ValueError, match="--importance"):
        GRPOArgs(importance="word").validate()


def test_cispo_and_two_sided_clipping_match_hand_computed_values():
    """CISPO: -min(r, eps_max) A log p per token, the clipped ratio a constant (its gradient the log-prob's,
    weighed), over the tokens as dapo; delta: the unclipped ratio capped, so a negative-advantage token's ratio
    counts at most delta."""
    logp = RATIO.log().requires_grad_()  # old log-probs 0: the ratios are RATIO
    loss, st = loss_of("cispo", 1.2, logp=logp)
    w = torch.tensor([[1.2, 0.9], [0.7, 0.0]])  # 1.5 clipped at 1.2 (A > 0: counted); padding 0
    assert loss.item() == pytest.approx(-(w * ADV[:, None] * RATIO.log()).sum().item() / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w * ADV[:, None] / 3)
    assert st["clip_high"] == 1 and st["clip_low"] == 0
    # a token of advantage -1 whose ratio grew to 2: -min(2 A, 1.2 A) = 2, capped at delta 1.5 -> 1.5
    ratio, one = torch.tensor([[2.0]]), torch.tensor([[True]])
    args, sizes = (torch.zeros(1, 1), torch.tensor([-1.0]), one), dict(n_seqs=1, n_tokens=1, max_len=1)
    capped = Surrogate("dapo", delta=1.5)
    assert policy_loss(ratio.log(), *args, Surrogate("dapo"), **sizes)[0].item() == pytest.approx(2.0)
    assert policy_loss(ratio.log(), *args, capped, **sizes)[0].item() == pytest.approx(1.5)
    assert policy_loss(torch.tensor([[1.3]]).log(), *args, capped, **sizes)[0].item() == pytest.approx(1.3)
    for bad, says in ((dict(loss="cispo", epsilon_high=0.28), "bounds the ratio itself"),
                      (dict(delta=0.9), "delta > 1"), (dict(loss="cispo", delta=2.0), "--delta")):
        with pytest.raises(ValueError, match=says):
            GRPOArgs(**bad).validate()


def test_k3_kl_and_the_beta_term():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_k3(logp, logp).item() == 0
    ref_lp = torch.full((2, 2), -1.0)
    plain, _ = loss_of("dapo")
    with_kl, st = loss_of("dapo", beta=0.1, ref_logp=ref_lp)
    kl = kl_k3(RATIO.log(), ref_lp)[MASK]
    assert st["kl"] == pytest.approx(kl.sum().item())
    assert (with_kl - plain).item() == pytest.approx(0.1 * kl.sum().item() / 3, rel=1e-5)


def test_soft_gates_and_length_unbiased_losses_match_hand_computed_values():
    """SAPO: -sigmoid(tau (r - 1)) 4 / tau A per token (tau 1 for A > 0, 1.05 else), over each sequence as grpo;
    LUSPO: the clipped surrogate summed over each sequence, averaged over sequences; VESPO: -phi(w) A log p, phi(w)
    = e^l w^k e^-lw of the sequence's ratio (the product of its tokens', times the rollouts' weights), k, l = 2, 3
    for A >= 0 and 3, 2 else, over the tokens as dapo. At ratio 1 each one's gradient is -A x the token's weight."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    t = [-sig(0.5) * 4, -sig(-0.1) * 4, sig(1.05 * -0.3) * 4 / 1.05]
    assert loss_of("sapo")[0].item() == pytest.approx(((t[0] + t[1]) / 2 + t[2]) / 2)
    assert loss_of("sapo", sapo=(2.0, 0.5))[0].item() == pytest.approx(
        ((-sig(1.0) * 2 - sig(-0.2) * 2) / 2 + sig(-0.15) * 8) / 2)
    assert loss_of("luspo")[0].item() == pytest.approx((-1.2 - 0.9 + 0.8) / 2)

    def phi(w, k, lam):
        return math.exp(lam) * w ** k * math.exp(-lam * w)

    lp = RATIO.log()  # (old log-probs 0)
    want = -(phi(1.35, 2, 3) * (lp[0, 0] + lp[0, 1]) - phi(0.7, 3, 2) * lp[1, 0]).item() / 3
    assert loss_of("vespo")[0].item() == pytest.approx(want)
    weight = torch.tensor([[1.0, 2.0], [0.5, 0.0]])  # (the padding's 0 left out of w)
    want = -(phi(2.7, 2, 3) * (lp[0, 0] + lp[0, 1]) - phi(0.35, 3, 2) * lp[1, 0]).item() / 3
    assert loss_of("vespo", weight=weight)[0].item() == pytest.approx(want)
    for variant, w in (("sapo", [[0.25, 0.25], [0.5, 0]]), ("luspo", [[0.5, 0.5], [0.5, 0]]),
                       ("vespo", [[1 / 3, 1 / 3], [1 / 3, 0]])):
        logp = torch.zeros(2, 2, requires_grad=True)
        loss_of(variant, logp=logp)[0].backward()
        torch.testing.assert_close(logp.grad, -ADV[:, None] * torch.tensor(w), msg=variant)
    for bad, says in ((dict(sapo_temperatures=(1.0, 0.0)), "sapo-temperatures"),
                      (dict(vespo_gamma=(2.0, 0.0, 3.0, 2.0)), "vespo-gamma"),
                      (dict(loss="vespo", rollout_bf16=True), "token_truncate or token_mask"),
                      (dict(loss="sapo", delta=2.0), "--delta"), (dict(off_policy_mask=-1.0), "off-policy-mask")):
        with pytest.raises(ValueError, match=says):
            GRPOArgs(**bad).validate()
    GRPOArgs(loss="vespo", rollout_bf16=True, rollout_is="token_mask").validate()


def test_unbiased_kl_and_off_policy_sequence_masking():
    """DeepSeek-V3.2's stabilisers. kl_correction: the k3 term times the ratio, whose gradient at ratio 1 is
    beta (log pi - log ref) grad log pi (plain k3's: beta (1 - ref / pi)). off_policy: a completion of negative
    advantage whose mean log pi_sampler - log pi exceeds the threshold leaves the policy loss (not the KL)."""
    ref = torch.full((2, 2), -1.0)
    plain, _ = loss_of("dapo", beta=0.1, ref_logp=ref)
    corrected, st = loss_of("dapo", beta=0.1, ref_logp=ref, kl_correction=True)
    kl = kl_k3(RATIO.log(), ref) * RATIO
    assert (corrected - loss_of("dapo")[0]).item() == pytest.approx(0.1 * kl[MASK].sum().item() / 3, rel=1e-5)
    assert st["kl"] == pytest.approx(kl[MASK].sum().item()) and corrected.item() != pytest.approx(plain.item())
    for correction, grad in ((True, lambda lp: lp + 1.0), (False, lambda lp: 1 - torch.exp(-1.0 - lp))):
        lp0 = torch.tensor([[-0.5, -2.0], [-1.5, -1.0]])
        logp = lp0.clone().requires_grad_()
        policy_loss(logp, lp0, torch.zeros(2), MASK, Surrogate("dapo", beta=0.1, kl_correction=correction),
                    n_seqs=2, n_tokens=3, max_len=2, ref_logp=ref)[0].backward()
        torch.testing.assert_close(logp.grad, 0.1 * grad(lp0) * MASK / 3, msg=str(correction))
    # the old log-probs drew the rollouts (sampled None): sequence 1 (A = -1) drifted by -log 0.7 = 0.357
    for threshold, masked in ((0.3, 1), (0.4, 0), (0.0, 0)):
        loss, st = loss_of("dapo", off_policy=threshold)
        assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8 * (1 - masked)) / 3)
        assert st.get("off_policy_masked", 0) == masked
    sampled = RATIO.log() + torch.tensor([[9.0, 9.0], [0.2, 0.0]])  # (a positive advantage is never masked)
    assert loss_of("dapo", off_policy=0.3, sampled=sampled)[1]["off_policy_masked"] == 0
    assert loss_of("dapo", off_policy=0.1, sampled=sampled)[1]["off_policy_masked"] == 1
    with_kl = loss_of("dapo", off_policy=0.1, sampled=sampled, beta=0.1, ref_logp=ref)[0]
    assert (with_kl - loss_of("dapo", off_policy=0.1, sampled=sampled)[0]).item() == pytest.approx(
        0.1 * kl_k3(RATIO.log(), ref)[MASK].sum().item() / 3, rel=1e-5)  # (the KL term stays)


def sampled_off_policy(shift: float):
    """A random model and ragged_groups() whose rollouts were drawn by another policy: Rollout.sampled, each token's
    log-prob under the model plus shift."""
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    batch = [r for g, _ in groups for r in g]
    with torch.no_grad():
        logp, mask, _ = token_logprobs(model, batch, shared=False)
    for r, lp, m in zip(batch, logp, mask):
        r.sampled = (lp[m] + shift).tolist()
    return model, groups


def test_off_policy_masking_in_the_update_leaves_out_drifted_negative_completions():
    """--off-policy-mask on rollouts drawn by another policy (--rollout-bf16: Rollout.sampled, here 1 nat above the
    trained policy's log-probs at every token): every completion of negative advantage leaves the policy loss, the
    step equal to one with those advantages set to 0 (dapo: the normaliser is the batch's tokens either way)."""
    from sobre.update import group_advantages
    model, groups = sampled_off_policy(1.0)
    a = GRPOArgs(loss="dapo", micro_batch=4, max_new_tokens=4, rollout_bf16=True, rollout_is="none", clip=0)
    adv = group_advantages(groups, a)
    steps = []
    for threshold, given in ((0.5, adv), (0.0, adv.clamp(min=0))):
        m = copy.deepcopy(model)
        stats = policy_step(m, None, torch.optim.SGD(m.parameters(), lr=1.0), [], groups, replace(a, off_policy_mask=
                        threshold), False, adv=given)
        steps.append((stats, dict(m.named_parameters())))
    assert steps[0][0]["off_policy_masked"] == pytest.approx(float((adv < 0).float().mean()))
    for name, w in steps[0][1].items():
        torch.testing.assert_close(w, steps[1][1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_reference_sync_mixes_the_policy_into_the_reference(tmp_path):
    """--ref-sync-steps (TR-DPO, TRL's sync_ref_model): ref := alpha policy + (1 - alpha) ref, every parameter;
    errors where there is no reference of its own."""
    from sobre.update import sync_reference
    torch.manual_seed(0)
    model, ref = random_model(), random_model()
    want = {n: 0.25 * p.detach() + 0.75 * dict(ref.named_parameters())[n].detach()
            for n, p in model.named_parameters()}
    sync_reference(ref, model, 0.25)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], msg=n)
    for bad, says in ((dict(ref_sync_steps=2), "needs --beta"), (dict(ref_sync_steps=2, beta=0.1, lora_rank=4,
                                                                          init="x"), "adapters off"),
                      (dict(ref_mixup=0.0), "ref-mixup")):
        with pytest.raises(ValueError, match=says):
            GRPOArgs(**bad).validate()


def test_entropy_bonus_raises_the_entropy_and_trains_every_completion():
    """--entropy-coef: with every group's rewards equal (no advantage anywhere) the bonus alone moves the policy,
    through every completion (none left out for its advantage 0), toward a higher entropy at their positions;
    without it the step moves nothing."""
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    flat = [(g, torch.ones(len(g))) for g, _ in groups]
    batch = [r for g, _ in flat for r in g]

    def entropy(m):
        with torch.no_grad():
            ent, mask = token_logprobs(m, batch, entropy=True)[2], completion_mask(batch, "cpu")
        return (ent * mask).sum().item() / mask.sum().item()

    before = entropy(model)
    for coef in (0.0, 1.0):
        stats, params = sgd_step(model, flat, GRPOArgs(entropy_coef=coef, micro_batch=4, max_new_tokens=4,
                                                       clip=1e9))
        m = copy.deepcopy(model)
        m.load_state_dict({k: v.detach() for k, v in params.items()}, strict=False)
        assert stats["signal"] == 0 and (stats["grad_norm"] > 0) == bool(coef)
        assert (entropy(m) > before + 1e-3) == bool(coef), (coef, before, entropy(m))
    for bad in (dict(entropy_coef=-0.1), dict(entropy_coef_range=(0.5, 0.1)), dict(entropy_coef_delta=-1.0)):
        with pytest.raises(ValueError, match="entropy-coef"):
            GRPOArgs(**bad).validate()


@pytest.mark.parametrize("variant,arch,bf16", [("grpo", "deepseek_v3", False), ("dr_grpo", "deepseek_v3", False),
                                               ("dapo", "deepseek_v3", False), ("grpo", "qwen2", False),
                                               ("dapo", "deepseek_v3", True), ("cispo", "deepseek_v3", False),
                                               ("sapo", "deepseek_v3", False), ("vespo", "qwen2", False)])
def test_grpo_step_raises_the_probability_of_the_rewarded_token(variant, arch, bf16):
    torch.manual_seed(0)
    model = random_model(sobre.preset("debug", arch=arch))
    prompt, good, bad = [5, 6, 7], 11, 12

    def p(tok):
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)[tok].item()

    before = p(good), p(bad)
    group = [Rollout(prompt, [t], "", False, float(t == good), 1.0, None) for t in (good, bad, bad, good)]
    a = GRPOArgs(loss=variant, lr=1e-2, mu=2, max_new_tokens=1, bf16=bf16)  # bf16: the update under autocast
    stats = policy_step(model, None, torch.optim.Adam(model.parameters(), lr=1e-2), [],
                    [(group, torch.tensor([r.correct for r in group]))], a, False)
    assert p(good) > 5 * before[0] and p(bad) < before[1], (before, p(good), p(bad))
    assert stats["entropy"] > 0 and 0 <= stats["clip_fraction"] <= 1


def ragged_groups():
    """Three prompts x 3 completions of 1-4 tokens, rewards alternating."""
    prompts = [[5, 6, 7], [9, 3], [4, 4, 8, 1]]
    g = torch.Generator().manual_seed(1)
    groups = []
    for i, prompt in enumerate(prompts):
        rows = [Rollout(prompt, torch.randint(10, 60, (1 + (i + j) % 4,), generator=g).tolist(), "", False,
                        float((i + j) % 2), 1.0, None) for j in range(3)]
        groups.append((rows, torch.tensor([r.correct for r in rows])))
    return groups


def sgd_step(model, groups, a: GRPOArgs):
    """(stats, parameters) of a copy of model after one _update with SGD at lr 1."""
    m = copy.deepcopy(model)
    stats = policy_step(m, None, torch.optim.SGD(m.parameters(), lr=1.0), [], groups, a, False)
    return stats, dict(m.named_parameters())


def same_step(model, steps):
    """Two sgd_step results from the same model: equal loss, entropy and parameters, which moved."""
    (s1, p1), (s2, p2) = steps
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-6) and s1["entropy"] == pytest.approx(s2["entropy"])
    moved = 0
    for name, w in p1.items():
        assert torch.allclose(w, p2[name], atol=1e-6), name
        moved += not torch.equal(w, model.state_dict()[name])
    assert moved > 10


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_micro_batches_add_up_to_the_whole_batch(variant):
    """An update in micro-batches of 4 completions (groups of 3 split across them, ragged lengths) takes the
    same step as one forward over all 9: every loss is normalised by the whole batch's counts."""
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    same_step(model, [sgd_step(model, groups, GRPOArgs(loss=variant, micro_batch=micro, max_new_tokens=4))
                      for micro in (4, 64)])


@pytest.mark.parametrize("variant,kw", [("grpo", {}), ("dr_grpo", {}), ("dapo", {}), ("cispo", {}), ("sapo", {}),
                                        ("luspo", {}), ("vespo", {}), ("grpo", dict(delta=1.5)),
                                        ("dapo", dict(top_entropy_quantile=0.4)), ("dapo", dict(off_policy_mask=0.1)),
                                        ("grpo", dict(entropy_coef=0.05)),
                                        ("dapo", dict(entropy_coef=0.05, top_entropy_quantile=0.5))])
def test_linear_surrogate_takes_the_general_step(variant, kw, monkeypatch):
    """mu = 1, beta = 0: the head makes its gradients in the forward from d loss / d logp = -advantage x token
    weight (update.LINEAR_SURROGATE); the step equals the general path's, autograd through the clipped surrogate
    (micro-batches of 4 over ragged groups; CISPO's ratio bound 5, SAPO's and VESPO's gates, two-sided clipping's
    delta, the top 40% of the tokens by entropy, off-policy masking on the policy's own rollouts, an entropy bonus
    over every token or over the kept half)."""
    torch.manual_seed(0)
    model, groups, steps = random_model(), ragged_groups(), []
    for linear in (True, False):
        monkeypatch.setattr(sobre.update, "LINEAR_SURROGATE", linear)
        a = GRPOArgs(loss=variant, micro_batch=4, max_new_tokens=4, clip=1e9, **kw)  # (no grad clipping)
        steps.append(sgd_step(model, groups, a))
    same_step(model, steps)
    rho = kw.get("top_entropy_quantile", 1.0)
    if rho < 1:  # (the entropy statistic from the masking pass: every token's, as without the mask)
        assert steps[0][0]["entropy_kept"] == pytest.approx(rho, abs=0.1)
        every = sgd_step(model, groups, GRPOArgs(loss=variant, micro_batch=4, max_new_tokens=4, clip=1e9))[0]
        assert steps[0][0]["entropy"] == pytest.approx(every["entropy"], rel=1e-5) and every["entropy"] > 0


def test_top_entropy_quantile_keeps_the_batchs_highest_entropy_tokens():
    """high_entropy: 1 where a token's entropy is at least the (1 - rho) quantile of every token of the batch (all
    micro-batches; padding out), interpolated as torch.quantile does (the update on the mask: the test above)."""
    from sobre.objective import high_entropy
    ents = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]]), torch.tensor([[6.0, 0.5]])]
    masks = [torch.tensor([[True, True, True], [True, True, False]]), torch.tensor([[True, True]])]
    values = torch.tensor([1.0, 2, 3, 4, 5, 6, 0.5])
    for rho in (0.5, 0.2, 1.0):
        t = torch.quantile(values, 1 - rho)
        got = high_entropy(ents, masks, rho)
        for g, e, m in zip(got, ents, masks):
            assert torch.equal(g, ((e >= t) & m).float()), (rho, g)
    assert high_entropy(ents, masks, 0.5)[0].tolist() == [[0, 0, 1], [1, 1, 0]]  # the median is 3
    with pytest.raises(ValueError, match="top-entropy-quantile"):
        GRPOArgs(top_entropy_quantile=0.0).validate()


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_sequence_level_ratios_change_only_the_later_epochs(variant, monkeypatch):
    """GSPO (importance="sequence") through autograd: at mu = 1 every ratio is 1 where the gradient is taken, so
    its step equals the token-level one (and the linear surrogate's); with mu = 2 the second epoch's sequence
    ratios differ from the tokens' and so does the step."""
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    monkeypatch.setattr(sobre.update, "LINEAR_SURROGATE", False)
    for mu, same in ((1, True), (2, False)):
        steps = [sgd_step(model, groups, GRPOArgs(loss=variant, mu=mu, micro_batch=4, max_new_tokens=4,
                                                  importance=imp, clip=1e9)) for imp in ("token", "sequence")]
        if same:
            same_step(model, steps)
        else:
            assert any(not torch.allclose(w, steps[1][1][n], atol=1e-6) for n, w in steps[0][1].items())


@pytest.mark.parametrize("variant,mu", [("grpo", 1), ("dr_grpo", 1), ("dapo", 2)])
def test_completions_without_advantage_leave_thepolicy_step(variant, mu, monkeypatch):
    """beta = 0: completions with advantage 0 (a group of equal rewards; here one of three) are left out of
    the forward and backward: the step equals training on all of them; with every group's rewards equal, so
    does the step (zero gradients: SGD's momentum and weight decay still move every parameter)."""
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    groups[1] = (groups[1][0], torch.ones(3))  # all correct: no signal
    a = GRPOArgs(loss=variant, mu=mu, micro_batch=4, max_new_tokens=4, clip=1e9)
    steps = []
    for skip in (True, False):
        monkeypatch.setattr(sobre.update, "SKIP_ZERO_ADVANTAGE", skip)
        steps.append(sgd_step(model, groups, a))
    (s1, p1), (s2, p2) = steps
    assert s1["signal"] == s2["signal"] == pytest.approx(2 / 3)
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-6) and s1["grad_norm"] == pytest.approx(s2["grad_norm"])
    for name, w in p1.items():
        assert torch.allclose(w, p2[name], atol=1e-6), name
    flat = [(g, torch.zeros(len(g))) for g, _ in groups]
    after = []
    for skip in (True, False):
        monkeypatch.setattr(sobre.update, "SKIP_ZERO_ADVANTAGE", skip)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        policy_step(m, None, opt, [], groups, a, False)
        stats = policy_step(m, None, opt, [], flat, a, False)
        assert stats["signal"] == 0 and stats["grad_norm"] == 0
        after.append(dict(m.named_parameters()))
    for name, w in after[0].items():
        assert torch.allclose(w, after[1][name], atol=1e-6), name


def test_mini_batches_step_each_on_the_sampling_policys_ratios(monkeypatch):
    """--steps-per-generation 2 (over --mu 2 epochs): the groups in 2 mini-batches, an SGD step on each in turn and
    again, each loss normalised over its own mini-batch, its ratios against the log-probs of the policy that sampled
    the rollouts: the reference, autograd through token_logprobs + policy_loss step by step."""
    from sobre.update import group_advantages, mini_batch_steps
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    a = GRPOArgs(loss="dapo", micro_batch=2, max_new_tokens=4, clip=1e9, steps_per_generation=2, mu=2, group=3)
    adv = group_advantages(groups, a)
    m = copy.deepcopy(model)
    stats = mini_batch_steps(m, None, torch.optim.SGD(m.parameters(), lr=1.0), [], groups, a, False, adv, 0.0)
    ref = copy.deepcopy(model)
    batch = [x for g, _ in groups for x in g]
    with torch.no_grad():
        old_lp, old_mask, _ = token_logprobs(ref, batch, shared=False)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    for _ in range(2):
        for rows in (slice(0, 6), slice(6, 9)):  # (3 groups in 2: 2 whole groups, then 1)
            mb = batch[rows]
            opt.zero_grad()
            ref.train()
            logp, mask, _ = token_logprobs(ref, mb, shared=False)
            T = mask.shape[1]
            loss, _ = policy_loss(logp, old_lp[rows, :T], adv[rows], mask, a.surrogate(), n_seqs=len(mb),
                                  n_tokens=int(mask.sum()), max_len=4)
            loss.backward()
            opt.step()
    for name, w in m.named_parameters():
        torch.testing.assert_close(w, dict(ref.named_parameters())[name], atol=1e-5, rtol=1e-4, msg=name)
    assert stats["clip_fraction"] > 0 and math.isfinite(stats["loss"])  # (the later steps' ratios moved off 1)


def test_pass_at_k_and_majority():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3, 3) / C(5, 3)
    group = [Rollout([], [], "", False, c, 1.0, a) for a, c in (("7", 1.0), ("8", 0.0), ("7.0", 1.0), (None, 0.0))]
    assert maj_at_k(group) == 1.0  # "7" and "7.0" are the same value
    assert maj_at_k(group[1:2] + group[3:]) == 0.0


def test_sign_test_against_hand_computed_p_values():
    t = sign_test([1] * 8 + [0, 1], [0] * 8 + [0, 1])  # 8 problems only the first solves, 2 ties
    assert (t["better"], t["worse"]) == (8, 0) and t["p"] == pytest.approx(2 / 2**8)
    t = sign_test([1, 1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 1, 0, 0])  # 3 vs 2: P(X <= 2) = (1 + 5 + 10) / 32, twice
    assert (t["better"], t["worse"]) == (3, 2) and t["p"] == 1.0
    t = sign_test([2, 4, 4, 4, 3, 4], [1, 0, 1, 2, 3, 0])  # correct samples of 4: 5 better, 1 tie
    assert t == {"better": 5, "worse": 0, "p": pytest.approx(2 / 32)}
    t = sign_test([1] * 20 + [0] * 5, [0] * 20 + [1] * 5)  # 20 vs 5: 2 * sum_{i<=5} C(25, i) / 2^25
    assert t["p"] == pytest.approx(2 * sum(math.comb(25, i) for i in range(6)) / 2**25) and t["p"] < 0.01
    assert sign_test([0, 1], [0, 1]) == {"better": 0, "worse": 0, "p": 1.0}
    with pytest.raises(ValueError, match="different problems"):
        sign_test([1, 0], [1])


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    subprocess.run([sys.executable, "-m", "sobre", "grpo", "--preset", "debug", "--task", "countdown", "--out",
                    str(out), "--steps", "2", "--prompts", "2", "--group", "4", "--max-new-tokens", "16",
                    "--eval-problems", "4", "--loss", "dapo"], check=True, capture_output=True, timeout=300)
    return out


def test_grpo_cli_contract(grpo_run):
    rows = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"reward_mean", "reward_std", "accuracy", "completion_length", "groups_kept"} <= set(r)
    assert (grpo_run / "reward.png").exists() and (grpo_run / "model" / "config.json").exists()
    r = subprocess.run([sys.executable, "-m", "sobre", "eval", str(grpo_run / "model"), "--task", "countdown",
                        "--n", "4", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pass@1" in r.stdout and "countdown" in r.stdout and "bits/byte" in r.stdout


@pytest.mark.parametrize("int8", [False, True])
def test_reference_loss_is_each_solutions_own_cross_entropy(grpo_run, int8, capsys):
    """val_loss / val_bpb of held-out reference solutions (packed several to a row) equal each solution's
    cross-entropy after its own prompt, one forward per solution; in int8 too (its head's logits made whole)."""
    import torch.nn.functional as F

    from sobre.rollout import reference_loss
    from sobre.sft import encode_turns, start_model
    from sobre.tasks import get_task
    model, tok = start_model(str(grpo_run), int8=int8)
    assert (model.head.weight.dtype == torch.int8) == int8
    problems = get_task("arithmetic").problems("test", 5)
    got = reference_loss(model.eval(), tok, problems, batch_size=2)
    nats = n = n_bytes = 0
    with torch.no_grad():
        for p in problems:
            (ids, m), = encode_turns(tok, p.messages())
            keep = torch.tensor(m[1:])
            logits = model(torch.tensor([ids[:-1]]))[0][keep]
            y = torch.tensor(ids[1:])[keep]
            nats += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
            n_bytes += len(tok.decode(y[:-1].tolist()).encode())  # (the last target: end-of-sentence)
    assert y[-1].item() == tok.eos_id
    assert got["val_loss"] == pytest.approx(nats / n, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    if int8:  # and `sobre eval --int8` runs on it
        code = main(["eval", str(grpo_run / "model"), "--task", "countdown", "--n", "2", "--max-new-tokens", "8",
                     "--int8"])
        assert code in (None, 0) and "pass@1" in capsys.readouterr().out


def test_grpo_on_a_small_jsonl_task_without_held_out_rows(tmp_path):
    """A user task whose rows all fall in the train split runs without held-out evaluation (it crashed on an
    empty evaluation); one with no train rows is refused clearly (rollouts of no problems: as in eval, distill
    and rejection sampling)."""
    from sobre.grpo import grpo
    from sobre.tasks import held_out
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    train = [r for r in rows if not held_out(r["prompt"])][:4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    a = GRPOArgs(out=str(tmp_path / "run"), preset="debug", task=str(tmp_path / "train.jsonl"), steps=1, prompts=2,
                 group=2, max_new_tokens=4, eval_problems=2)
    grpo(a)
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / "run" / "eval.jsonl").exists() or not (tmp_path / "run" / "eval.jsonl").read_text()
    test = [r for r in rows if held_out(r["prompt"])][:2]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    with pytest.raises(ValueError, match="no problems to sample"):
        grpo(GRPOArgs(out=str(tmp_path / "run2"), preset="debug", task=str(tmp_path / "test.jsonl"), steps=1))


def test_rejection_sampler_keeps_only_verified_answers(grpo_run, tmp_path, monkeypatch):
    from sobre import rollout
    from sobre.sft import start_model
    from sobre.tasks import get_task
    model, tok = start_model(str(grpo_run))
    task = get_task("arithmetic")
    problems = task.problems("train", 3)

    def fake(model, tok, task, problems, n, *args, **kw):  # every other completion is right
        out = []
        for p in problems:
            texts = [f"work\n</think>\n\nAnswer: {p.answer if j % 2 == 0 else 'no'}{tok.eos_token}" for j in range(n)]
            out.append([Rollout([1], [2], t, False, task.correct(t, p.answer), 1.0, None) for t in texts])
        return out

    monkeypatch.setattr(rollout, "rollouts", fake)
    r = rollout.rejection_sample(model, tok, task, 3, 4, tmp_path / "rs.jsonl", per_problem=2)
    lines = [json.loads(x) for x in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert r["kept"] == len(lines) == 3 and r["solved"] == 3  # duplicates kept once
    for line, p in zip(lines, problems):
        assert line["messages"][0]["content"] == p.prompt
        assert line["messages"][1]["content"].endswith(f"Answer: {p.answer}")
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):  # (nothing to keep, or to score)
        rollout.rejection_sample(model, tok, task, 3, 0, tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="n_problems must be >= 1, got 0"):
        rollout.evaluate_task(model, tok, task, 0)
    assert not (tmp_path / "none.jsonl").exists()


def test_evaluation_samples_at_a_temperature_when_it_draws_several(grpo_run, monkeypatch, capsys):
    """pass@k needs different samples: several greedy completions are one completion repeated (`sobre eval
    --samples 4` had run greedy by default: pass@4 = pass@1). Sampled, it takes R1's temperature and top-p."""
    from sobre import rollout
    from sobre.sft import start_model
    from sobre.tasks import get_task
    model, tok = start_model(str(grpo_run))
    task, temps = get_task("arithmetic"), []

    def fake(model, tok, task, problems, n, max_new_tokens, temperature, top_p, *args, **kw):
        temps.append((temperature, top_p))
        return [[Rollout([1], [2], "x", False, float(j == 0), 0.0, None) for j in range(n)] for _ in problems]

    monkeypatch.setattr(rollout, "rollouts", fake)
    r = rollout.evaluate_task(model, tok, task, 2)  # one sample: greedy
    assert (r["temperature"], r["top_p"]) == temps[-1] == (0.0, 1.0)
    r = rollout.evaluate_task(model, tok, task, 2, samples=4)
    assert (r["temperature"], r["top_p"]) == temps[-1] == (0.6, 0.95) == (rollout.SAMPLED_EVAL_TEMPERATURE,
                                                                          rollout.SAMPLED_EVAL_TOP_P)
    assert r["pass@1"] == 0.25 and r["pass@4"] == 1.0
    r = rollout.evaluate_task(model, tok, task, 2, samples=4, temperature=1.0, top_p=1.0)
    assert (r["temperature"], r["top_p"]) == temps[-1] == (1.0, 1.0)
    for bad, says in ((dict(temperature=0.0), "greedy completions are all the same"),
                      (dict(temperature=-1.0), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be in")):
        with pytest.raises(ValueError, match=says):
            rollout.evaluate_task(model, tok, task, 2, samples=4, **bad)
    with pytest.raises(SystemExit, match="sobre eval: error: samples=4 at temperature 0"):  # before any loading
        main(["eval", "no-such-model", "--samples", "4", "--temperature", "0"])
    with pytest.raises(SystemExit, match=r"sobre eval: error: top_p must be in \(0, 1\], got 1.5"):
        main(["eval", "no-such-model", "--samples", "4", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="unknown task 'nope'"):  # also before any loading, and before the table
        main(["eval", "no-such-model", "--task", "nope"])
    assert len(temps) == 3 and "problems" not in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_shared_prompt_forward_equals_the_padded_reference(arch):
    model = random_model(sobre.preset("debug", arch=arch)).train()
    p1, p2 = [3, 14, 15, 9, 2, 6], [7, 7]  # prompts of different lengths: the shorter one is padded, masked
    batch = [Rollout(p1, ids, "", False, 0.0, 0.0, None) for ids in ([5, 8, 9, 7], [11], [4, 4, 4, 4, 4, 2])]
    batch.insert(1, Rollout(p2, [1, 2], "", False, 0.0, 0.0, None))
    seen, ffn = [], []  # the token batches the model embeds: the shared path runs [P, Lp] prompts, then [N, T - 1]
    embed = model.embed if hasattr(model, "embed") else model.embed_tokens
    embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    model.layers[-1].ffn.register_forward_hook(lambda m, args, out: ffn.append(args[0].shape[:-1].numel()))
    for rows, P in ((batch[:1] + batch[2:], 1), (batch, 2)):  # one prompt; two prompts, interleaved
        seen.clear(), ffn.clear()
        shared, mask, ent = token_logprobs(model, rows, entropy=True)
        assert seen == [(P, 6), (len(rows), 5)]
        # the FFN on each prompt's own positions (not the shorter one's padding), then on the completions' positions
        # whose next token exists (each row's length - 1, not the padding)
        assert ffn == [6 + 2 * (P - 1), sum(len(r.ids) - 1 for r in rows)]
        padded, mask2, ent2 = token_logprobs(model, rows, entropy=True, shared=False)
        assert torch.equal(mask, mask2)
        torch.testing.assert_close(ent, ent2, rtol=1e-4, atol=1e-5)
        assert (ent[mask] > 0).all() and (ent[~mask] == 0).all()
        assert_same_logprobs_and_gradients(model, shared, padded, mask)


def assert_same_logprobs_and_gradients(model, a, b, mask):
    """Two forwards' log-probs [N, T] agree at the completion tokens, and so do the gradients of their sums."""
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    grads = []
    for lp in (a, b):
        model.zero_grad()
        lp[mask].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)



@pytest.mark.parametrize("kind", ["nsa", "dsa", "deepseek_v4"])
def test_update_forward_of_sparse_attention_equals_the_padded_reference(kind):
    """Two prompts of different lengths and completions of different lengths through NSA (the padded forward: its
    per-layer state holds one row per sequence), DSA's indexer and V4's attention (a shared-prompt forward per
    prompt length: the padding would reach the indexer or V4's pooled blocks; the FFNs left out past each row's
    last needed position): the padded reference's log-probs and gradients, and the linear surrogate's loss and
    gradients (coef: the head makes them) as those of the log-probs it weighs."""
    if kind == "deepseek_v4":
        model = v4_model().train()
    else:
        model = random_model(sobre.preset("debug", **SPARSE_MODELS[kind], max_seq_len=256)).train()
    prompts = [list(range(3, 23)), list(range(30, 43))]
    lengths = (9, 2, 30, 17, 5)
    batch = [Rollout(prompts[i % 2], [(7 * i + t) % 50 + 5 for t in range(n)], "", False, 0.0, 0.0, None)
             for i, n in enumerate(lengths)]
    ffn = []
    if kind != "nsa":  # (the rows each FFN runs on)
        last = model.layers[-1]
        (last.mlp if kind == "deepseek_v4" else last.ffn).register_forward_hook(
            lambda m, args, out: ffn.append(args[0].shape[:-1].numel()))
    shared, mask, _ = token_logprobs(model, batch)
    if kind != "nsa":  # (a forward per prompt length, in the batch's order)
        assert ffn == [20, sum(n - 1 for n in lengths[::2]), 13, sum(n - 1 for n in lengths[1::2])]
        ffn.clear()
    assert_same_logprobs_and_gradients(model, shared, token_logprobs(model, batch, shared=False)[0], mask)
    coef = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    grads = []
    for loss in (token_logprobs(model, batch, coef=coef)[3], (token_logprobs(model, batch)[0] * coef).sum()):
        model.zero_grad()
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)


def spread_reward(completion: str, answer: str) -> float:
    """A reward that differs between completions (a hash of the text), so a fresh model's groups all train."""
    return zlib.crc32(completion.encode()) / 2**32


def test_grpo_resumes_exactly_after_a_crash(tmp_path, monkeypatch):
    """A run that dies after its step-2 checkpoint and is resumed logs the same steps 3-4 as one that ran
    through: rollouts are seeded per step, the checkpoint holds the weights, AdamW's state, the router biases and
    the adaptive entropy bonus's state (its coefficient, the last step's entropy) and the KL's reference as
    --ref-sync-steps moved it."""
    from sobre import grpo as G
    from sobre.tasks import get_task
    task = get_task("arithmetic")  # (its held-out prompts stay held out in the file: eval.jsonl)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems("train", 40) + task.problems("test", 4)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = dict(preset="debug", task=str(tmp_path / "task.jsonl"), reward="test_grpo:spread_reward", steps=4,
                prompts=2, group=4, max_new_tokens=12, eval_every=2, eval_problems=2, save_every=2, loss="grpo",
                dynamic_sampling=True, epsilon_high=0.28,  # (DAPO's but the overlong filter: a fresh model's
                #   completions all run to the end some steps, leaving nothing to train)
                beta=0.05, mu=2, router_bias_update=1e-3, adaptive_entropy=True, entropy_coef=0.01,
                entropy_coef_delta=0.01, entropy_target=100.0, ref_sync_steps=1, ref_mixup=0.5)
    G.grpo(GRPOArgs(out=str(tmp_path / "whole"), **args))
    ran = crash_then_resume(monkeypatch, G, lambda resume: G.grpo(GRPOArgs(out=str(tmp_path / "cut"), resume=resume,
                                                                        **args)))
    assert ran == [3, 4]  # from the checkpoint, not from the start

    def logged(run, name="metrics.jsonl"):  # every number but the timings
        return untimed_rows(tmp_path / run / name)

    assert [r["step"] for r in logged("cut")] == [1, 2, 3, 4] and logged("cut") == logged("whole")
    assert len({r["loss"] for r in logged("whole")}) == 4 and all(r["kl"] > 0 for r in logged("whole")[1:])
    # (the bonus waits for a first entropy below the target, then rises by the delta a step)
    coefs = [r["entropy_coef"] for r in logged("whole")]
    assert coefs[0] == 0 and coefs[-1] > 0.02 and all(b - a == pytest.approx(0.01) for a, b in zip(coefs, coefs[1:])
                                                      if a)
    assert logged("cut", "eval.jsonl") == logged("whole", "eval.jsonl")
    assert logged("cut", "completions.jsonl") == logged("whole", "completions.jsonl")  # (no step logged twice)
    assert [r["step"] for r in logged("whole", "completions.jsonl")] == sorted(r["step"] for r in logged(
        "whole", "completions.jsonl"))


def test_decoupled_advantages_normalise_each_term_in_its_group_then_the_sum_over_the_batch():
    """GDPO (--reward-aggregation normalize_then_sum, TRL's): each term normalised in its group (a term equal across
    the group: 0), weighed and summed, the sum normalised over the batch, against hand-computed values."""
    from sobre.objective import decoupled_advantages
    terms = torch.tensor([[[1.0, 0.5], [0.0, 0.5], [0.0, 0.5]],  # group 0: term 1 equal across it
                          [[1.0, 1.0], [1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    z = lambda v: (torch.tensor(v) - torch.tensor(v).mean()) / (torch.tensor(v).std() + 1e-4)  # noqa: E731
    s = torch.stack([z([1.0, 0.0, 0.0]), z([1.0, 1.0, 0.0]) + 2 * z([1.0, 0.0, 2.0])])
    want = (s - s.mean()) / (s.std() + 1e-4)
    torch.testing.assert_close(decoupled_advantages(terms, w), want.double())
    flat = torch.full((1, 4, 3), 0.7, dtype=torch.float64)  # (every term equal: no signal)
    assert torch.equal(decoupled_advantages(torch.cat([flat, flat]), torch.ones(3, dtype=torch.float64)),
                       torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("aggregation", ["sum", "normalize_then_sum"])
def test_grpo_adds_reward_functions_with_their_weights(tmp_path, aggregation):
    """--rewards module:function --reward-weights W: each function a term of the reward (correct + 0.1 format + W
    x its value), logged per step (reward_NAME) and per completion; normalize_then_sum takes its advantages from
    the terms (decoupled_advantages), sum from the reward (group-scaled)."""
    from sobre import grpo as G
    from sobre.objective import decoupled_advantages
    run = G.grpo(GRPOArgs(out=str(tmp_path / "run"), preset="debug", task="arithmetic", steps=2, prompts=2, group=3,
                          max_new_tokens=6, eval_every=100, eval_problems=1, rewards=("test_grpo:spread_reward",),
                          reward_weights=(0.5,), reward_aggregation=aggregation))
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert r["reward_spread_reward"] == pytest.approx(spread_reward(r["completion"], r["answer"]))
        assert r["reward"] == pytest.approx(r["correct"] + 0.1 * r["format"] + 0.5 * r["reward_spread_reward"])
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        terms = torch.tensor([[[r["correct"], r["format"], 0.0, r["reward_spread_reward"]] for r in mine[i:i + 3]]
                              for i in (0, 3)], dtype=torch.float64)
        want = decoupled_advantages(terms, torch.tensor([1.0, 0.1, 1.0, 0.5], dtype=torch.float64)) \
            if aggregation != "sum" else advantages(torch.tensor([[r["reward"] for r in mine[i:i + 3]]
                                                                  for i in (0, 3)]))
        assert [r["advantage"] for r in mine] == pytest.approx(want.flatten().tolist(), abs=1e-5)
    metrics = untimed_rows(run / "metrics.jsonl")
    assert metrics[0]["reward_spread_reward"] == pytest.approx(
        sum(r["reward_spread_reward"] for r in rows[:6]) / 6)
    for bad, says in ((dict(rewards=("test_grpo:spread_reward",), reward_weights=(1.0, 2.0)), "2 weights for 1"),
                      (dict(reward_aggregation="mean"), "reward-aggregation"), (dict(rewards=("nowhere:f",)),
                                                                                "nowhere")):
        with pytest.raises(ValueError, match=says):
            GRPOArgs(**bad).validate()


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_grpo_logs_completions_with_rewards_and_advantages(tmp_path, loss):
    """completions.jsonl (TRL's log_completions): the first --log-completions completions of each step in draw
    order, each with its problem, answer, text, reward and the advantage it trained with; under DAPO's dynamic
    sampling a refused group (equal rewards: a random model scores 0 everywhere) is logged as not kept, without
    an advantage."""
    from sobre import grpo as G
    from sobre.tasks import get_task
    args = dict(preset="debug", task="arithmetic", steps=2, prompts=3, group=2, max_new_tokens=6, eval_every=100,
                eval_problems=1, loss=loss, log_completions=5)
    run = G.grpo(GRPOArgs(out=str(tmp_path / "run"), **args))
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 5 + [2] * 5
    first = get_task("arithmetic").problems("train", 3, "0/0/0")
    assert [r["prompt"] for r in rows[:5]] == [p.prompt for p in first for _ in range(2)][:5]
    assert [r["answer"] for r in rows[:5]] == [p.answer for p in first for _ in range(2)][:5]
    assert all(isinstance(r["completion"], str) and 1 <= r["length"] <= 6 for r in rows)
    for r in rows:
        assert r["reward"] == pytest.approx(r["correct"] + 0.1 * r["format"])  # the run's reward, as trained
    if loss == "grpo":
        assert all(r["kept"] for r in rows)
        for i in (0, 2, 5, 7):  # each whole group's advantages: its rewards, group-scaled
            want = advantages(torch.tensor([[rows[i]["reward"], rows[i + 1]["reward"]]]), "group")[0].tolist()
            assert [rows[i]["advantage"], rows[i + 1]["advantage"]] == pytest.approx(want, abs=1e-6)
    else:
        assert not any(r["kept"] for r in rows) and all(r["advantage"] is None for r in rows)


@pytest.mark.parametrize("limit", [dict(top_k=1), dict(min_p=1.0)])
def test_rollouts_take_top_k_and_min_p(tmp_path, limit):
    """--top-k / --min-p reach the rollouts' sampling: top-k 1 (or min-p 1, only the likeliest token) at
    temperature 1 samples every completion of a group as the greedy one."""
    from sobre.engine import Engine
    from sobre.rollout import prompt_ids, rollouts
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    problems = get_task("arithmetic").problems("train", 2)
    groups = rollouts(model, tok, get_task("arithmetic"), problems, 3, max_new_tokens=6, seed=1, **limit)
    greedy = Engine(model, tok).generate([prompt_ids(tok, p) for p in problems], max_new_tokens=6,
                                         temperature=0.0, stop_token_ids=(tok.eos_id,))
    assert [[r.ids for r in g] for g in groups] == [[ids] * 3 for ids in greedy]
    assert len({tuple(r.ids) for r in rollouts(model, tok, get_task("arithmetic"), problems[:1], 6,
                                               max_new_tokens=6, seed=1)[0]}) > 1  # (without: they differ)


def test_grpo_evaluates_held_out_pass_at_1_over_eval_samples(tmp_path, monkeypatch):
    """--eval-samples k: the run's held-out curve is R1's pass@1 (k samples a problem at evaluate_task's sampled
    defaults, T 0.6 and top-p 0.95) instead of one greedy completion."""
    from sobre import grpo as G
    calls = []

    def fake(model, tok, task, n_problems, samples=1, **kw):
        calls.append((n_problems, samples, kw.get("temperature"), kw.get("top_p")))
        return {"pass@1": 0.25 * len(calls)}

    monkeypatch.setattr(G, "evaluate_task", fake)
    run = G.grpo(GRPOArgs(out=str(tmp_path / "run"), preset="debug", task="arithmetic", steps=2, prompts=2, group=2,
                          max_new_tokens=4, eval_every=1, eval_problems=3, eval_samples=5))
    assert calls == [(3, 5, None, None)] * 3  # steps 0, 1, 2; None: R1's sampling (evaluate_task's default)
    assert untimed_rows(run / "eval.jsonl") == [{"step": 0, "pass@1": 0.25}, {"step": 1, "pass@1": 0.5},
                                                {"step": 2, "pass@1": 0.75}]
    with pytest.raises(ValueError, match="--eval-samples must be positive, got 0"):
        GRPOArgs(eval_samples=0).validate()


def test_cast_weights_are_a_bf16_load_of_the_model_put_back_after(tmp_path):
    """CastWeights(model, bf16): inside, each parameter is what sobre.load(dtype=bf16) gives (the router fp32), and
    rollouts sample what that model samples; after, the fp32 parameters are back; a trained parameter's change
    reaches the copy at the next entry."""
    from sobre.moe import Gate
    from sobre.rollout import CastWeights, rollouts
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    sobre.save(model, tmp_path, tokenizer_dir=tmp_path)
    loaded = sobre.load(tmp_path, dtype=torch.bfloat16)
    was = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    gates = {id(m.weight) for m in model.modules() if isinstance(m, Gate)}
    task, problems = get_task("arithmetic"), get_task("arithmetic").problems("train", 3)
    weights = CastWeights(model.requires_grad_(True), torch.bfloat16)
    with weights as m:
        assert m is model
        for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters()):
            assert name == name2 and p.dtype == q.dtype and torch.equal(p, q), name
            assert p.dtype == (torch.float32 if id(p) in gates else torch.bfloat16)
        ours = rollouts(m, tok, task, problems, 2, max_new_tokens=8, seed=3)
        with pytest.raises(RuntimeError, match="already entered"):
            weights.__enter__()
    theirs = rollouts(loaded, tok, task, problems, 2, max_new_tokens=8, seed=3)
    assert [[r.ids for r in g] for g in ours] == [[r.ids for r in g] for g in theirs]
    for name, p in model.named_parameters():
        assert p is was[name][0] and p.dtype == torch.float32 and torch.equal(p, was[name][1]), name
    assert all(c.untyped_storage().nbytes() == 0 for c in weights.copies)  # (the trained ones' copies: freed)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with weights:
        assert torch.equal(model.embed.weight, (was["embed.weight"][1] + 1.0).bfloat16())
    assert model.embed.weight.dtype == torch.float32


def test_grpo_rollout_bf16_samples_on_bf16_weights_and_trains_fp32(tmp_path, monkeypatch):
    """--rollout-bf16: every rollout of the run sees bf16 weights, the update and the held-out evaluation fp32 ones
    (the rollouts weighed toward the fp32 policy: is_weight, is_masked logged), and the exported model is the
    trained fp32 one."""
    from sobre import grpo as G
    seen, real = [], G.sample_groups

    def spy(model, *args, **kw):
        seen.append(model.layers[0].attn.wkv_a.weight.dtype)
        return real(model, *args, **kw)

    evals = []
    monkeypatch.setattr(G, "sample_groups", spy)
    monkeypatch.setattr(G, "evaluate_task", lambda model, *a, **kw: evals.append(next(model.parameters()).dtype)
                        or {"pass@1": 0.0})
    run = G.grpo(GRPOArgs(out=str(tmp_path / "run"), preset="debug", task="arithmetic", steps=2, prompts=2, group=2,
                          max_new_tokens=4, eval_every=1, rollout_bf16=True, lr=1e-2))
    assert seen == [torch.bfloat16] * 2 and evals == [torch.float32] * 3
    monkeypatch.setattr(G, "native_bf16", lambda: False)  # a CPU that would emulate bf16: said so, then run
    with pytest.warns(UserWarning, match="without native bf16"):
        G.grpo(GRPOArgs(out=str(tmp_path / "slow"), preset="debug", task="arithmetic", steps=1, prompts=2, group=2,
                        max_new_tokens=2, eval_every=1000, rollout_bf16=True))
    rows = untimed_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # the rollouts weighed toward the fp32 policy (default sequence_mask; the bf16 copy's log-probs near its own)
    assert all(0.5 < r["is_weight"] <= 3 and 0 <= r["is_masked"] < 0.5 for r in rows), rows
    assert sobre.load(run / "model").layers[0].attn.wkv_a.weight.dtype == torch.float32


def test_sample_groups_replaces_each_refused_group_with_the_next_problem(tmp_path):
    """sample_groups keeps `want` groups in play: each refused group's place goes to the next problem in order, so
    the problems drawn depend on which groups are refused only (the draw order is the problems' order); it stops
    when the problems run out; the same arguments give the same completions."""
    from sobre.rollout import prompt_ids, rollouts, sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    task = get_task("arithmetic")
    problems = task.problems("train", 7)
    which = {tuple(prompt_ids(tok, p)): i for i, p in enumerate(problems)}
    assert len(which) == 7

    def run(refuse, want=3):
        def accept(group):
            assert len(group) == 2 and len({tuple(r.prompt) for r in group}) == 1
            return which[tuple(group[0].prompt)] not in refuse
        return sample_groups(model, tok, task, problems, 2, want, accept, max_new_tokens=6, seed=5)

    groups, drawn = run({1, 3})  # 0, 1 (refused: 3 drawn), 2, 3 (refused: 4 drawn), 4
    assert drawn == 5 and [which[tuple(g[0].prompt)] for _, g in groups] == [0, 1, 2, 3, 4]
    assert [ok for ok, _ in groups] == [True, False, True, False, True]
    groups, drawn = run({0, 1, 2, 3, 4, 5})  # every refusal replaced until the problems run out
    assert drawn == 7 and [ok for ok, _ in groups] == [False] * 6 + [True]
    groups, drawn = run(set(), want=10)  # more wanted than there are problems: all of them at once
    assert drawn == 7 and all(ok for ok, _ in groups)
    assert [[r.ids for r in g] for _, g in groups] == [[r.ids for r in g] for g in rollouts(
        model, tok, task, problems, 2, max_new_tokens=6, seed=5)]
    assert [[r.ids for r in g] for _, g in run({1, 3})[0]] == [[r.ids for r in g] for _, g in run({1, 3})[0]]


def test_rollout_batch_runs_cheap_sequences_at_once_within_its_budget(monkeypatch):
    """rollout_batch: every sequence at once while their caches and logits fit ROLLOUT_BYTES, never fewer than
    DEFAULT_BATCH; DeepSeek-V4 (rings held per lane) DEFAULT_BATCH."""
    from sobre import rollout
    from sobre.stats import kv_bytes_per_token
    tiny = sobre.Transformer(sobre.preset("debug"))
    per_seq = kv_bytes_per_token(tiny.config, 4)["latent"] * 200 + 16 * tiny.config.vocab_size
    monkeypatch.setattr(rollout, "ROLLOUT_BYTES", per_seq * 1000)
    assert rollout.rollout_batch(tiny, 800, 200) == 800
    assert rollout.rollout_batch(tiny, 5000, 200) == 1000
    assert rollout.rollout_batch(tiny, 64, 200) == rollout.DEFAULT_BATCH
    monkeypatch.setattr(rollout, "ROLLOUT_BYTES", per_seq * 10)
    assert rollout.rollout_batch(tiny, 800, 200) == rollout.DEFAULT_BATCH
    from sobre.v4 import V4Transformer
    assert rollout.rollout_batch(V4Transformer(sobre.preset("debug", arch="deepseek_v4")), 800, 200) == 256


def spy_given_logits(monkeypatch) -> list[bool]:
    """Whether each call of the update's head_weighted_logprobs (objective.py) is handed the rollouts' logits."""
    calls = []

    def spy(*args):
        calls.append(args[6] is not None)  # (h, weight, targets, coef, temperature, entropy, logits, bonus)
        return sobre.loss.head_weighted_logprobs(*args)
    monkeypatch.setattr(sobre.objective, "head_weighted_logprobs", spy)
    return calls


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen2", "lora", "dsa", "nsa"])
def test_the_update_takes_the_rollouts_logits_as_its_own(tmp_path, kind, monkeypatch):
    """sample_groups(keep_logits=True): each completion carries the engine's logits row of each of its tokens (a
    ragged batch: completions stop early, first tokens from shared prefills), each equal to a full forward's at
    its position; the linear surrogate's update on those rows (the head's forward matmul skipped) takes the step
    the recomputing update takes (every weight, or LoRA adapters on the MLA projections the engine then leaves
    unfolded; DSA's and NSA's sparse attention, whose top-k choices the two forwards make alike here). Without
    keep_logits no rows are kept."""
    from sobre.lora import adapters, add_lora
    from sobre.rollout import sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    arch = "qwen2" if kind == "qwen2" else "deepseek_v3"
    model = random_model(sobre.preset("debug", arch=arch, vocab_size=tok.vocab_size, **SPARSE_MODELS.get(kind, {})))
    if kind == "lora":
        add_lora(model, 4)
        with torch.no_grad():
            for m in adapters(model).values():
                m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    task = get_task("arithmetic")
    problems = task.problems("train", 3)
    groups, batch = ragged(model, tok, lambda: sample_groups(model, tok, task, problems, 3, 3, max_new_tokens=8,
                                                             seed=3, keep_logits=True)[0])
    for r in batch:
        assert len(r.logits) == len(r.ids)
        with torch.no_grad():
            full = model(torch.tensor([r.prompt + r.ids[:-1]]))[0, len(r.prompt) - 1:]
        torch.testing.assert_close(torch.stack(r.logits), full, atol=1e-4, rtol=1e-4)
    assert all(r.logits is None for _, g in sample_groups(model, tok, task, problems, 3, 3, max_new_tokens=8,
                                                          seed=3)[0] for r in g)
    rewarded = [(g, torch.tensor([float(i % 2), 1.0, 0.0])) for i, (_, g) in enumerate(groups)]
    steps = []
    for reuse in (True, False):
        m = copy.deepcopy(model)
        a = GRPOArgs(micro_batch=4, max_new_tokens=8, temperature=0.7)
        calls = spy_given_logits(monkeypatch)
        stats = policy_step(m, None, torch.optim.SGD(m.parameters(), lr=1.0), [], rewarded, a, False, reuse)
        assert calls and set(calls) == {reuse}
        steps.append((stats, dict(m.named_parameters())))
    same_step(model, steps)


def ragged(model, tok, draw):
    """Groups of completions of several lengths (a few, not all 1) from a random model: its head's end-of-sentence
    row set to the first of a few scales of one direction at which draw() -> groups gives them; (groups, the
    completions)."""
    eos = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 0.5, 0.3, 0.7, -0.3, -0.5, 1.5, -0.2):
        with torch.no_grad():
            model.head.weight[tok.eos_id] = scale * eos
        groups = draw()
        batch = [r for _, g in groups for r in g]
        if len({len(r.ids) for r in batch}) > 2:
            break
    assert len({len(r.ids) for r in batch}) > 2, [len(r.ids) for r in batch]  # ragged: some stop early
    return groups, batch


def test_rollouts_keep_each_tokens_log_prob_where_it_was_drawn(tmp_path):
    """sample_groups(keep_logprobs=True): each completion carries each token's log-prob under the distribution it
    was drawn from, its logits row / the temperature (ragged completions, first tokens from shared prefills); the
    tokens drawn are those drawn without it. A greedy request's: its raw row's."""
    from sobre.engine import Engine
    from sobre.rollout import sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    task, T = get_task("arithmetic"), 0.7
    problems = task.problems("train", 3)
    kw = dict(max_new_tokens=8, seed=3, temperature=T)
    groups, batch = ragged(model, tok, lambda: sample_groups(model, tok, task, problems, 3, 3, keep_logits=True,
                                                             keep_logprobs=True, **kw)[0])
    for r in batch:
        want = torch.stack(r.logits).div(T).log_softmax(-1).gather(1, torch.tensor(r.ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.sampled), want, atol=1e-5, rtol=1e-5)
    plain = [r.ids for _, g in sample_groups(model, tok, task, problems, 3, 3, **kw)[0] for r in g]
    assert plain == [r.ids for r in batch] and all(r.sampled is None for _, g in sample_groups(
        model, tok, task, problems, 3, 3, **kw)[0] for r in g)
    eng = Engine(model, keep_logits=True, keep_logprobs=True)
    rid = eng.add_request([5, 9, 17], max_new_tokens=4)  # greedy
    while eng.has_work():
        eng.step()
    s = eng.collect()[rid]
    want = torch.stack(s.logits).log_softmax(-1).gather(1, torch.tensor(s.out)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(s.sampled), want, atol=1e-5, rtol=1e-5)


def test_rollout_weights_per_token_and_per_sequence():
    """rollout_weights against hand-computed values: per-token log-ratios [1, 0, -1], [-1, 0.5, pad], [1, 0.5, 0]
    (sequence sums 0, -0.5, 1.5) in [0.5, 2], clipped or masked."""
    from sobre.objective import rollout_weights
    old = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    sampled = torch.tensor([[-1.0, -1.0, -1.0], [0.0, -1.5, 0.0], [-2.0, -1.5, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    h, s = math.exp(0.5), math.exp(-0.5)
    want = {"token_truncate": [[2, 1, 0.5], [0.5, h, 0], [2, h, 1]],
            "token_mask": [[0, 1, 0], [0, h, 0], [0, h, 1]],
            "sequence_truncate": [[1, 1, 1], [s, s, 0], [2, 2, 2]],
            "sequence_mask": [[1, 1, 1], [s, s, 0], [0, 0, 0]]}
    for mode, w in want.items():
        torch.testing.assert_close(rollout_weights(old, sampled, mask, mode, 0.5, 2.0), torch.tensor(w), msg=mode)
    torch.testing.assert_close(rollout_weights(old, sampled, mask, "token_truncate", 0.0, 2.0)[0, 2],
                               torch.tensor(math.exp(-1)))  # (low 0: no lower bound)
    # each token's clipped surrogate (-1.2, -0.9; 0.8: see loss_of) times its weight, dapo's 1 / 3 tokens
    loss, st = loss_of("dapo", weight=torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert loss.item() == pytest.approx((-0.9 + 0.4) / 3) and st["is_weight"] == 1.5 and st["is_masked"] == 1


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_update_weighs_rollouts_sampled_by_another_policy(mode):
    """--rollout-bf16: with every token sampled at 0.2 nats below the trained policy's log-prob, each token's
    gradient weighs e^0.2 (token_truncate: the step e^0.2 times the unweighted one's, SGD at lr 1), or each
    sequence's e^(0.2 length), left out past the bound (sequence_mask, bound e^0.5: completions of 3+ tokens)."""
    model, groups = sampled_off_policy(-0.2)
    batch = [r for g, _ in groups for r in g]
    steps = {}
    for weigh in ("none", mode):
        a = GRPOArgs(loss="dapo", micro_batch=4, max_new_tokens=4, rollout_bf16=True, rollout_is=weigh,
                     rollout_is_max=math.exp(0.5), clip=0)  # (no grad-norm clipping: the steps' scales count)
        steps[weigh] = sgd_step(model, groups, a)
    (plain, p0), (weighed, p1) = steps["none"], steps[mode]
    long = sum(len(r.ids) for r in batch if len(r.ids) >= 3) / sum(len(r.ids) for r in batch)
    if mode == "token_truncate":
        assert weighed["is_weight"] == pytest.approx(math.exp(0.2)) and weighed["is_masked"] == 0
        w0 = dict(model.named_parameters())
        for name, w in p1.items():
            torch.testing.assert_close(w - w0[name], (p0[name] - w0[name]) * math.exp(0.2), atol=1e-6, rtol=1e-4)
    else:
        assert 0 < long < 1 and weighed["is_masked"] == pytest.approx(long)
    assert "is_weight" not in plain


@pytest.mark.parametrize("change,reuse", [({}, True), (dict(mu=2), False), (dict(beta=0.1), False),
                                          (dict(bf16=True), False), (dict(rollout_bf16=True), False),
                                          (dict(lora_rank=4, lora_dropout=0.1), False),
                                          (dict(lora_rank=4), True), (dict(max_new_tokens=1 << 16), False)])
def test_rollouts_keep_their_logits_only_where_they_are_the_updates(change, reuse):
    """update.reuse_logits: the linear surrogate on fp32 rollouts of the weights it trains, without dropout,
    within REUSE_BYTES (64k tokens x 64 completions x V rows: past it)."""
    from sobre.update import reuse_logits
    model = random_model()
    assert reuse_logits(model, GRPOArgs(**change)) is reuse
    assert not reuse_logits(model.to(torch.bfloat16), GRPOArgs(**change))


def test_grpo_runs_alike_on_the_rollouts_logits_or_its_own(tmp_path, monkeypatch):
    """A `grpo` run whose update takes the rollouts' logits (update.REUSE_LOGITS, the default where reuse_logits
    allows) logs the same steps and exports the same model as one that computes them again."""
    from sobre import grpo as G
    runs = []
    for reuse in (True, False):
        monkeypatch.setattr(sobre.update, "REUSE_LOGITS", reuse)
        given = spy_given_logits(monkeypatch)
        run = G.grpo(GRPOArgs(out=str(tmp_path / str(reuse)), preset="debug", task="arithmetic", steps=2, prompts=2,
                              group=3, max_new_tokens=6, eval_every=1000, lr=1e-2, log_completions=0,
                              rewards=("test_grpo:spread_reward",)))  # (a random model: rewards that differ)
        assert given and set(given) == {reuse}
        runs.append((untimed_rows(run / "metrics.jsonl"), sobre.load(run / "model").state_dict()))
    (rows, weights), (rows2, weights2) = runs
    assert all(r["signal"] == 1 and r["grad_norm"] > 0 for r in rows)
    for r, r2 in zip(rows, rows2, strict=True):
        assert r.keys() == r2.keys()
        assert all(r[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6) for k in r if k != "heldout_pass@1"), (r, r2)
    for name, w in weights.items():
        torch.testing.assert_close(w, weights2[name], atol=1e-4, rtol=1e-4)  # (Adam: lr 1e-2 a step)


def moe_choices(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain forward of ids: each MoE layer's experts [layers, L, K] and biased router scores [layers, L, E]
    (V3's gates, V4's routers: a hash layer's scores unbiased)."""
    from sobre.moe import moe_layers
    seen = []
    hooks = [m.gate.register_forward_hook(lambda g, i, o: seen.append((o[1], o[2] + (0 if g.bias is None else g.bias))))
             for m in moe_layers(model.layers)]
    with torch.no_grad():
        model(torch.tensor([ids], device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return torch.stack([i for i, _ in seen]), torch.stack([s for _, s in seen])


@pytest.mark.parametrize("arch,prefix_cache,chunk", [("deepseek_v3", False, 1024), ("deepseek_v3", True, 5),
                                                      ("deepseek_v4", False, 1024), ("deepseek_v4", True, 5)])
def test_engine_keeps_the_routing_of_every_position(arch, prefix_cache, chunk):
    """Engine(keep_routing=True): each finished sequence holds the experts every MoE layer routed each position of
    prompt + output[:-1] to, as a plain forward of those tokens routes them (a near tie of router scores aside):
    ragged prompts prefilled together, a prompt's twins (its cache copied), prompts past the prefill chunk, shared
    prefixes from the prefix cache, sequences of different lengths (finished rows' blocks moved:
    PagedPool.keep_run), the last few sequences' steps as straight-line code (sobre.plan); DeepSeek-V4 too (its
    rings and compressed entries; hash-routed layers and a learned one)."""
    from sobre.engine import Engine
    torch.manual_seed(0)
    model = random_model() if arch == "deepseek_v3" else v4_model()
    engine = Engine(model, max_batch=16, keep_routing=True, prefix_cache=prefix_cache, prefill_chunk=chunk)
    planned = []
    if engine.plan is not None:  # (sobre.plan runs a step of at most plan.MAX_SEQS sequences)
        real = engine.plan.batch
        engine.plan.batch = lambda seqs, tokens: planned.append(len(seqs)) or real(seqs, tokens)
    assert (engine.plan is not None) == (arch == "deepseek_v3")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, min(400, model.config.vocab_size), (n,), generator=g).tolist() for n in (3, 7, 12, 4)]
    prompts.append(prompts[2][:9] + [5, 6])  # (a prefix of another's)
    for i, p in enumerate(prompts):
        for j in range(2):  # twins
            engine.add_request(p, temperature=1.0, max_new_tokens=3 + 4 * ((i + j) % 3))
    done = {}
    while engine.has_work():
        engine.step()
        done |= engine.collect()
    assert len(done) == 10 and len({len(s.out) for s in done.values()}) == 3
    flips = 0
    for s in done.values():
        ids = s.prompt + s.out[:-1]
        want, scores = moe_choices(model, ids)
        assert s.routes.shape == want.shape and s.routes.dtype == torch.int16
        got = s.routes.long().sort(-1).values
        same = (got == want.sort(-1).values).all(-1)  # [layers, L]
        # where the two differ, the experts chosen score within rounding of each other (a near tie)
        gap = (scores.gather(2, want).sum(-1) - scores.gather(2, s.routes.long()).sum(-1)).abs()
        assert bool((same | (gap < 1e-4)).all()), (s.rid, gap[~same])
        flips += int((~same).sum())
    assert flips <= 2
    assert bool(planned) == (arch == "deepseek_v3")  # (V4 decodes through its modules)
    with pytest.raises(ValueError, match="keep_routing"):
        Engine(random_model(sobre.preset("debug", arch="qwen2")), keep_routing=True)


def replay_reaches_every_row(model, batch):
    """token_logprobs(replay=True) of rollouts with kept routing: the shared-prompt forward equals the padded
    reference forward, both far from the routers' own choice."""
    with torch.no_grad():
        shared, mask, _ = token_logprobs(model, batch, replay=True)
        padded = token_logprobs(model, batch, shared=False, replay=True)[0]
        own = token_logprobs(model, batch)[0]
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    assert (shared - own)[mask].abs().max() > 1e-2


def test_replayed_routing_reaches_every_row_of_thepolicy_step():
    """token_logprobs(replay=True) routes each position to its rollout's kept experts (here random ones, not the
    router's): the shared-prompt forward (padded prompts, completions' FFN on their kept rows only) equals the
    padded reference forward, both far from the router's own choice."""
    from sobre.objective import routes_of
    torch.manual_seed(0)
    model, groups = random_model(), ragged_groups()
    batch = [r for g, _ in groups for r in g]
    g = torch.Generator().manual_seed(4)
    c = model.config
    layers = sum(c.is_moe_layer(i) for i in range(c.n_layers))

    def random_routes(n):
        return torch.rand(layers, n, c.n_routed_experts, generator=g).argsort(-1)[..., :c.n_activated_experts]

    for rows, _ in groups:  # (a prompt's positions routed alike in each of its rollouts, as the engine's twins)
        prompt = random_routes(len(rows[0].prompt))
        for r in rows:
            r.routes = torch.cat([prompt, random_routes(len(r.ids) - 1)], 1).to(torch.int16)
    replay_reaches_every_row(model, batch)
    assert routes_of([(batch[0], 0, len(batch[0].prompt))], 6).shape == (layers, 6, c.n_activated_experts)
    with pytest.raises(ValueError, match="keep_routing=True"):
        routes_of([(batch[0], 0, 99)], 99)


def test_replayed_routing_reaches_every_row_of_a_v4_policy_step():
    """DeepSeek-V4 (every layer routed: hash layers and a learned one): token_logprobs(replay=True) routes each
    position to its rollout's kept experts, the shared-prompt forward (one prompt, completions of different
    lengths: V4's layers run every row) equal to the padded reference, both far from the routers' own choice."""
    torch.manual_seed(0)
    model = v4_model()
    c = model.config
    prompt = list(range(3, 23))
    g = torch.Generator().manual_seed(4)
    prompt_routes = torch.rand(c.n_layers, len(prompt), c.n_routed_experts, generator=g).argsort(-1)[..., :2]
    batch = []
    for i, n in enumerate((9, 2, 30, 17)):
        r = Rollout(prompt, [(7 * i + t) % 50 + 5 for t in range(n)], "", False, 0.0, 0.0, None)
        own = torch.rand(c.n_layers, n - 1, c.n_routed_experts, generator=g).argsort(-1)[..., :2]
        r.routes = torch.cat([prompt_routes, own], 1).to(torch.int16)
        batch.append(r)
    replay_reaches_every_row(model, batch)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v4"])
def test_router_balancing_counts_every_token_the_update_routes(arch):
    """GRPO's router balancing (--router-bias-update) counts every token the update's forwards route in every MoE
    layer (update.counted): each distinct prompt's own positions once and the completions' positions whose next
    token exists; V4 (a forward pair per prompt length) alike. It had read the last forward's alone (the
    completions': with V4's forwards per prompt length, the last length's)."""
    from sobre.moe import moe_layers
    from sobre.update import counted
    model = (random_model() if arch == "deepseek_v3" else v4_model()).train()
    batch = [r for g, _ in ragged_groups() for r in g]
    loads = {m: torch.zeros(m.n_experts) for m in moe_layers(model.layers)}
    with counted(loads):
        token_logprobs(model, batch)
    rows = sum(map(len, {tuple(r.prompt) for r in batch})) + sum(len(r.ids) - 1 for r in batch)
    assert [float(v.sum()) for v in loads.values()] == [rows * model.config.n_activated_experts] * len(loads)


def test_update_on_kept_routing_takes_the_routers_own_step(tmp_path):
    """--keep-routing: rollouts sampled by the engine keep their routing, and the update routed by it takes the
    step the update takes routing by itself (the same experts, as the engine's batched decode chose them); a dense
    model is refused."""
    from sobre import grpo as G
    from sobre.rollout import sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    task = get_task("arithmetic")
    groups, _ = sample_groups(model, tok, task, task.problems("train", 3), 3, 3, max_new_tokens=8, seed=3,
                              keep_routing=True)
    rewarded = [(g, torch.tensor([float(i % 2), 1.0, 0.0])) for i, (_, g) in enumerate(groups)]
    assert all(r.routes is not None for g, _ in rewarded for r in g)
    same_step(model, [sgd_step(model, rewarded, GRPOArgs(micro_batch=4, max_new_tokens=8, keep_routing=keep))
                      for keep in (True, False)])
    dense = random_model(sobre.preset("debug", arch="qwen2", vocab_size=tok.vocab_size))
    sobre.save(dense, tmp_path / "qwen", tokenizer_dir=tmp_path)
    with pytest.raises(ValueError, match="dense model"):
        G.grpo(GRPOArgs(out=str(tmp_path / "run"), init=str(tmp_path / "qwen"), steps=1, keep_routing=True))


def test_grpo_on_a_v4_model_keeps_its_routing_and_balances_its_routers(tmp_path):
    """`grpo --keep-routing --router-bias-update` on a DeepSeek-V4 model: the engine keeps the routing of its
    rollouts (hash-routed layers and the learned one) and the update routed by it takes the routers' own step; the
    learned layer's balancing bias moves with the rollout tokens' loads (V4's MoE layers are not sobre.moe.MoE:
    they were left out of the loads, silently)."""
    from sobre import grpo as G
    from sobre.moe import moe_layers
    from sobre.rollout import sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = v4_model(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    task = get_task("arithmetic")
    groups, _ = sample_groups(model, tok, task, task.problems("train", 3), 3, 3, max_new_tokens=8, seed=3,
                              keep_routing=True)
    rewarded = [(g, torch.tensor([float(i % 2), 1.0, 0.0])) for i, (_, g) in enumerate(groups)]
    assert all(r.routes.shape == (4, len(r.prompt) + len(r.ids) - 1, 2) for g, _ in rewarded for r in g)
    same_step(model, [sgd_step(model, rewarded, GRPOArgs(micro_batch=4, max_new_tokens=8, keep_routing=keep))
                      for keep in (True, False)])
    sobre.save(model, tmp_path / "v4", tokenizer_dir=tmp_path)
    G.grpo(GRPOArgs(out=str(tmp_path / "run"), init=str(tmp_path / "v4"), task="arithmetic", steps=1, prompts=2,
                    group=3, max_new_tokens=6, eval_every=100, eval_problems=1, keep_routing=True,
                    router_bias_update=0.1))
    trained = sobre.load(tmp_path / "run" / "model")
    before, after = (m.gate.bias for m in (moe_layers(model.layers)[-1], moe_layers(trained.layers)[-1]))
    assert (after - before).abs().min() == pytest.approx(0.1)  # (each expert over or under the mean: +- 0.1)
    assert [m.gate.bias is None for m in moe_layers(trained.layers)] == [True, True, True, False]


def test_sampling_floors_bound_the_tokens_sampling_keeps():
    """sampling_floors: each row's floor between the tempered logits top-k / top-p / min-p keep (filter_logits)
    and those they drop, so the kept tokens are exactly those above it; -inf where nothing is cut (or greedy)."""
    from sobre.request import Sequence
    from sobre.sampling import SamplingParams, filter_logits, sampling_floors
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.3, min_p=0.2), SamplingParams(temperature=1.0), SamplingParams()]
    floors = sampling_floors([Sequence(i, [1], p) for i, p in enumerate(params)], logits)
    kept = filter_logits(logits, [p if p.temperature else SamplingParams() for p in params]) > float("-inf")
    for i, p in enumerate(params[:3]):
        assert torch.equal(logits[i] / p.temperature >= floors[i], kept[i]), i
    assert int(kept[0].sum()) == 3 and floors[3:] == [float("-inf")] * 2
    every = params[:4]  # (sample()'s filtered logits where every row draws, as the engine hands them over)
    assert sampling_floors([Sequence(i, [1], p) for i, p in enumerate(every)], logits[:4],
                           filter_logits(logits[:4], every)) == floors[:4]


def test_head_logprobs_over_the_kept_tokens_equal_autograds(monkeypatch):
    """Keep Sampling Mask in the head: head_logprobs and head_weighted_logprobs with floors take each row's
    softmax over its tokens at or above the floor (and its target, even below it): log-probs, entropies and both
    gradients against log_softmax over those tokens, chunks of 7 rows."""
    import torch.nn.functional as F

    import sobre.loss
    monkeypatch.setattr(sobre.loss, "CHUNK_LOGITS", 7 * 50)
    monkeypatch.setattr(sobre.loss, "MIN_ROWS", 1)
    g = torch.Generator().manual_seed(5)
    h0, w0 = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g) * 0.5
    y = torch.randint(0, 50, (30,), generator=g)
    z = F.linear(h0, w0) / 0.7
    floors = z.sort(-1, descending=True).values[torch.arange(30), torch.randint(0, 20, (30,), generator=g)]
    floors[0] = z[0, y[0]] + 0.5  # (a target under its floor: kept all the same)
    coef = torch.randn(30, generator=g)

    def plain(h, w):
        s = F.linear(h, w) / 0.7
        keep = (s >= floors[:, None]) | F.one_hot(y, 50).bool()
        la = F.log_softmax(s.masked_fill(~keep, float("-inf")), -1)
        lp = la.gather(1, y[:, None])[:, 0]
        return (lp * coef).sum(), lp, -(la.exp() * la.masked_fill(~keep, 0)).sum(-1).detach()

    def logprobs(h, w):
        lp, ent = sobre.loss.head_logprobs(h, w, y, 0.7, entropy=True, floors=floors)
        return (lp * coef).sum(), lp, ent

    def weighted(h, w):
        total, lp, ent = sobre.loss.head_weighted_logprobs(h, w, y, coef, 0.7, True, floors=floors)
        return total, lp, ent

    results = []
    for fn in (logprobs, weighted, plain):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        total, lp, ent = fn(h, w)
        total.backward()
        results.append((total.detach(), lp.detach(), ent, h.grad, w.grad))
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the dropped tokens' probabilities exactly 0 (their e^-87 shares scaled by a loss's coefficients turn denormal,
    # and products over denormals run many times slower)
    probs = sobre.loss._softmax_parts(z.clone(), y, False, floors)[0]
    dropped = (z < floors[:, None]) & ~F.one_hot(y, 50).bool()
    assert bool((probs[dropped] == 0).all()) and bool((probs[~dropped] > 0).all())


def test_rollouts_keep_sampling_floors_and_the_update_renormalises_over_them(tmp_path, monkeypatch):
    """Engine(keep_sampling_mask=True) under top-k 4: each token's floor leaves exactly its row's 4 best tempered
    logits above it, the drawn token among them, and its kept log-prob (keep_logprobs) is the truncated
    distribution's; token_logprobs(masked=True) then equals log_softmax over those 4 at every token, and the
    update on them takes the same step on the linear surrogate as on the general path, not the step over the
    whole vocabulary. The decode steps' floors come from the logits sample() filtered (not filtered again)."""
    import sobre.engine as E
    from sobre.rollout import sample_groups
    from sobre.tasks import get_task
    from sobre.tokenizer import train_tokenizer
    tok = train_tokenizer(["12 + 34 = 46 <think> </think> " * 50], 300, tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    task = get_task("arithmetic")
    given, real = [], E.sampling_floors
    monkeypatch.setattr(E, "sampling_floors", lambda seqs, logits, *kept: given.append(bool(kept)) or real(
        seqs, logits, *kept))
    groups, _ = sample_groups(model, tok, task, task.problems("train", 3), 3, 3, max_new_tokens=8, seed=3,
                              temperature=0.8, top_k=4, keep_logits=True, keep_logprobs=True,
                              keep_sampling_mask=True)
    assert given.count(True) >= 7  # (the decode steps; a first token's floor, from the prompt, is made apart)
    batch = [r for _, g in groups for r in g]
    for r in batch:
        z = torch.stack(r.logits) / 0.8  # [n, V]
        above = z >= torch.tensor(r.floors)[:, None]
        assert above.sum(-1).tolist() == [4] * len(r.ids) and bool(above.gather(1, torch.tensor(r.ids)[:, None]).all())
        want = torch.log_softmax(z.masked_fill(~above, float("-inf")), -1).gather(1, torch.tensor(r.ids)[:, None])
        torch.testing.assert_close(torch.tensor(r.sampled), want[:, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logp, mask, _ = token_logprobs(model, batch, temperature=0.8, masked=True)
    for row, m, r in zip(logp, mask, batch):
        z = torch.stack(r.logits) / 0.8
        want = torch.log_softmax(z.masked_fill(z < torch.tensor(r.floors)[:, None], float("-inf")), -1)
        torch.testing.assert_close(row[m], want.gather(1, torch.tensor(r.ids)[:, None])[:, 0], atol=1e-4, rtol=1e-4)
    rewarded = [(g, torch.tensor([float(i % 2), 1.0, 0.0])) for i, (_, g) in enumerate(groups)]
    steps = []
    for linear in (True, False):
        monkeypatch.setattr(sobre.update, "LINEAR_SURROGATE", linear)
        steps.append(sgd_step(model, rewarded, GRPOArgs(micro_batch=4, max_new_tokens=8, temperature=0.8, top_k=4,
                                                        keep_sampling_mask=True, clip=1e9)))
    same_step(model, steps)
    _, whole = sgd_step(model, rewarded, GRPOArgs(micro_batch=4, max_new_tokens=8, temperature=0.8, top_k=4,
                                                 clip=1e9))  # (over the whole vocabulary: another step)
    assert max((whole[n] - w).abs().max().item() for n, w in steps[0][1].items()) > 1e-3
