"""reward.py: the Bradley-Terry loss and its gradient against hand-worked numbers, the labeller's preference rate
against sigmoid((g_a - g_b) / tau), scores that ignore padding, a tiny reward model that learns a toy preference,
labelled pairs, JSONL errors, best-of-N against a by-hand argmax and its KL against an exact computation, and the
reward and rejection-sampling stages end to end on tiny configs."""
import dataclasses
import json
import math
import random
import shutil

import pytest
import torch

import data
import reward
import sft
import stages
import runs
from model import GPT, GPTConfig, ScalarHeadModel, load_model

torch.set_num_threads(1)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    # the tokenizer's exact vocabulary, so a random model never samples an id that cannot be decoded
    return GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32))


def tiny_rm(seed=0, readout="mean"):
    torch.manual_seed(seed + 100)
    return ScalarHeadModel.from_gpt(tiny_gpt(seed), readout)


def train_prompts(n, seed=0):
    return [data.alpaca_prompt(i, x) for i, x in data.tasks("train", n, seed=seed)]


# ----------------------------------------------------------------------------- the loss and the labeller

def test_preference_loss_and_gradient_hand_worked():
    # r_w  r_l   d = r_w - r_l   -log sigmoid(d) = log(1 + e^-d)   sigmoid(-d)
    #  2    1     1               0.313262                         0.268941
    #  0    0     0               0.693147 (log 2)                 0.5
    # -1    1    -2               2.126928                         0.880797
    # L = (0.313262 + 0.693147 + 2.126928) / 3 = 1.044446
    # dL/dr_w = -sigmoid(-d) / B = (-0.089647, -0.166667, -0.293599), dL/dr_l = +sigmoid(-d) / B
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    loss = reward.preference_loss(chosen, rejected)
    assert math.isclose(loss.item(), 1.044446, abs_tol=1e-6)
    loss.backward()
    expected = torch.tensor([0.089647, 0.166667, 0.293599])
    assert torch.allclose(chosen.grad, -expected, atol=1e-6)
    assert torch.allclose(rejected.grad, expected, atol=1e-6)
    # only the difference matters: shifting both rewards by a constant changes nothing (the RM's scale is free)
    assert math.isclose(reward.preference_loss(chosen + 5, rejected + 5).item(), loss.item(), rel_tol=1e-6)
    # stable far from zero: -log sigmoid(-1000) = 1000, not inf
    assert math.isclose(reward.preference_loss(torch.tensor([0.0]), torch.tensor([1000.0])).item(), 1000.0)


def test_margin_loss_hand_worked():
    # LLaMA-2's margin: -log sigmoid(r_w - r_l - m). d = 1, m = 1: log 2; d = 1, m = 0: the plain loss, bit for bit
    chosen, rejected = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])
    assert math.isclose(reward.preference_loss(chosen, rejected, torch.tensor([1.0, 1.0])).item(), math.log(2),
                        rel_tol=1e-6)
    plain = reward.preference_loss(chosen, rejected)
    assert torch.equal(reward.preference_loss(chosen, rejected, torch.zeros(2)), plain)
    # a margin asks for a larger gap: at the same d the loss (and the push on r_w) grows with m
    losses = [reward.preference_loss(chosen, rejected, m).item() for m in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert losses == sorted(losses) and losses[0] < losses[-1]


def test_label_smoothing_hand_worked():
    # eps = 0.1, d = 1: -(0.9 log sigmoid(1) + 0.1 log sigmoid(-1)) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262;
    # dL/dd = sigmoid(d) - (1 - eps) = 0.731059 - 0.9 = -0.168941, zero at sigmoid(d) = 0.9: d = log 9, where a
    # smoothed label stops pushing the two rewards apart (a plain one never does)
    d = torch.tensor([1.0], requires_grad=True)
    loss = reward.preference_loss(d, torch.zeros(1), smoothing=0.1)
    assert math.isclose(loss.item(), 0.413262, abs_tol=1e-6)
    loss.backward()
    assert math.isclose(d.grad.item(), -0.168941, abs_tol=1e-6)
    at = torch.tensor([math.log(9)], requires_grad=True)
    reward.preference_loss(at, torch.zeros(1), smoothing=0.1).backward()
    assert abs(at.grad.item()) < 1e-6
    plain = reward.preference_loss(d, torch.zeros(1))
    assert torch.equal(reward.preference_loss(d, torch.zeros(1), smoothing=0.0), plain)


def test_train_reward_model_reads_the_pairs_margins():
    # a margin of 0 on every pair is the plain loss: the same reward model, bit for bit; a margin of 1 is not
    pairs = happy_pairs(8, seed=0)
    cfg = reward.Config(steps=3, batch_size=4, lr=1e-3)
    trained = []
    for margin in (None, 0.0, 1.0):
        rm = tiny_rm()
        history = reward.train_reward_model(rm, [p if margin is None else {**p, "margin": margin} for p in pairs],
                                            cfg, "cpu")
        trained.append((history[-1]["loss"], rm.head.weight.detach().clone()))
    assert trained[0][0] == trained[1][0] and torch.equal(trained[0][1], trained[1][1])
    assert trained[2][0] > trained[0][0]


def test_bt_label_rate_matches_sigmoid():
    rng, n = random.Random(0), 4000
    for tau in (0.25, 0.5, 1.0):
        for diff in (-2.0, -0.5, 0.0, 0.5, 2.0):
            g_b = 1.0
            rate = sum(reward.graded_label(g_b + diff, g_b, tau, rng)[0] for _ in range(n)) / n
            p = 1 / (1 + math.exp(-diff / tau))
            assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (tau, diff, rate, p)


class Draws:
    """A random.Random stand-in whose random() returns the given numbers in turn."""

    def __init__(self, *u):
        self.u = list(u)

    def random(self):
        return self.u.pop(0)


def test_graded_label_hand_worked():
    # u = 1/2: eps = log((1 - u) / u) = 0, so z = g(a) - g(b) and the grade is |z| against 0.5, 1.5, 3
    for gap, margin in ((0.2, 0.0), (1.0, 1 / 3), (2.0, 2 / 3), (4.0, 1.0), (-2.0, 2 / 3)):
        assert reward.graded_label(gap, 0.0, 0.5, Draws(0.5)) == (gap > 0, margin)
    # u = 1 / (1 + e^2): eps = 2, z = g(a) - g(b) + tau * 2 = -1.2 + 1 = -0.2: b preferred, negligibly
    a_wins, margin = reward.graded_label(-1.2, 0.0, 0.5, Draws(1 / (1 + math.exp(2))))
    assert a_wins is False and margin == 0.0
    # the preference is graded_label's, and the probability sigmoid((g(a) - g(b)) / tau), from the same draw
    for u in (0.01, 0.3, 0.62, 0.99):
        p = 1 / (1 + math.exp(-1.0 / 0.5))  # g(a) - g(b) = 1
        assert reward.graded_label(1.0, 0.0, 0.5, Draws(u))[0] == (u < p)


def test_twins_are_the_pairs_that_differ_only_in_what_was_asked():
    prompt = data.alpaca_prompt("Write a story about Tom the cat at the park.")
    story = "Tom the cat went to the park. Tom was happy. The end."
    pairs = [{"prompt": prompt, "chosen": story, "rejected": story.replace("Tom", "Lily")},  # a twin
             {"prompt": prompt, "chosen": story, "rejected": story.replace("park", "beach")},  # a twin
             {"prompt": prompt, "chosen": story, "rejected": story.replace("happy", "sad")},  # mood: not a twin
             {"prompt": prompt, "chosen": story, "rejected": story}]  # the same text: not a pair of two
    assert [p for p in pairs if reward.is_twin(p)] == pairs[:2]


def test_the_first_twin_steps_train_on_twins_alone(monkeypatch):
    prompt = data.alpaca_prompt("Write a story about Tom the cat at the park.")
    story = "Tom the cat went to the park. Tom was happy. The end."
    twin = {"prompt": prompt, "chosen": story, "rejected": story.replace("Tom", "Lily")}
    other = {"prompt": prompt, "chosen": story, "rejected": story.replace("happy", "sad")}
    seen, tokenize = [], sft.tokenize_responses
    monkeypatch.setattr(sft, "tokenize_responses", lambda ps, rs: seen.append(rs) or tokenize(ps, rs))
    cfg = reward.Config(steps=6, twin_steps=3, batch_size=4, lr=1e-3)
    reward.train_reward_model(tiny_rm(), [twin] * 2 + [other] * 8, cfg, "cpu")
    sad = [sum(r == other["rejected"] for r in rs) for rs in seen]  # the sad story's rows in each step's batch
    assert sad[:3] == [0, 0, 0] and min(sad[3:]) > 0  # one prompt: after the twin steps, all of its responses


def test_pairs_by_prompt_score_each_response_once_and_every_pair_of_it(monkeypatch):
    # by hand: prompt x has responses a, b, c in pairs (a > b), (c > a), (a > b) again; prompt y one pair (d > e)
    pairs = [{"prompt": "x", "chosen": "a", "rejected": "b", "margin": 1.0}, {"prompt": "x", "chosen": "c",
             "rejected": "a"}, {"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "y", "chosen": "d",
             "rejected": "e"}]
    assert reward.by_prompt(pairs) == [("x", ["a", "b", "c"], [(0, 1, 1.0), (2, 0, 0.0), (0, 1, 0.0)]),
                                       ("y", ["d", "e"], [(0, 1, 0.0)])]
    # a step of both prompts: 5 rows in one forward, the loss over the 4 pairs, as a naive loop over pairs computes it
    rows, losses = [], []
    monkeypatch.setattr(reward, "rm_scores", lambda rm, ids, mask, starts: rows.append(len(ids)) or
                        torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0], requires_grad=True))
    monkeypatch.setattr(reward, "preference_loss", lambda w, l, m, eps: losses.append((w, l, m)) or (w - l).sum())
    monkeypatch.setattr(torch, "randint", lambda n, size, generator: torch.tensor([0, 1]))
    monkeypatch.setattr(reward.stages, "optimizer_step", lambda *a, **k: None)
    reward.train_reward_model(tiny_rm(), pairs, reward.Config(steps=1, twin_steps=0, batch_size=2), "cpu")
    scores = {"a": 1.0, "b": 0.0, "c": 3.0, "d": 2.0, "e": 5.0}  # rows: x's a, b, c, then y's d, e
    w, l, m = losses[0]
    assert rows == [5] and w.tolist() == [scores[p["chosen"]] for p in pairs]
    assert l.tolist() == [scores[p["rejected"]] for p in pairs] and m.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_bt_label_nearly_noiseless_labeller():
    # tau -> 0 is a labeller who always prefers the better response; exp(-d / tau) must not overflow on the way
    rng = random.Random(0)
    for _ in range(20):
        assert reward.graded_label(1.0, -4.0, 1e-3, rng)[0] is True
        assert reward.graded_label(-4.0, 1.0, 1e-3, rng)[0] is False


# ----------------------------------------------------------------------------- scores and padding

def test_rm_scores_last_token_ignores_padding():
    rm = tiny_rm(readout="last").eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(700, (n,), generator=g) for n in (5, 9, 2)]
    with torch.no_grad():
        alone = torch.stack([reward.rm_scores(rm, s[None], torch.ones(1, len(s), dtype=torch.bool), 0)[0]
                             for s in seqs])  # (3,) each row with no padding at all
        assert torch.allclose(alone, torch.stack([rm(s[None])[0, -1] for s in seqs]))  # the last token's value
        # right padding (responses), with a pad id that is a real token, so only the mask can hide it
        ids = data.pad_right(seqs, 42)
        mask = data.pad_right([torch.ones(len(s), dtype=torch.bool) for s in seqs], False)
        assert torch.allclose(reward.rm_scores(rm, ids, mask, 0), alone, atol=1e-5)
        assert not torch.allclose(rm(ids, mask)[:, -1], alone, atol=1e-3)  # the last column is not the answer
        # left padding (prompts): positions count real tokens only
        ids, mask = data.pad_left(seqs, 42)
        assert torch.allclose(reward.rm_scores(rm, ids, mask, 0), alone, atol=1e-5)
        # both at once, as a left-padded prompt plus a right-padded response: 0 0 x x x x x 0 0
        ids = torch.cat([torch.full((2,), 42), seqs[0], torch.full((2,), 42)])[None]
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
        assert torch.allclose(reward.rm_scores(rm, ids, mask, 0), alone[:1], atol=1e-5)


def test_rm_scores_mean_over_the_response_in_both_layouts():
    rm = tiny_rm(readout="mean").eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(700, (n,), generator=g) for n in (3, 1, 4)]
    responses = [torch.randint(700, (n,), generator=g) for n in (5, 2, 1)]
    with torch.no_grad():
        # a naive loop: each row alone, no padding, the mean of the head's values at the response's positions
        naive = torch.stack([rm(torch.cat([p, r])[None])[0, len(p):].mean() for p, r in zip(prompts, responses)])
        # reward.py's layout: prompt + response right-padded (a pad id that is a real token), each its own start
        seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
        ids = data.pad_right(seqs, 42)
        mask = data.pad_right([torch.ones(len(s), dtype=torch.bool) for s in seqs], False)
        starts = torch.tensor([len(p) for p in prompts])
        assert torch.allclose(reward.rm_scores(rm, ids, mask, starts), naive, atol=1e-5)
        # ppo.py's layout: left-padded prompts, then right-padded responses, every response starting at column P
        query, query_mask = data.pad_left(prompts, 42)
        answer = data.pad_right(responses, 42)
        answer_mask = data.pad_right([torch.ones(len(r), dtype=torch.bool) for r in responses], False)
        ids, mask = torch.cat([query, answer], 1), torch.cat([query_mask, answer_mask], 1)
        assert torch.allclose(reward.rm_scores(rm, ids, mask, query.size(1)), naive, atol=1e-5)
        # the prompt's values are not in it: the last-token readout of the same rows is another number
        last = ScalarHeadModel.from_gpt(rm.gpt, "last")
        last.head.load_state_dict(rm.head.state_dict())
        assert not torch.allclose(reward.rm_scores(last, ids, mask, query.size(1)), naive, atol=1e-3)


def test_tokenize_responses_says_where_each_response_starts():
    prompts, responses = train_prompts(2), ["Tom was happy. The end.", "Sad."]
    ids, mask, starts = sft.tokenize_responses(prompts, responses)
    for row, m, start, p, r in zip(ids, mask, starts, prompts, responses):
        assert row[:start].tolist() == data.encode(p)
        assert row[start:int(m.sum())].tolist() == data.encode(r) + [data.special(data.EOT)]


def test_score_texts_batches_like_one_at_a_time():
    rm = tiny_rm()
    prompts = train_prompts(3)
    responses = ["Tom was happy. The end.", "Sad.", "Lily the fox went to the park and found a red ball."]
    batched = reward.score_texts(rm, prompts, responses, "cpu", batch_size=2)
    for i in range(3):
        assert math.isclose(batched[i].item(), reward.score_texts(rm, prompts[i:i + 1], responses[i:i + 1],
                                                                  "cpu")[0].item(), abs_tol=1e-5)


# ----------------------------------------------------------------------------- a toy preference

def happy_pairs(n, seed):
    """Chosen says "happy" somewhere in a random sentence; rejected is the same sentence with another word there."""
    rng = random.Random(seed)
    others = ["tired", "quiet", "big", "red", "little", "old", "curious", "young"]
    words = data.NAMES + data.ANIMALS + data.PLACES + data.OBJECTS
    pairs = []
    for prompt in train_prompts(n, seed=seed):
        sentence = [rng.choice(words) for _ in range(rng.randint(4, 10))]
        at = rng.randint(0, len(sentence))
        chosen = " ".join(sentence[:at] + ["happy"] + sentence[at:]) + "."
        rejected = " ".join(sentence[:at] + [rng.choice(others)] + sentence[at:]) + "."
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def test_reward_model_learns_a_toy_preference():
    train_pairs, heldout = happy_pairs(200, seed=0), happy_pairs(64, seed=1)
    flip = lambda pairs: [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    # a random RM may already lean one way on "happy", so it learns the preference and, from the same
    # initialisation, its opposite: no initialisation can pass both
    for train_pairs_, heldout_ in ((train_pairs, heldout), (flip(train_pairs), flip(heldout))):
        rm = tiny_rm()
        history = reward.train_reward_model(rm, train_pairs_, reward.Config(steps=30, batch_size=16, lr=1e-2, seed=0),
                                            "cpu")
        assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
        assert reward.pairwise_accuracy(rm, heldout_, "cpu") >= 0.9
    # pairwise_accuracy by hand on a few pairs: the fraction where the chosen scores above the rejected
    few = heldout_[:8]
    chosen = reward.score_texts(rm, [p["prompt"] for p in few], [p["chosen"] for p in few], "cpu")
    rejected = reward.score_texts(rm, [p["prompt"] for p in few], [p["rejected"] for p in few], "cpu")
    assert reward.pairwise_accuracy(rm, few, "cpu") == sum(float(c > r) for c, r in zip(chosen, rejected)) / 8


# ----------------------------------------------------------------------------- labelled pairs and files

def test_graded_pairs_are_the_same_preferences_with_the_labellers_margin():
    policy, prompts = tiny_gpt(), train_prompts(8)
    plain, _ = reward.label_pairs(policy, prompts, tau=0.5, max_new_tokens=8, device="cpu", seed=3)
    graded, _ = reward.label_pairs(policy, prompts, tau=0.5, max_new_tokens=8, device="cpu", seed=3, grades=True)
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in graded] == plain and "margin" not in plain[0]
    torch.manual_seed(3)  # the same two samples a prompt, a and b of each pair
    texts, *_ = sft.sample(policy, [p for p in prompts for _ in range(2)], 8)
    rng = random.Random(3)  # label_pairs' own draws, one a pair: the preferences and margins are graded_label's
    for i, p in enumerate(graded):
        a, b = texts[2 * i], texts[2 * i + 1]
        a_wins, margin = reward.graded_label(data.gold_reward(p["prompt"], a), data.gold_reward(p["prompt"], b),
                                             0.5, rng)
        assert p["chosen"] == (a if a_wins else b) and p["margin"] == margin


def test_label_pairs_one_per_prompt_and_agreement_from_gold():
    policy = tiny_gpt()
    prompts = train_prompts(16)
    pairs, agreement = reward.label_pairs(policy, prompts, tau=0.5, max_new_tokens=8, device="cpu", seed=3)
    torch.manual_seed(3)  # the same two samples per prompt
    texts, *_ = sft.sample(policy, [p for p in prompts for _ in range(2)], 8)
    assert len(pairs) == len(prompts)
    for i, (prompt, pair) in enumerate(zip(prompts, pairs)):
        assert pair["prompt"] == prompt
        assert sorted([pair["chosen"], pair["rejected"]]) == sorted(texts[2 * i:2 * i + 2])
    # k = 3 samples per prompt: all 3 pairs of them, each drawn from that prompt's own samples
    pairs3, _ = reward.label_pairs(policy, prompts[:4], tau=0.5, max_new_tokens=8, device="cpu", seed=3, k=3)
    torch.manual_seed(3)
    texts3, *_ = sft.sample(policy, [p for p in prompts[:4] for _ in range(3)], 8)
    assert len(pairs3) == 4 * 3
    for j, pair in enumerate(pairs3):
        i = j // 3
        assert pair["prompt"] == prompts[i]
        assert {pair["chosen"], pair["rejected"]} <= set(texts3[3 * i:3 * i + 3])
    # agreement: the fraction of pairs whose chosen is the gold-better one; ties count half
    by_hand = []
    for p in pairs:
        gc, gr = data.gold_reward(p["prompt"], p["chosen"]), data.gold_reward(p["prompt"], p["rejected"])
        by_hand.append(0.5 if gc == gr else float(gc > gr))
    assert math.isclose(agreement, sum(by_hand) / len(by_hand))
    assert 0 < sum(by_hand) < len(by_hand)  # distinct random samples: the gold human has an opinion


def test_retold_changes_only_whether_the_story_does_what_was_asked():
    rng = random.Random(0)
    prompt = data.alpaca_prompt("Write a story about Lily the fox at the beach.")
    good = "Lily the fox lived near the beach. Lily felt very happy. The end."
    bad = "Tom the cat lived near the park. Tom the cat felt very happy. The end."
    some = "Lily the cat lived near the beach. Lily the cat felt very happy. The end."  # two requests of three
    for text, follow_before, follow_after in ((good, 2.0, -2.0), (bad, -2.0, 2.0), (some, 4 * 2 / 3 - 2, 2.0)):
        twin = reward.retold(prompt, text, rng)
        terms, twin_terms = data.gold_terms(prompt, text), data.gold_terms(prompt, twin)
        assert (terms["follow"], twin_terms["follow"]) == (follow_before, follow_after)
        others = lambda t: {k: v for k, v in t.items() if k != "follow"}
        assert others(terms) == others(twin_terms)
        assert len(twin.split()) == len(text.split())  # one word for another, nothing else
    # a continuation asks only to keep its protagonist's name
    continuation = data.alpaca_prompt("Continue the story.", "Lily the fox lived near the beach.")
    assert reward.retold(continuation, "Lily felt very happy. The end.", rng).split()[0] != "Lily"


def test_label_pairs_with_retold_twins(monkeypatch):
    prompts = train_prompts(6)
    rng = random.Random(0)
    # two stories per prompt, as the SFT model would sample them: every story names a character, animal and place
    texts = [data.story(rng) for _ in range(2 * len(prompts))]
    monkeypatch.setattr(sft, "sample", lambda policy, ps, *args, **kwargs: (texts[:len(ps)], None, None, None))
    pairs, _ = reward.label_pairs(None, prompts, tau=0.5, max_new_tokens=8, device="cpu", seed=3, k=2, retell=True)
    others = lambda terms: {k: v for k, v in terms.items() if k != "follow"}
    for i, prompt in enumerate(prompts):
        own = [p for p in pairs if p["prompt"] == prompt]
        # the pair of the two samples, then each sample against its twin
        assert len(own) == 3 and {own[0]["chosen"], own[0]["rejected"]} == set(texts[2 * i:2 * i + 2])
        for pair, sample in zip(own[1:], texts[2 * i:2 * i + 2]):
            assert sample in (pair["chosen"], pair["rejected"])
            twin = pair["rejected"] if sample == pair["chosen"] else pair["chosen"]
            assert twin != sample and len(twin.split()) == len(sample.split())
            assert others(data.gold_terms(prompt, sample)) == others(data.gold_terms(prompt, twin))
            # a story that does everything asked is retold to do none of it; any other, to do all of it
            assert data.gold_terms(prompt, twin)["follow"] == (-2 if data.follows(prompt, sample) else 2)


def test_prompt_swap_hand_made():
    # two prompts asking for different things, and for each a story that does what it asks and one that does not
    p1 = data.alpaca_prompt("Write a story about Lily the fox.")
    p2 = data.alpaca_prompt("Write a story about Tom the cat.")
    lily = "Lily the fox lived near the beach. Lily felt very happy. The end."
    tom = "Tom the cat lived near the park. Tom felt very sad. The end."
    pairs = [{"prompt": p1, "chosen": lily, "rejected": tom}, {"prompt": p2, "chosen": tom, "rejected": lily}]
    assert stages.other_prompts([p1, p2]) == [p2, p1]
    # the gold human prefers lily under p1 and tom under p2; swapped, each pair is ordered the other way
    blind = lambda prompts, texts: torch.tensor([float("happy" in t) for t in texts])  # likes happy stories
    reads = lambda prompts, texts: torch.tensor([data.gold_terms(p, t)["follow"] for p, t in zip(prompts, texts)])
    swap_blind, swap_reads = stages.prompt_swap(blind, pairs), stages.prompt_swap(reads, pairs)
    assert swap_blind["gold_swapped"] == swap_reads["gold_swapped"] == 0 and swap_blind["gold_drop"] == 1
    # the blind scorer agrees with gold on one pair of two, swapped or not: no drop
    assert (swap_blind["right"], swap_blind["swapped"], swap_blind["drop"]) == (0.5, 0.5, 0.0)
    # the scorer that reads the prompt is right on both and wrong on both once the prompt is swapped
    assert (swap_reads["right"], swap_reads["swapped"], swap_reads["drop"]) == (1.0, 0.0, 1.0)
    # a tie counts half: a constant scorer agrees 0.5 either way
    flat = stages.prompt_swap(lambda prompts, texts: torch.zeros(len(texts)), pairs)
    assert (flat["right"], flat["swapped"]) == (0.5, 0.5)


def test_pairs_stage_uses_the_reward_config_it_is_given(tmp_path, monkeypatch):
    # `python reward.py --n_prompts=16 --k=3 --tau=0.1` must label 16 prompts at tau 0.1, not the preset's defaults
    cfg = reward.Config(out_dir=str(tmp_path), preset="small", device="cpu", n_prompts=16, k=3, tau=0.1,
                        max_new_tokens=8, seed=5, retell=False, grades=False)
    stages.save_stage(str(tmp_path / "sft"), GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)),
                   {}, step=0, built_from=stages.record("sft", cfg))
    seen = {}

    def fake_label_pairs(policy, prompts, tau, max_new_tokens, device, seed, k, retell, grades):
        seen.update(n=len(prompts), tau=tau, max_new_tokens=max_new_tokens, seed=seed, k=k, retell=retell,
                    grades=grades)
        return [{"prompt": p, "chosen": "a", "rejected": "b"} for p in prompts], 1.0

    monkeypatch.setattr(reward, "label_pairs", fake_label_pairs)
    path = stages.ensure_stage("pairs", cfg)
    assert seen == dict(n=16, tau=0.1, max_new_tokens=8, seed=5, k=3, retell=False, grades=False)
    assert len(reward.load_pairs(path)) == 16
    # asked again with the same settings, the pairs are reused; with another seed, the run stops before any work
    assert stages.ensure_stage("pairs", cfg) == path and seen["n"] == 16
    seen.clear()
    with pytest.raises(stages.StageMismatch,
                       match=r"^stage 'pairs': .*pairs.jsonl was built with seed=5 \(this run: 6\)"):
        stages.ensure_stage("pairs", dataclasses.replace(cfg, seed=6))
    assert seen == {}


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', "not valid JSON"),
    ('{"prompt": "p", "chosen": "c"}', "missing key 'rejected'"),
    ('{"prompt": "p", "chosen": 5, "rejected": "r"}', "'chosen' must be a string"),
    ('["p", "c", "r"]', "expected a JSON object"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": -1}', "'margin' must be a number >= 0, got -1"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}', "'margin' must be a number >= 0"),
])
def test_load_pairs_errors_name_the_line(tmp_path, bad, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")  # the blank line is skipped but still counted: bad is line 3
    with pytest.raises(ValueError) as e:
        reward.load_pairs(str(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_load_pairs_round_trip(tmp_path):
    pairs = happy_pairs(3, seed=0)
    runs.save_jsonl(str(tmp_path / "pairs.jsonl"), pairs)
    assert reward.load_pairs(str(tmp_path / "pairs.jsonl")) == pairs


# ----------------------------------------------------------------------------- best-of-N

def test_best_of_n_picks_the_highest_scored_sample():
    policy, rm = tiny_gpt(), tiny_rm(seed=1)
    prompts, n = train_prompts(3), 4
    torch.manual_seed(0)
    best, groups, scores = reward.best_of_n(policy, rm, prompts, n, max_new_tokens=8, device="cpu")
    assert len(best) == len(groups) == 3 and scores.shape == (3, n)
    for prompt, group, row, b in zip(prompts, groups, scores, best):
        assert len(group) == n
        by_hand = reward.score_texts(rm, [prompt] * n, group, "cpu").tolist()  # one prompt at a time
        assert torch.allclose(row, torch.tensor(by_hand), atol=1e-5)
        assert len(set(by_hand)) > 1  # otherwise any pick would pass
        assert b == group[max(range(n), key=lambda j: by_hand[j])]


def test_best_of_n_kl_formula_is_exact_for_many_distinct_samples():
    # a policy uniform over M responses of distinct reward: best-of-N picks the k-th worst with probability
    # (k/M)^N - ((k-1)/M)^N, and KL(best-of-N || policy) -> log N - (N - 1) / N as M grows (Stiennon et al. 2020)
    M = 100000
    k = torch.arange(1, M + 1, dtype=torch.float64)
    for N in (1, 2, 4, 8):
        p = (k / M) ** N - ((k - 1) / M) ** N  # (M,)
        kl = float((p * torch.log(p * M)).sum())
        assert math.isclose(kl, math.log(N) - (N - 1) / N, abs_tol=1e-6)


def test_best_of_n_curve():
    policy, rm = tiny_gpt(), tiny_rm(seed=1)
    prompts = train_prompts(3)
    cfg = reward.Config(bon_max_n=4, max_new_tokens=8, seed=0)
    curve = reward.best_of_n_curve(policy, rm, prompts, cfg, "cpu")
    assert [c["n"] for c in curve] == [1, 2, 4]
    # log N - (N - 1) / N:  N = 1: 0;  N = 2: 0.693147 - 0.5 = 0.193147;  N = 4: 1.386294 - 0.75 = 0.636294
    for c, kl in zip(curve, [0.0, 0.193147, 0.636294]):
        assert math.isclose(c["kl"], kl, abs_tol=1e-6)
    rm_scores = [c["rm_score"] for c in curve]
    assert rm_scores == sorted(rm_scores)  # the best of more samples (the first n of the same ones) scores higher
    # N = 1 is the SFT model's evaluation sample itself (the point SFT sits at); N = 4 is the RM's pick of it and of
    # three fresh samples
    sft_eval, first = sft.evaluate(policy, prompts, 8, "cpu", seed=cfg.seed)
    assert curve[0]["gold_reward"] == sft_eval["gold_reward"] and curve[0]["follow_rate"] == sft_eval["follow_rate"]
    torch.manual_seed(cfg.seed + 3)
    _, rest, _ = reward.best_of_n(policy, rm, prompts, 3, 8, "cpu")
    groups = [[f] + g for f, g in zip(first, rest)]
    scores = [[float(x) for x in reward.score_texts(rm, [p] * 4, g, "cpu")] for p, g in zip(prompts, groups)]
    best = [g[max(range(4), key=s.__getitem__)] for g, s in zip(groups, scores)]
    gold_4 = sum(data.gold_reward(p, b) for p, b in zip(prompts, best)) / 3
    assert math.isclose(curve[-1]["gold_reward"], gold_4)
    assert curve[0]["win_rate_vs_sft"] == 0.5  # best-of-1 is the SFT sample: every prompt a tie
    assert curve[-1]["win_rate_vs_sft"] == sft.win_rate(prompts, best, first)


# ----------------------------------------------------------------------------- baselines: rules that read no weights

def test_rules_agreement_by_hand_ties_count_half():
    prompt = data.alpaca_prompt("Write a story about Lily the fox.")
    pairs = [{"prompt": prompt, "chosen": "Lily the fox ran.", "rejected": "Tom ran home fast today."},
             {"prompt": prompt, "chosen": "A cat sat.", "rejected": "A dog sat."}]
    # the request's own words (the template's left out): story, about, lily, fox; chosen repeats 2, rejected 0
    assert stages.words(prompt) - stages.TEMPLATE == {"story", "about", "lily", "fox"}
    rules = stages.baselines(pairs)
    # longer: pair 1 picks the rejected (5 words > 4), pair 2 is a tie (3 = 3): (0 + 1/2) / 2
    assert rules["the longer answer"] == {"accuracy": 0.25}
    # names the request: pair 1 right (2 > 0), pair 2 a tie (0 = 0): (1 + 1/2) / 2
    assert rules["names the request"] == {"accuracy": 0.75}
    # over the labeller's coin with gold gaps (1, 0) and tau 0.5: p = sigmoid(2), sigmoid(0) = 1/2
    p1 = 1 / (1 + math.exp(-2))
    rules = stages.baselines(pairs, gaps=[1.0, 0.0], tau=0.5)
    assert rules["the longer answer"]["expected"] == pytest.approx(((1 - p1) + 0.5) / 2)
    assert rules["names the request"]["expected"] == pytest.approx((p1 + 0.5) / 2)


def test_expected_accuracy_against_a_naive_loop_with_ties():
    gen = torch.Generator().manual_seed(0)
    gaps = torch.randn(50, generator=gen).tolist()
    chosen = torch.randint(0, 3, (50,), generator=gen).float()  # many ties
    rejected = torch.randint(0, 3, (50,), generator=gen).float()
    naive = []
    for g, c, r in zip(gaps, chosen.tolist(), rejected.tolist()):
        p = 1 / (1 + math.exp(-g / 0.7))  # P(the label says chosen)
        naive.append(p if c > r else 1 - p if c < r else 0.5)
    acc, ceiling = stages.expected_accuracy(gaps, chosen, rejected, 0.7)
    assert acc == pytest.approx(sum(naive) / 50)
    assert ceiling == pytest.approx(sum(max(1 / (1 + math.exp(-g / 0.7)), 1 / (1 + math.exp(g / 0.7))) for g in gaps) / 50)
    assert stages.agreement(chosen, rejected) == pytest.approx(
        sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen.tolist(), rejected.tolist())) / 50)


# ----------------------------------------------------------------------------- the stages, tiny

def tiny_reward_cfg(out_dir, **overrides):
    cfg = reward.Config(out_dir=str(out_dir), preset="small", device="cpu", n_prompts=8, k=3, n_eval_pairs=8, steps=3,
                        batch_size=4, eval_prompts=4, bon_prompts=2, bon_max_n=4, max_new_tokens=16, rs_prompts=4,
                        rs_n=2, rs_steps=2)
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """pretrain -> sft -> pairs -> reward model, tiny, shared by the stage tests below."""
    out = tmp_path_factory.mktemp("stages")
    sft.sft(sft.Config(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=3,
                       sft_steps=3, batch_size=4, eval_prompts=4, max_new_tokens=16, out_dir=str(out),
                       preset="small", device="cpu"))
    cfg = tiny_reward_cfg(out)
    return out, cfg, reward.train(cfg)  # labels the pairs itself, with cfg's n_prompts and k


def test_reward_end_to_end(reward_run):
    out, cfg, metrics = reward_run
    saved = json.loads((out / "reward" / "metrics.json").read_text())
    for key in ("heldout_accuracy", "label_ceiling", "rm_gold_correlation"):
        assert math.isfinite(saved[key]) and saved[key] == metrics[key]
    assert 0 <= saved["heldout_accuracy"] <= 1 and -1 <= saved["rm_gold_correlation"] <= 1
    # in expectation over the labeller no ranking beats the gold order's
    assert 0 <= saved["heldout_accuracy_expected"] <= saved["label_ceiling_expected"] <= 1
    assert len(saved["history"]) == cfg.steps and "best_of_n" not in saved  # best-of-N is a stage of its own
    # the prompt-swap check is stored, and its drops are what its agreements say
    swap = saved["prompt_swap"]
    assert swap["drop"] == pytest.approx(swap["right"] - swap["swapped"])
    assert swap["gold_drop"] == pytest.approx(1 - swap["gold_swapped"]) and 0 <= swap["gold_swapped"] <= 1
    rm = load_model(str(out / "reward" / "model.pt"))
    policy = load_model(str(out / "sft" / "model.pt"))
    assert isinstance(rm, ScalarHeadModel) and rm.config.readout == cfg.readout  # saved with the model
    # the ceiling is the labeller's agreement with gold on the held-out pairs
    _, ceiling = reward.label_pairs(policy, sft.eval_prompts(cfg.n_eval_pairs), cfg.tau, cfg.max_new_tokens, "cpu",
                                    cfg.seed + 1)
    assert saved["label_ceiling"] == ceiling
    # centred: the saved RM scores the SFT samples it was centred on 0 on average
    torch.manual_seed(cfg.seed + 2)
    prompts = sft.eval_prompts(cfg.eval_prompts)
    texts, *_ = sft.sample(policy, prompts, cfg.max_new_tokens)
    scores = reward.score_texts(rm, prompts, texts, "cpu")
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() > 1e-3  # centred, yet not all the same
    # the training accuracy is over a fixed sample of n_eval_pairs training pairs, not over the last batch
    pairs = reward.load_pairs(str(out / "reward" / "pairs.jsonl"))
    sample = random.Random(cfg.seed).sample(pairs, cfg.n_eval_pairs)
    assert len(pairs) > cfg.n_eval_pairs and saved["train_accuracy"] == reward.pairwise_accuracy(rm, sample, "cpu")
    assert saved["train_accuracy"] * cfg.n_eval_pairs == round(saved["train_accuracy"] * cfg.n_eval_pairs)


def test_reward_end_to_end_reports_the_rules_beside_the_reward_model(reward_run):
    out, cfg, metrics = reward_run
    saved = json.loads((out / "reward" / "metrics.json").read_text())
    policy = load_model(str(out / "sft" / "model.pt"))
    eval_pairs, _ = reward.label_pairs(policy, sft.eval_prompts(cfg.n_eval_pairs), cfg.tau, cfg.max_new_tokens, "cpu",
                                       cfg.seed + 1)
    gaps = [data.gold_reward(p["prompt"], p["chosen"]) - data.gold_reward(p["prompt"], p["rejected"]) for p in eval_pairs]
    assert stages.gold_gaps(eval_pairs) == gaps
    assert saved["baselines"] == stages.baselines(eval_pairs, gaps, cfg.tau)  # the same held-out pairs
    assert set(saved["baselines"]) == {"the longer answer", "names the request"}
    assert "your_heldout" not in saved  # the story world's pairs alone


def test_your_pairs_are_held_out_by_prompt_and_judged_on_your_labels(reward_run, tmp_path, capsys):
    out, cfg, _ = reward_run
    for stage in ("pretrain", "sft"):  # the shared SFT model, in a folder of this test's own
        shutil.copytree(out / stage, tmp_path / stage)
    rng = random.Random(0)
    topics = ("apples", "rivers", "kites", "owls", "boats")
    pairs = [{"prompt": data.alpaca_prompt(f"Tell me about {w}."), "chosen": f"A short note on {w} and more.",
              "rejected": rng.choice(["No.", "Why?"])} for w in topics for _ in range(2)]
    path = tmp_path / "my_pairs.jsonl"
    runs.save_jsonl(str(path), pairs)
    ucfg = dataclasses.replace(cfg, out_dir=str(tmp_path), data=str(path), val_frac=0.4)
    metrics = reward.train(ucfg)
    _, yours = stages.split_by_prompt(pairs, 0.4, ucfg.seed)
    assert len(yours) == 4 and metrics["your_heldout"]["pairs"] == 4  # the pairs of 2 of the 5 prompts
    rm = load_model(str(tmp_path / "reward" / "model.pt"))
    assert metrics["your_heldout"]["reward model"] == reward.pairwise_accuracy(rm, yours, "cpu")
    rules = stages.baselines(yours)
    assert {k: metrics["your_heldout"][k] for k in rules} == {k: v["accuracy"] for k, v in rules.items()}
    assert metrics["your_heldout"]["the longer answer"] == 1.0  # every chosen answer is the longer one
    printed = capsys.readouterr().out
    assert "6 training pairs, 4 of yours held out" in printed
    assert "the story world's held-out pairs" in printed and "your 4 held-out pairs agree with your labels" in printed
    # too few prompts to hold one out (10% of 1 rounds to none): the line says so, and no numbers claim to be yours
    one = tmp_path / "one.jsonl"
    runs.save_jsonl(str(one), pairs[:2])
    metrics = reward.train(dataclasses.replace(ucfg, data=str(one), val_frac=0.1))
    assert "2 training pairs, 0 of yours held out" in capsys.readouterr().out and "your_heldout" not in metrics


def test_best_of_n_stage_is_the_curve_of_the_saved_models(reward_run):
    out, cfg, _ = reward_run
    bcfg = dataclasses.replace(cfg, stage="best_of_n")
    metrics = reward.best_of_n_stage(bcfg)
    saved = json.loads((out / "best_of_n" / "metrics.json").read_text())
    assert saved["best_of_n"] == metrics["best_of_n"] and [c["n"] for c in saved["best_of_n"]] == [1, 2, 4]
    assert all(0 <= c["follow_rate"] <= 1 for c in saved["best_of_n"])
    assert saved["built_from"]["parents"] == stages.record("ppo", bcfg)["parents"]  # the models PPO would start from
    # the same curve as best_of_n_curve on the saved SFT and reward models: the stage adds no draws of its own
    curve = reward.best_of_n_curve(load_model(str(out / "sft" / "model.pt")),
                                   load_model(str(out / "reward" / "model.pt")), sft.eval_prompts(cfg.bon_prompts),
                                   cfg, "cpu")
    assert curve == saved["best_of_n"]


def test_rejection_sampling_with_no_steps_is_the_sft_model(reward_run):
    out, cfg, _ = reward_run
    metrics = reward.rejection_sampling(dataclasses.replace(cfg, stage="rejection", rs_steps=0))
    assert metrics["kl"] == 0 and metrics["win_rate_vs_sft"] == 0.5
    assert metrics["gold_reward"] == metrics["gold_reward_sft"]


def test_rejection_sampling_end_to_end(reward_run):
    out, cfg, _ = reward_run
    metrics = reward.rejection_sampling(dataclasses.replace(cfg, stage="rejection"))
    saved = json.loads((out / "rejection" / "metrics.json").read_text())
    for key in ("gold_reward", "gold_reward_sft", "kl", "win_rate_vs_sft"):
        assert math.isfinite(saved[key]) and saved[key] == metrics[key]
    assert 0 <= saved["win_rate_vs_sft"] <= 1 and len(saved["history"]) == cfg.rs_steps
    policy, sft_model = load_model(str(out / "rejection" / "model.pt")), load_model(str(out / "sft" / "model.pt"))
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft_model.state_dict().values()))
    # the SFT baseline is the SFT model's own evaluation on the same seed
    before, _ = sft.evaluate(sft_model, sft.eval_prompts(cfg.eval_prompts), cfg.max_new_tokens, seed=cfg.seed)
    assert saved["gold_reward_sft"] == before["gold_reward"]


def test_accuracy_by_term_hand_worked():
    # stories that differ in one gold term only: the mood word, or whether the requested name is the one used
    prompt = data.alpaca_prompt("Write a story about Tom.")
    story = lambda name, mood: f"{name} felt very {mood}. {name} went home. The end."
    pairs = [{"prompt": prompt, "chosen": story("Tom", "happy"), "rejected": story("Tom", "sad")},  # mood, label right
             {"prompt": prompt, "chosen": story("Tom", "happy"), "rejected": story("Max", "happy")},  # follow, right
             {"prompt": prompt, "chosen": story("Max", "happy"), "rejected": story("Tom", "happy")},  # follow, wrong
             {"prompt": prompt, "chosen": story("Tom", "sad"), "rejected": story("Tom", "sad")}]  # a gold tie: skipped
    chosen_scores, rejected_scores = [1.0, 0.0, 1.0, 5.0], [0.0, 1.0, 0.0, 0.0]
    # the RM ranks pair 1 as gold does, and pairs 2 and 3 against it; the labels agree with gold on pairs 1 and 2
    assert stages.accuracy_by_term(pairs, chosen_scores, rejected_scores) == {
        "follow": {"pairs": 2, "rm": 0.0, "labels": 0.5}, "mood": {"pairs": 1, "rm": 1.0, "labels": 1.0}}


def test_expected_accuracy_hand_worked():
    # gap  tau  p = sigmoid(gap / tau)   RM ranks chosen first?   RM agrees with a label   gold order agrees
    #  1   0.5  sigmoid(2)  = 0.880797   yes                      0.880797                 0.880797
    # -1   0.5  sigmoid(-2) = 0.119203   no                       0.880797                 0.880797
    #  2   0.5  sigmoid(4)  = 0.982014   no                       0.017986                 0.982014
    #  0   0.5  0.5                      yes                      0.5                      0.5
    rm, ceiling = stages.expected_accuracy([1.0, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 1.0, 2.0], 0.5)
    assert rm == pytest.approx((0.880797 + 0.880797 + 0.017986 + 0.5) / 4, abs=1e-6)
    assert ceiling == pytest.approx((0.880797 + 0.880797 + 0.982014 + 0.5) / 4, abs=1e-6)


def test_expected_accuracy_is_the_mean_over_fresh_labels():
    # relabel the same pairs many times with the labeller itself: the realised accuracies average to the expectations
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    gold_a, gold_b = torch.randn(40, generator=gen).tolist(), torch.randn(40, generator=gen).tolist()
    score_a, score_b = torch.randn(40, generator=gen).tolist(), torch.randn(40, generator=gen).tolist()
    tau, draws, rm_hits, gold_hits = 0.5, 2000, 0, 0
    for _ in range(draws):
        for ga, gb, sa, sb in zip(gold_a, gold_b, score_a, score_b):
            a_chosen = reward.graded_label(ga, gb, tau, rng)[0]
            rm_hits += (sa > sb) == a_chosen
            gold_hits += (ga > gb) == a_chosen
    # orient each pair as the labeller would report it for the expectation: chosen = a, so the gap is g(a) - g(b)
    rm, ceiling = stages.expected_accuracy([a - b for a, b in zip(gold_a, gold_b)], score_a, score_b, tau)
    n = draws * len(gold_a)  # 80000 labels: the SE of a rate is under 0.002
    assert abs(rm_hits / n - rm) < 0.006 and abs(gold_hits / n - ceiling) < 0.006
