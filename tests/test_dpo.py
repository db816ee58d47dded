"""dpo.py: the losses against hand-worked numbers and their formulas, the gradient against the DPO paper's, the
sequence log-probs against a one-pair-at-a-time loop, a tiny DPO run that learns a toy preference, and train()
end to end on a tiny model."""
import copy
import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F

import data
import dpo
import stages
from model import GPT, GPTConfig, sequence_logps

torch.set_num_threads(1)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=96, n_layer=1, n_head=2, n_embd=32))


def toy_pairs():
    """Happy finished stories preferred to sad unfinished ones, on a few prompts."""
    pairs = []
    for name in ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"]:
        pairs.append({"prompt": data.alpaca_prompt(f"Write a story about {name}."),
                      "chosen": f"{name} was happy. The end.",
                      "rejected": f"{name} was sad and"})
    return pairs


def test_sigmoid_loss_hand_worked():
    # log pi(y_w) = -1.0, log pi(y_l) = -2.0, log pi_ref(y_w) = log pi_ref(y_l) = -1.5, beta = 0.5
    # h = (-1.0 + 1.5) - (-2.0 + 1.5) = 0.5 + 0.5 = 1.0, beta h = 0.5
    # L = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    # r_hat(y_w) = 0.5 * 0.5 = 0.25, r_hat(y_l) = 0.5 * -0.5 = -0.25
    # paper: dL/dlog pi(y_w) = -beta sigmoid(r_hat(y_l) - r_hat(y_w)) = -0.5 sigmoid(-0.5) = -0.5 * 0.377541
    #        = -0.188771, and dL/dlog pi(y_l) = +0.188771
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    losses, cr, rr = dpo.dpo_loss(chosen, rejected, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert math.isclose(losses.item(), 0.474077, abs_tol=1e-6)
    assert math.isclose(cr.item(), 0.25, abs_tol=1e-7) and math.isclose(rr.item(), -0.25, abs_tol=1e-7)
    assert not cr.requires_grad and not rr.requires_grad  # rewards are for logging
    losses.sum().backward()
    assert math.isclose(chosen.grad.item(), -0.188771, abs_tol=1e-6)
    assert math.isclose(rejected.grad.item(), 0.188771, abs_tol=1e-6)


def test_label_smoothing_and_ipo_hand_worked():
    # same pair, h = 1.0
    # conservative DPO, eps = 0.2, beta = 0.5: 0.8 * -log sigmoid(0.5) + 0.2 * -log sigmoid(-0.5)
    #   = 0.8 * 0.474077 + 0.2 * 0.974077 = 0.574077
    args = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, _, _ = dpo.dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    assert math.isclose(losses.item(), 0.574077, abs_tol=1e-6)
    # IPO, beta = 0.25: target 1 / (2 * 0.25) = 2, (1.0 - 2)^2 = 1; beta = 0.5: target 1, loss 0
    assert math.isclose(dpo.dpo_loss(*args, beta=0.25, loss_type="ipo")[0].item(), 1.0, abs_tol=1e-6)
    assert math.isclose(dpo.dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item(), 0.0, abs_tol=1e-6)


def test_losses_match_formulas_on_random_batch():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8) * 3 for _ in range(4))
    beta, eps = 0.3, 0.1
    h = (pc - rc) - (pr - rr)
    sig = lambda x: 1 / (1 + torch.exp(-x))
    expected = -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
    assert torch.allclose(dpo.dpo_loss(pc, pr, rc, rr, beta, eps)[0], expected, atol=1e-5)
    assert torch.allclose(dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")[0], (h - 1 / (2 * beta)) ** 2)
    # logsigmoid keeps a hopelessly wrong pair finite: -log sigmoid(-1000) = 1000
    big = dpo.dpo_loss(torch.tensor([0.0]), torch.tensor([1000.0]), torch.zeros(1), torch.zeros(1), beta=1.0)[0]
    assert math.isclose(big.item(), 1000.0, rel_tol=1e-6)


def test_policy_equal_to_reference_gives_log2():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5), torch.randn(5)
    losses, cr, rr = dpo.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)
    # through the model: precomputed reference log-probs of the policy itself
    model = tiny_gpt()
    pairs_t = dpo.pair_tensors(toy_pairs(), model.config.block_size)
    ref = dpo.reference_logps(model, pairs_t, "cpu")  # (N, 2)
    stats = dpo.pair_stats(model, pairs_t, ref, dpo.Config(beta=0.1), "cpu")
    assert math.isclose(stats["loss"], math.log(2), abs_tol=1e-5)
    assert abs(stats["reward_margin"]) < 1e-5


def test_sequence_logps_matches_one_at_a_time_loop():
    model = tiny_gpt()
    pairs = toy_pairs()[:3]
    pairs[1]["chosen"] = "Lily the cat went to the park and found a red ball. She was very happy. The end."
    ids, labels = dpo.collate(dpo.pair_tensors(pairs, model.config.block_size), "cpu")  # (6, T)
    got = sequence_logps(model, ids, labels)  # (6,) chosen 0..2, rejected 3..5
    eot = data.special(data.EOT)
    with torch.no_grad():
        for k, key in enumerate(["chosen", "rejected"]):
            for b, p in enumerate(pairs):
                prompt, response = data.encode(p["prompt"]), data.encode(p[key]) + [eot]
                full = torch.tensor(prompt + response)
                logp = F.log_softmax(model(full[None, :-1])[0][0], dim=-1)  # (T, V), unpadded
                # response token full[t + 1] is predicted at position t
                want = sum(logp[t, full[t + 1]] for t in range(len(prompt) - 1, len(full) - 1))
                assert torch.allclose(got[k * 3 + b], want, atol=1e-4)


def test_gradient_matches_paper_formula_through_the_model():
    # grad L = -beta/B sum_i sigmoid(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w|x) - grad log pi(y_l|x))
    policy, beta = tiny_gpt(0), 0.5
    pairs_t = dpo.pair_tensors(toy_pairs()[:4], policy.config.block_size)
    # a reference the policy disagrees with by a different amount on each pair, so the weights differ
    ref = dpo.reference_logps(policy, pairs_t, "cpu") + torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [-2.0, 1.0]])
    ids, labels = dpo.collate(pairs_t, "cpu")
    chosen, rejected = sequence_logps(policy, ids, labels).chunk(2)
    losses, cr, rr = dpo.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
    params = [p for p in policy.parameters()]
    grads = torch.autograd.grad(losses.mean(), params, retain_graph=True)
    weight = torch.sigmoid(rr - cr)  # (B,) detached
    surrogate = -beta * (weight * (chosen - rejected)).mean()  # its gradient is the paper's formula
    paper = torch.autograd.grad(surrogate, params)
    assert weight.std() > 0.1
    for g, p in zip(grads, paper):
        assert torch.allclose(g, p, atol=1e-6, rtol=1e-4)


def test_tiny_dpo_run_raises_the_margin():
    policy = tiny_gpt()
    ref = copy.deepcopy(policy)
    pairs_t = dpo.pair_tensors(toy_pairs(), policy.config.block_size)
    ref_logps = dpo.reference_logps(ref, pairs_t, "cpu")
    cfg = dpo.Config(steps=12, batch_size=4, lr=3e-3, warmup=2, beta=0.1, eval_every=6)
    before = dpo.pair_stats(policy, pairs_t, ref_logps, cfg, "cpu")
    history = dpo.optimize(policy, pairs_t[:4], ref_logps[:4], cfg, "cpu", pairs_t[4:], ref_logps[4:])
    after = dpo.pair_stats(policy, pairs_t, ref_logps, cfg, "cpu")
    # margin = beta * (log pi/pi_ref(y_w) - log pi/pi_ref(y_l)), zero at the start
    assert abs(before["reward_margin"]) < 1e-5
    assert after["reward_margin"] > 0.5 and after["reward_accuracy"] == 1.0
    assert after["loss"] < math.log(2) - 0.2
    assert len(history) == 12 and "val_reward_accuracy" in history[5] and "val_reward_accuracy" not in history[6]


def test_nll_term_is_the_chosen_responses_per_token_nll():
    # at step 0 the policy is pi_ref, so the DPO loss is log 2 and the rest is alpha * (-log pi(y_w|x) / |y_w|)
    policy = tiny_gpt()
    pair = dpo.pair_tensors(toy_pairs()[:1], policy.config.block_size)  # one pair: every batch is it
    ref_logps = dpo.reference_logps(policy, pair, "cpu")
    (ids, labels), _ = pair[0]
    n_tokens = int((labels != -1).sum())  # the response and its EOS
    nll = -float(ref_logps[0, 0]) / n_tokens  # by hand: the summed log-prob over the count of response tokens
    alpha = 0.5
    cfg = dpo.Config(steps=1, batch_size=2, lr=1e-6, warmup=1, nll_coef=alpha)
    history = dpo.optimize(copy.deepcopy(policy), pair, ref_logps, cfg, "cpu")
    assert math.isclose(history[0]["loss"], math.log(2) + alpha * nll, rel_tol=1e-5)
    plain = dpo.optimize(copy.deepcopy(policy), pair, ref_logps, dataclasses.replace(cfg, nll_coef=0.0), "cpu")
    assert math.isclose(plain[0]["loss"], math.log(2), rel_tol=1e-5)


def test_split_by_prompt_holds_out_whole_prompts():
    pairs = toy_pairs() + toy_pairs()  # two pairs per prompt
    train, val = stages.split_by_prompt(pairs, 0.5, seed=0)
    assert len(train) == len(val) == 6
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}


def test_train_end_to_end_on_tiny_model(tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs()))
    cfg = dpo.Config(data=str(pairs_path), out_dir=str(tmp_path), preset="small", device="cpu", steps=3,
                     batch_size=2, val_frac=0.34, eval_every=2, eval_prompts=4, max_new_tokens=8)
    stages.save_stage(str(tmp_path / "sft"), tiny_gpt(), {}, step=0, built_from=stages.record("sft", cfg))
    metrics = dpo.train(cfg)
    saved = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    for key in ["gold_reward", "gold_reward_sft", "follow_rate", "follow_rate_sft", "kl", "win_rate_vs_sft",
                "reward_accuracy", "val_reward_accuracy", "history"]:
        assert key in metrics and key in saved
    assert len(saved["history"]) == 3 and "reward_margin" in saved["history"][0]
    assert os.path.exists(tmp_path / "dpo" / "model.pt")


def test_without_twins_trains_on_the_sampled_pairs_alone(tmp_path, capsys):
    sampled = toy_pairs()
    twin = {"prompt": sampled[0]["prompt"], "chosen": "Tom was happy. The end.", "rejected": "Lily was happy. The end."}
    assert dpo.reward.is_twin(twin) and not any(dpo.reward.is_twin(p) for p in sampled)  # names alone differ
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in sampled + [twin] * 6))
    cfg = dpo.Config(data=str(pairs_path), out_dir=str(tmp_path), preset="small", device="cpu", steps=1,
                     batch_size=2, val_frac=0.0, eval_prompts=2, max_new_tokens=4)
    stages.save_stage(str(tmp_path / "sft"), tiny_gpt(), {}, step=0, built_from=stages.record("sft", cfg))
    for twins, n in ((True, 12), (False, 6)):
        dpo.train(dataclasses.replace(cfg, twins=twins))
        assert f"on {n} pairs, 0 held out" in capsys.readouterr().out
