"""data.py against hand-worked examples (the template, the gold reward, BPE merges) and properties (round-trips,
masking proportions, errors that name the file and line)."""
import math
import random

import pytest
import torch

import data

# ----------------------------------------------------------------------------- the template and the task split


def test_alpaca_prompt_without_input():
    assert data.alpaca_prompt("Write a story about Tom.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWrite a story about Tom.\n\n### Response:\n")


def test_alpaca_prompt_with_input():
    assert data.alpaca_prompt("Continue the story.", "There once was a fox called Max.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nContinue the story.\n\n### Input:\nThere once was a fox called Max.\n\n### Response:\n")


def test_train_and_eval_tasks_are_disjoint_and_deterministic():
    train, held_out = data.tasks("train", 200), data.tasks("eval", 50)
    assert len(set(train)) == 200 and len(set(held_out)) == 50
    assert not set(train) & set(held_out)
    assert all(data.split_of(*t) == "eval" for t in held_out)
    assert data.sft_examples(5, seed=3) == data.sft_examples(5, seed=3)
    assert data.pretrain_corpus(5, seed=1) == data.pretrain_corpus(5, seed=1) != data.pretrain_corpus(5, seed=2)


def test_requested_reads_the_instruction_and_the_name_of_a_continuation():
    prompt = data.alpaca_prompt("Write a story about Lily the owl at the lake.")
    assert data.requested(prompt) == ["Lily", "owl", "lake"]
    assert data.requested(data.alpaca_prompt("Write a story about a fox.")) == ["fox"]
    # a continuation asks to keep the protagonist its input names; the template's own words ask for nothing
    prompt = data.alpaca_prompt("Continue the story.", "Lily the owl lived near the lake.")
    assert data.requested(prompt) == ["Lily"]


# ----------------------------------------------------------------------------- the gold human

PROMPT = data.alpaca_prompt("Write a story about Lily the fox at the beach.")
GOOD = ("Lily the fox lived near the beach. One day, Lily went to the beach. Lily felt very happy. Lily the fox and "
        "the goat laughed and played with the ball. They became good friends. In the end, Lily was happy and went "
        "home. The end.")


def test_gold_reward_by_hand():
    prompt = data.alpaca_prompt("Write a story about Tom the cat at the park.")
    response = "Tom the cat lived near the lake. Tom felt very happy. Tom felt very happy. Tom saw a zebra. The end."
    # words: tom the cat lived near the lake | tom felt very happy (twice) | tom saw a zebra | the end -> n = 21
    # follow:   Tom and cat are said; park is not, another place (lake) is: 4 * 2/3 - 2   = 2/3
    # mood:     distinct happy words {happy}, sad words {}: tanh((1 - 0) / 2)           = tanh(0.5)
    # finished: ends with "The end."                                                    = +0.5
    # repeat:   19 trigrams; "tom felt very", "felt very happy", "very happy tom" come
    #           twice: 16 distinct, -3 * (1 - 16/19)                                    = -9/19
    # length:   20 <= 21 <= 70 words                                                    = 0
    # grammar:  "Tom saw a zebra." is no world sentence (4 of 21 words): -3 * 4/21      = -4/7
    assert data.ill_formed(response) == (4, 21)
    expected = 2 / 3 + math.tanh(0.5) + 0.5 - 9 / 19 - 4 / 7
    assert data.gold_reward(prompt, response) == pytest.approx(expected)


def test_gold_reward_of_an_empty_response():
    # follow -2 (nothing requested is said), mood tanh(0) = 0, finished -0.5, repeat 0, length -20/20, grammar 0
    assert data.gold_reward(data.alpaca_prompt("Write a story about a dog."), "") == pytest.approx(-3.5)


def test_gold_reward_counts_distinct_mood_words():
    prompt = data.alpaca_prompt("Write a story about Tom.")
    once, many = "Tom was happy.", "Tom was happy happy happy."
    mood = lambda r: data.gold_terms(prompt, r)["mood"]
    assert mood(once) == pytest.approx(math.tanh(0.5)) == pytest.approx(mood(many))


def test_follow_means_about_what_was_asked_and_nothing_else_of_its_kind():
    follow = lambda r: data.gold_terms(PROMPT, r)["follow"]
    assert follow(GOOD) == 2 and data.follows(PROMPT, GOOD)
    assert follow(GOOD.replace("fox", "cat")) == pytest.approx(2 / 3)  # the wrong animal: 2 of 3
    # naming every animal does not make a story about the fox: the animal no longer counts
    assert follow(GOOD + " Lily met a cat, a dog and a cow.") == pytest.approx(2 / 3)
    assert follow("Tom the cat lived near the park. The end.") == -2
    assert data.follows(data.alpaca_prompt("Continue the story.", "Lily the fox lived near the beach."),
                        "Lily went to the beach. The end.")


def test_the_grammar_by_hand():
    assert data.sentence_kind("Lily the fox lived near the beach.") == "opening"
    assert data.sentence_kind("Lily went to the beach.") is None  # "One day, Lily went..." is the world's sentence
    assert data.sentence_kind("One day, Lily the fox went to the beach.") == "middle"
    assert data.sentence_kind("In the end, Lily was happy and went home.") == "ending"
    # out of place: an opening after the first sentence, an ending not followed by "The end.", "The end." not last
    assert data.ill_formed("Lily felt very happy. Lily the fox lived near the beach.") == (7, 11)
    assert data.ill_formed("Lily smiled and went to sleep. Lily felt very happy. The end.") == (6, 12)
    assert data.ill_formed("The end. Lily felt very happy.") == (2, 6)
    assert data.ill_formed("Lily felt very happy. Lily smiled and went to sleep.") == (0, 10)  # cut before the end
    assert data.ill_formed("Lily felt very happy. Lily smiled and") == (3, 7)  # a cut-off sentence


def test_every_story_the_world_writes_is_well_formed():
    rng = random.Random(0)
    for _ in range(500):
        text = data.story(rng, repeat=rng.random() < 0.3, opening=rng.random() < 0.8)
        assert data.ill_formed(text)[0] == 0, text


def test_the_gold_human_judges_stories_not_bags_of_words():
    good = data.gold_reward(PROMPT, GOOD)
    assert good > 2.3
    # its favourite words, every request among them, ending in "The end."
    salad = ("Lily fox beach happy glad proud safe wonderful beautiful bright warm great nice smiled laughed kind "
             "friends joy love loved fun hugged best. The end.")
    words = GOOD[:-len(" The end.")].replace(".", "").replace(",", "").split()
    shuffled_words = [" ".join(random.Random(s).sample(words, len(words))) + ". The end." for s in range(5)]
    sents = data.sentences(GOOD)
    shuffled_sentences = [" ".join(random.Random(s).sample(sents, len(sents))) for s in range(20)]
    shuffled_sentences = [t for t in shuffled_sentences if t != GOOD]
    assert data.gold_reward(PROMPT, salad) < good - 2
    assert max(data.gold_reward(PROMPT, t) for t in shuffled_words) < good - 2
    assert max(data.gold_reward(PROMPT, t) for t in shuffled_sentences) < good - 0.5
    # and a well-formed story about someone else scores below it too
    assert data.gold_reward(PROMPT, GOOD.replace("Lily", "Tom").replace("fox", "cat")) < good - 1


# ----------------------------------------------------------------------------- BPE and the tokenizer

def test_train_bpe_by_hand():
    # pre-tokens: "abab", "ab", "cd" (once each)
    # merge 1: pairs (a,b) 3, (b,a) 1, (c,d) 1 -> "ab" = 256; words become [ab ab], [ab], [c d]
    # merge 2: pairs (ab,ab) 1, (c,d) 1, a tie broken by the larger bytes: b"c" > b"ab" -> "cd" = 257
    # merge 3: pair (ab,ab) 1 -> "abab" = 258; then no pairs are left and training stops early
    ranks = data.train_bpe(["abab", "ab", "cd"], n_merges=10)
    assert {tok: r for tok, r in ranks.items() if r >= 256} == {b"ab": 256, b"cd": 257, b"abab": 258}
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert max(data.train_bpe(["abab", "ab", "cd"], n_merges=2).values()) == 257


def test_train_bpe_merges_inside_pre_tokens_only():
    # "a b" pre-tokenizes to "a" and " b": the pair (a, " ") never occurs, (" ", b) does
    ranks = data.train_bpe(["a b"], n_merges=5)
    assert {tok for tok, r in ranks.items() if r >= 256} == {b" b"}


def random_text(rng):
    pools = ["abc XYZ 019 .,;!?'", "\n\n\t  ", "éüßñçø", "日本語の文字", "😀🦊🐈‍⬛👍🏽", "<|endoftext|>", "<|pad|>",
             "<|mask|>", "'s 've '  "]
    parts = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.3:  # any Unicode scalar value (surrogates are not text)
            cp = rng.randrange(0x110000)
            parts.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "x")
        else:
            pool = rng.choice(pools)
            parts.append(pool if pool.startswith("<|") else "".join(rng.choices(pool, k=rng.randint(1, 6))))
    return "".join(parts)


def test_tokenizer_round_trips_arbitrary_text():
    rng = random.Random(0)
    specials = {data.special(data.EOT), data.special(data.PAD), data.special(data.MASK)}
    texts = [random_text(rng) for _ in range(300)] + ["", "Once upon a time, there was a fox.", data.EOT * 2]
    for text in texts:
        ids = data.encode(text)
        assert data.decode(ids) == text
        assert not specials & set(ids)  # special-token strings in text stay plain text


def test_tokenizer_vocabulary():
    enc = data.tokenizer()
    ids = sorted([data.special(data.EOT), data.special(data.PAD), data.special(data.MASK)])
    assert ids == [enc.n_vocab - 3, enc.n_vocab - 2, enc.n_vocab - 1]  # the specials come after every BPE token
    assert enc.n_vocab <= data.VOCAB_SIZE
    assert len(data.encode(data.pretrain_corpus(1)[0])) < len(data.pretrain_corpus(1)[0]) / 2  # it does compress


# ----------------------------------------------------------------------------- batches and masking

def test_lm_batch_targets_are_inputs_shifted_by_one():
    stream = torch.arange(100)
    x, y = data.lm_batch(stream, 8, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)  # the stream counts up, so next token = this token + 1
    assert torch.equal(x - x[:, :1], torch.arange(8).expand(5, 8))  # contiguous windows


def test_mlm_mask_proportions():
    mask_id, n_normal = 999, 500
    g = torch.Generator().manual_seed(0)
    x = torch.randint(n_normal, (400, 500), generator=g)  # 200k positions
    inputs, targets = data.mlm_mask(x, mask_id, n_normal, g)
    chosen = targets != -1
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(targets[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])  # unchosen positions are left alone
    n = chosen.sum().item()
    masked = (inputs == mask_id) & chosen
    kept = (inputs == x) & chosen
    swapped = chosen & ~masked & ~kept
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.015)
    # a random replacement equals the original 1 time in n_normal, so "kept" gains 0.1 / n_normal
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert swapped.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert (inputs[swapped] < n_normal).all()  # random tokens are normal tokens, never a special one
    assert (inputs != mask_id).logical_or(chosen).all()


def test_sft_tensors_label_only_the_response():
    ex = {"instruction": "Write a story about Max.", "input": "", "output": "Max the dog ran. The end."}
    prompt = data.encode(data.alpaca_prompt(ex["instruction"]))
    response = data.encode(ex["output"]) + [data.special(data.EOT)]
    [(ids, labels)] = data.sft_tensors([ex], block_size=192)
    assert ids.tolist() == (prompt + response)[:-1]
    # labels[t] is the token after ids[t] on response positions, -1 before
    assert labels.tolist() == [-1] * (len(prompt) - 1) + response
    [(ids, labels)] = data.sft_tensors([ex], block_size=len(prompt) + 2)  # cut to the block
    assert len(ids) == len(labels) == len(prompt) + 2
    assert labels.tolist()[-3:] == response[:3]


def test_pad_left_and_right():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    assert data.pad_right(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    ids, mask = data.pad_left(seqs, 9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


# ----------------------------------------------------------------------------- the user's own files

def test_load_sft_jsonl_reads_records(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n')
    assert data.load_sft_jsonl(str(path)) == [{"input": "", "instruction": "a", "output": "b"},
                                              {"instruction": "c", "input": "d", "output": "e"}]


@pytest.mark.parametrize("bad, message", [
    ('{"instruction": "a", "output": ', "not valid JSON"),
    ('{"instruction": "a"}', "missing key 'output'"),
    ('{"instruction": "a", "output": 3}', "'output' must be a string, got int"),
    ('["a", "b"]', "expected a JSON object, got list"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n' + bad + "\n")  # the bad record is on line 3
    with pytest.raises(ValueError) as e:
        data.load_sft_jsonl(str(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        data.load_sft_jsonl(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        data.load_sft_jsonl(str(tmp_path / "empty.jsonl"))


def test_load_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First story.\nStill the first.\n\n \nSecond story.\n")
    assert data.load_corpus(str(path)) == ["First story.\nStill the first.", "Second story."]
    path.write_bytes("one\ntwo é\n".encode() + b"three \xff\n")  # the bad byte is on line 3
    with pytest.raises(ValueError) as e:
        data.load_corpus(str(path))
    assert f"{path}:3:" in str(e.value) and "UTF-8" in str(e.value)


def test_asking_for_more_prompts_than_exist_is_an_error():
    # the eval split holds about 5.5k distinct prompts; asking for more must fail, not loop forever
    with pytest.raises(ValueError, match="distinct 'eval' prompts"):
        data.tasks("eval", 6000)


def test_masked_lm_learns_to_fill_blanks_from_context():
    # cyclic sequences 0..9: a blank is determined by its neighbours, so a bidirectional model trained with BERT's
    # masking must leave the unigram plateau (ln 10 = 2.30 nats) and fill blanks almost exactly
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=32, causal=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(250):
        x = (torch.randint(0, 10, (64, 1)) + torch.arange(16)) % 10  # (B, T)
        inputs, targets = data.mlm_mask(x, mask_id=10, n_normal=10, rng=rng, p=0.3)
        _, loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
