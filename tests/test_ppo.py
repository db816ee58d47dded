"""ppo.py: GAE against a naive per-row loop, the per-token reward, the clipped losses against hand-worked numbers,
whitening, the adaptive KL controller, a rollout with policy = reference, and a tiny PPO run that raises a toy
reward end to end."""
import copy
import json
import math
import os

import pytest
import torch

import data
import ppo
import reward
import sft
from model import GPT, GPTConfig, ScalarHeadModel
from ppo import masked_whiten

torch.set_num_threads(1)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    # the tokenizer's exact vocabulary, so a random model never samples an id that cannot be decoded
    return GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=96, n_layer=1, n_head=2, n_embd=32))


def byte_fraction(ids, attention_mask, P):
    """Toy reward: the fraction of real response tokens that are single bytes (ids < 256), about 1/3 at init."""
    response, mask = ids[:, P:], attention_mask[:, P:].float()
    return ((response < 256).float() * mask).sum(1) / mask.sum(1)


def naive_gae(rewards, values, length, gamma, lam):
    """One row, one token at a time, straight from the definition; the episode ends after length tokens."""
    adv = [0.0] * length
    next_adv, next_value = 0.0, 0.0
    for t in reversed(range(length)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t], next_value = next_adv, values[t]
    return adv


def test_compute_gae_matches_naive_loop():
    torch.manual_seed(0)
    lengths = [5, 3, 1, 5, 2]
    B, R = len(lengths), max(lengths)
    rewards, values = torch.randn(B, R), torch.randn(B, R)
    mask = torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]  # (B, R) real tokens: a prefix of each row
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
        for b, n in enumerate(lengths):
            expected = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
            assert torch.allclose(advantages[b, :n], torch.tensor(expected), atol=1e-5)
            assert torch.allclose(returns[b, :n], advantages[b, :n] + values[b, :n])
            assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()  # nothing past the end
    # gamma = lam = 1: the return is the plain reward-to-go sum_{k >= t} r_k, whatever the critic says
    _, returns = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(returns, to_go * mask, atol=1e-5)


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    torch.manual_seed(0)
    lengths = [4, 1, 3]
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]  # (3, 4)
    logprobs, ref_logprobs = torch.randn(3, 4), torch.randn(3, 4)
    scores = torch.tensor([1.5, -2.0, 0.25])
    rewards, non_score_reward, kl = ppo.per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert torch.allclose(kl, (logprobs - ref_logprobs) * mask)
    assert torch.allclose(non_score_reward, -0.1 * kl)
    score_part = rewards - non_score_reward
    expected = torch.zeros(3, 4)
    for b, n in enumerate(lengths):
        expected[b, n - 1] = scores[b]
    assert torch.allclose(score_part, expected)
    assert (rewards[~mask] == 0).all()


def test_policy_loss_hand_worked():
    # ratio, A, eps = 0.2:           -A*ratio   -A*clip(ratio)   max     clipped?
    #   1.5  +1                        -1.5        -1.2            -1.2     yes (gain capped above 1 + eps)
    #   0.5  +1                        -0.5        -0.8            -0.5     no  (pessimistic side is unclipped)
    #   1.1  -1                         1.1         1.1             1.1     no  (inside the range)
    #   0.7  -1                         0.7         0.8             0.8     yes (gain capped below 1 - eps)
    #   1.5  -1                         1.5         1.2             1.5     no
    #   padding (masked out)
    # pg_loss = (-1.2 - 0.5 + 1.1 + 0.8 + 1.5) / 5 = 0.34, clipfrac = 2/5
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 1.5, 9.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old_logprobs = torch.full((1, 6), -2.0)
    logprobs = (old_logprobs + ratio.log()).requires_grad_(True)
    pg_loss, approx_kl, clipfrac = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    assert math.isclose(pg_loss.item(), 0.34, abs_tol=1e-6)
    assert math.isclose(clipfrac.item(), 0.4, abs_tol=1e-6)
    r = ratio[0, :5]
    assert math.isclose(approx_kl.item(), ((r - 1) - r.log()).mean().item(), abs_tol=1e-6)
    # d pg_loss / d logprob = -A * ratio / 5 on unclipped tokens, 0 on clipped ones and padding
    pg_loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.1, 0.22, 0.0, 0.3, 0.0]]), atol=1e-6)


def test_value_loss_hand_worked():
    # V_old = 0, V = 0.5, R = 1, eps_v = 0.2: V_clipped = 0.2; max(0.25, 0.64) = 0.64 (clipped side)
    # V_old = 0.9, V = 1.0, R = 0: V_clipped = 1.0; max(1.0, 1.0) = 1.0
    # vf_loss = 0.5 * (0.64 + 1.0) / 2 = 0.41
    values = torch.tensor([[0.5, 1.0, 7.0]])
    old_values = torch.tensor([[0.0, 0.9, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    vf_loss, vf_clipfrac = ppo.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert math.isclose(vf_loss.item(), 0.41, abs_tol=1e-6)
    assert math.isclose(vf_clipfrac.item(), 0.5, abs_tol=1e-6)


def test_vf_clipfrac_counts_nothing_where_nothing_is_clipped():
    """V_clipped = V_old + clamp(V - V_old, -eps, eps) can differ from V by a rounding error where nothing is
    clipped, and the clipped loss then be larger by that error: found by a search over float32 draws, these three
    positions moved less than eps = 0.2 and count as unclipped. A fourth moved 0.5 (more than eps) towards its
    return: the clipped loss is the larger, so it is clipped."""
    values = torch.tensor([[0.0015595387667417526, 0.006308304145932198, -0.00713312765583396, 1.0]])
    old_values = torch.tensor([[-0.045996733009815216, 0.04712256044149399, 0.10080251842737198, 0.5]])
    returns = torch.tensor([[-0.3927062749862671, 0.4122350513935089, -3.2492423057556152, 2.0]])
    rounded = old_values + (values - old_values).clamp(-0.2, 0.2)
    assert (rounded[:, :3] != values[:, :3]).all()  # the case this test is about: V_clipped != V, nothing clipped
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, vf_clipfrac = ppo.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert vf_clipfrac.item() == 0.25  # the fourth position alone
    _, vf_clipfrac = ppo.value_loss(values[:, :3], old_values[:, :3], returns[:, :3], mask[:, :3], 0.2)
    assert vf_clipfrac.item() == 0.0


def test_per_token_rewards_refuse_a_mask_that_is_not_a_prefix():
    scores, logprobs = torch.zeros(2), torch.zeros(2, 3)
    ok = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ppo.per_token_rewards(scores, logprobs, logprobs, ok, kl_coef=0.1)
    for bad in ([[1, 0, 1], [1, 0, 0]], [[0, 1, 1], [1, 0, 0]], [[0, 0, 0], [1, 0, 0]]):  # a hole; left pad; empty
        with pytest.raises(ValueError, match="ones, then zeros"):
            ppo.per_token_rewards(scores, logprobs, logprobs, torch.tensor(bad, dtype=torch.bool), kl_coef=0.1)


def test_whitening_uses_real_tokens_only():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x = torch.randn(2, 4)
    garbage = x.clone()
    garbage[~mask] = 1e6  # whatever sits on padding must not move the statistics
    w, w_garbage = masked_whiten(x, mask), masked_whiten(garbage, mask)
    assert torch.allclose(w[mask], w_garbage[mask])
    assert abs(w[mask].mean().item()) < 1e-5
    assert math.isclose(w[mask].var(unbiased=False).item(), 1.0, rel_tol=1e-4)


def test_adaptive_kl_controller():
    # KL above target raises beta, below lowers it; the error is clipped to +-0.2 and scaled by n / H
    assert ppo.update_kl_coef(0.1, kl=7.0, target=6.0, n_steps=64, horizon=1000) > 0.1
    assert ppo.update_kl_coef(0.1, kl=5.0, target=6.0, n_steps=64, horizon=1000) < 0.1
    assert ppo.update_kl_coef(0.1, kl=6.0, target=6.0, n_steps=64, horizon=1000) == 0.1
    assert math.isclose(ppo.update_kl_coef(0.1, kl=100.0, target=6.0, n_steps=64, horizon=1000),
                        0.1 * (1 + 0.2 * 64 / 1000))
    assert math.isclose(ppo.update_kl_coef(0.1, kl=0.0, target=6.0, n_steps=64, horizon=1000),
                        0.1 * (1 - 0.2 * 64 / 1000))
    # the floor: a KL under target lowers beta to the floor and no further; above target the floor changes nothing
    assert ppo.update_kl_coef(0.1, kl=0.0, target=6.0, n_steps=64, horizon=1000, floor=0.1) == 0.1
    assert ppo.update_kl_coef(0.1, kl=0.0, target=6.0, n_steps=64, horizon=1000, floor=0.099) == 0.099
    assert math.isclose(ppo.update_kl_coef(0.1, kl=100.0, target=6.0, n_steps=64, horizon=1000, floor=0.1),
                        0.1 * (1 + 0.2 * 64 / 1000))


def test_rollout_kl_is_zero_when_policy_equals_reference():
    policy = tiny_gpt()
    ref = copy.deepcopy(policy)
    critic = ScalarHeadModel(policy.config)
    prompts = [torch.tensor(data.encode(data.alpaca_prompt(i, x))) for i, x in data.tasks("train", 6, seed=0)]
    torch.manual_seed(0)
    batch = ppo.rollout(policy, ref, critic, byte_fraction, prompts, max_new_tokens=8, kl_coef=0.5,
                        no_eos_penalty=1.0, device="cpu")
    mask = batch["mask"]
    assert (batch["kl"] == 0).all() and (batch["non_score_reward"] == 0).all()
    assert torch.allclose(batch["rewards"].sum(1), batch["scores"])  # only the score is left
    assert (mask.long().cummin(1).values == mask.long()).all()  # real tokens are a prefix of each row
    assert torch.allclose(batch["scores"], batch["raw_scores"] - 1.0 * (~batch["ended"]).float())


def test_training_prompts_are_not_evaluation_prompts():
    train = {data.alpaca_prompt(i, x) for i, x in data.tasks("train", 2000, seed=1337)}
    assert not train & set(sft.eval_prompts(512))


def test_tiny_ppo_raises_a_toy_reward(tmp_path):
    policy = tiny_gpt()
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    critic = ScalarHeadModel(policy.config)
    cfg = ppo.Config(out_dir=str(tmp_path), device="cpu", steps=24, batch_size=16, n_epochs=2, n_minibatches=2,
                     max_new_tokens=8, lr=3e-2, critic_lr=3e-3, kl_coef=0.01, no_eos_penalty=0.0, n_prompts=64,
                     eval_prompts=4, sample_every=0)
    metrics = ppo.train(cfg, policy=policy, ref=ref, critic=critic, reward_fn=byte_fraction)
    scores = [row["score"] for row in metrics["history"]]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.15, scores
    assert os.path.exists(tmp_path / "ppo" / "model.pt")
    saved = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    for key in ("gold_reward", "gold_reward_sft", "follow_rate", "follow_rate_sft", "kl", "win_rate_vs_sft"):
        assert math.isfinite(saved[key])
    assert saved["follow_rate"] == saved["policy"]["follow_rate"]
    assert saved["follow_rate_sft"] == saved["sft"]["follow_rate"]
    for key in ("score", "gold", "follow", "kl", "kl_coef", "approx_kl", "clipfrac", "entropy", "explained_var",
                "pg_loss", "vf_loss", "ms"):
        assert key in saved["history"][-1]


def test_group_advantages_match_a_loop_over_each_group():
    torch.manual_seed(0)
    G, rewards = 4, torch.randn(12)
    for kind in ("rloo", "grpo"):
        got = ppo.group_advantages(rewards, G, kind)
        for g in range(0, 12, G):
            group = rewards[g:g + G].tolist()
            mean = sum(group) / G
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))  # the sample std
            for i, r in enumerate(group):
                others = [x for j, x in enumerate(group) if j != i]
                expected = r - sum(others) / (G - 1) if kind == "rloo" else (r - mean) / std
                assert math.isclose(got[g + i].item(), expected, rel_tol=1e-4, abs_tol=1e-5), (kind, g, i)
    # hand-worked: rewards 1, 2, 3, 6. RLOO: 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2; GRPO: (r - 3) / sqrt(14/3)
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(ppo.group_advantages(r, 4, "rloo"), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    assert torch.allclose(ppo.group_advantages(r, 4, "grpo"), (r - 3) / math.sqrt(14 / 3), atol=1e-5)
    # a group whose rewards all tie learns nothing from itself
    assert (ppo.group_advantages(torch.full((4,), 2.5), 4, "grpo") == 0).all()
    assert (ppo.group_advantages(torch.full((4,), 2.5), 4, "rloo") == 0).all()


def test_gold_reward_fn_scores_the_decoded_prompt_and_response():
    prompt = data.alpaca_prompt("Write a story about Tom the cat at the park.")
    responses = ["Tom the cat went to the park. Tom was happy. The end.", "Lily was sad and"]
    eot = data.special(data.EOT)
    query, query_mask = data.pad_left([torch.tensor(data.encode(prompt))] * 2, eot)
    replies = [torch.tensor(data.encode(r) + [eot]) for r in responses]
    response = data.pad_right(replies, eot)
    response_mask = data.pad_right([torch.ones(len(r), dtype=torch.bool) for r in replies], False)
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    scores = ppo.gold_reward_fn(ids, mask, query.size(1))
    expected = [data.gold_reward(prompt, r) for r in responses]
    assert expected[0] > expected[1] and torch.allclose(scores, torch.tensor(expected))


def test_the_oracle_is_paid_gold_scale_times_the_gold_reward():
    prompt = data.alpaca_prompt("Write a story about Tom the cat at the park.")
    eot = data.special(data.EOT)
    query, query_mask = data.pad_left([torch.tensor(data.encode(prompt))], eot)
    reply = torch.tensor([data.encode("Tom the cat went to the park. Tom was happy. The end.") + [eot]])
    ids, mask = torch.cat([query, reply], 1), torch.ones(1, query.size(1) + reply.size(1), dtype=torch.bool)
    g = ppo.gold_reward_fn(ids, mask, query.size(1))
    for scale in (2.0, 1.0):  # 2 = 1 / reward.py's tau, the default
        cfg = ppo.Config(reward="gold", gold_scale=scale, device="cpu")
        tiny = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
        *_, reward_fn = ppo.start_models(cfg, "cpu", policy=tiny, ref=tiny, critic=ScalarHeadModel(tiny.config))
        assert torch.allclose(reward_fn(ids, mask, query.size(1)), scale * g)
    assert ppo.Config().gold_scale == 1 / reward.Config().tau


def test_tiny_rloo_and_grpo_raise_a_toy_reward_without_a_critic(tmp_path):
    for kind in ("rloo", "grpo"):
        policy = tiny_gpt()
        cfg = ppo.Config(out_dir=str(tmp_path / kind), device="cpu", steps=24, batch_size=16, n_epochs=2,
                         n_minibatches=2, max_new_tokens=8, lr=3e-2, kl_coef=0.01, no_eos_penalty=0.0, n_prompts=64,
                         eval_prompts=4, sample_every=0, advantage=kind, group_size=4)
        metrics = ppo.train(cfg, policy=policy, ref=copy.deepcopy(policy), reward_fn=byte_fraction)
        scores = [row["score"] for row in metrics["history"]]
        assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.15, (kind, scores)
        assert "vf_loss" not in metrics["history"][-1]  # no critic was trained


def test_group_size_must_divide_the_batch():
    from runs import parse_config
    for argv in (["--advantage=rloo", "--group_size=5"], ["--advantage=grpo", "--group_size=1"]):
        try:
            parse_config(ppo.Config, argv, ppo.PRESETS, ppo.check)
        except SystemExit as e:
            assert "--group_size" in str(e.code)
        else:
            raise AssertionError(argv)
    parse_config(ppo.Config, ["--group_size=5"], ppo.PRESETS, ppo.check)  # gae samples one per prompt: not used
