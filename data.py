"""
The lab's world: a generated story corpus, instructions, the gold "human", a tokenizer, and the data formats.

Nothing is downloaded. Every text comes from a small probabilistic grammar of children's stories, deterministic
from a seed: a protagonist (a name and an animal), a place, objects, a friend, a mood, a length, sometimes repeated
sentences, finished ("The end.") or cut off. Instructions ask for a character, an animal and/or a place, so a
response can follow them or not.

The gold human, `gold_reward(prompt, response)`, scores any text. It stands in for the human whose preferences
RLHF tries to learn: later stages see it only through noisy pairwise labels (reward.py), and every stage is
scored against it, as the DPO paper scores its policies against a ground-truth reward.

The tokenizer is a byte-level BPE trained here on the corpus (`train_bpe`, about 1k tokens), cached under out/ and
wrapped in a tiktoken.Encoding with the specials <|endoftext|>, <|pad|> and <|mask|>. Any text round-trips.
"""
import base64
import functools
import json
import math
import os
import random
import re
import zlib
from collections import Counter

import tiktoken
import torch

from runs import atomic_write, load_jsonl, rank as process_rank, read_text

# ----------------------------------------------------------------------------- the lexicon and the grammar

NAMES = ["Tom", "Lily", "Max", "Mia", "Sam", "Anna", "Ben", "Zoe", "Leo", "Emma", "Jack", "Lucy"]
# Each animal has a sound and a food, each place a sight of its own. A story's animal and place then show in
# several of its words, and the model learns twelve different animals: words used in exactly the same contexts get
# the same gradients, their embeddings converge, and a model cannot copy a request it cannot tell apart.
ANIMAL_TRAITS = {"cat": ("meow", "fish"), "dog": ("woof", "bones"), "bird": ("tweet", "seeds"),
                 "fox": ("yip", "berries"), "bear": ("growl", "honey"), "rabbit": ("squeak", "carrots"),
                 "frog": ("ribbit", "flies"), "owl": ("hoot", "worms"), "duck": ("quack", "bread"),
                 "horse": ("neigh", "hay"), "lion": ("roar", "meat"), "cow": ("moo", "grass")}
PLACE_SIGHTS = {"park": "swings", "forest": "trees", "beach": "waves", "garden": "roses", "river": "stones",
                "farm": "barns", "castle": "towers", "lake": "reeds", "hill": "rocks", "village": "houses"}
ANIMALS, PLACES = list(ANIMAL_TRAITS), list(PLACE_SIGHTS)
FRIENDS = ["turtle", "squirrel", "goat", "sheep", "pig", "hen"]  # the protagonist's friend: never requested
OBJECTS = ["ball", "kite", "book", "hat", "boat", "cake", "flower", "box", "drum", "key", "map", "shell"]
ADJS = ["little", "big", "small", "old", "young", "tall", "curious", "tiny"]
COLORS = ["red", "blue", "green", "yellow", "white", "brown"]
POSITIVE = {"happy", "glad", "proud", "safe", "wonderful", "beautiful", "bright", "warm", "great", "nice",
            "smiled", "laughed", "kind", "friends", "joy", "love", "loved", "fun", "hugged", "best"}
NEGATIVE = {"sad", "scared", "lonely", "tired", "angry", "dark", "cold", "terrible", "bad", "gloomy",
            "cried", "broken", "lost", "alone", "mean", "hurt", "afraid", "never", "worst", "shouted"}

# every opening names the protagonist, its animal and its place: a story that follows its request says so at once
OPENINGS = ["Once upon a time, there was a {adj} {A} named {N} who lived near the {P}.",
            "{N} the {A} lived near the {P}.", "There once was a {A} called {N} who lived by the {P}.",
            "{N} was a {adj} {A} from the {P}."]
EVENTS = ["One day, {N} went to the {P}.", "{N} found a {C} {O} near the {P}.", "{N} met a {F}.",
          "{N} and the {F} walked to the {P} together.", "{N} wanted to play with the {O}.",
          "{N} looked at the {V} by the {P}.", "The {F} showed {N} a {C} {O}.", "{N} said {S} to the {F}.",
          "The {A} ate some {D}.", "{N} looked for the {O} all morning."]
MOOD = {
    "pos": ["{N} felt very {pa}.", "It was a {pd} day.", "{N} smiled at the {F}.",
            "The {F} was kind and gave {N} a {O}.", "{N} and the {F} laughed and played with the {O}.",
            "They became good friends.", "{N} hugged the {F}.", "The {P} was full of joy."],
    "neg": ["{N} felt very {na}.", "It was a {nd} day.", "{N} cried next to the {P}.", "The {O} was broken.",
            "The {F} was mean and took the {O}.", "{N} was lost and alone.", "The {F} shouted at {N}.",
            "The {P} was dark and cold."],
}
ENDINGS = {"pos": ["In the end, {N} was happy and went home.", "{N} smiled and went to sleep.",
                   "From that day on, {N} and the {F} were best friends."],
           "neg": ["In the end, {N} was sad and went home.", "{N} cried and went to sleep.",
                   "{N} never saw the {F} again."]}
FILL = {"pa": ["happy", "glad", "proud", "safe"], "pd": ["wonderful", "beautiful", "bright", "warm", "great"],
        "na": ["sad", "scared", "lonely", "tired", "angry"], "nd": ["gloomy", "terrible", "bad", "cold", "dark"]}
THE_END = "The end."


def story(rng, name=None, animal=None, place=None, mood=None, n_middle=None, repeat=False, finished=True,
          opening=True):
    """One story. mood: "pos", "neg" or "mixed"; n_middle: events + mood sentences between opening and ending;
    repeat: one middle sentence said several times; finished: ends with "The end." (else it is cut off mid-sentence);
    opening=False starts in the middle, as a continuation of a given opening does."""
    A, P = animal or rng.choice(ANIMALS), place or rng.choice(PLACES)
    slots = dict(N=name or rng.choice(NAMES), A=A, S=ANIMAL_TRAITS[A][0], D=ANIMAL_TRAITS[A][1], P=P,
                 V=PLACE_SIGHTS[P], O=rng.choice(OBJECTS), F=rng.choice(FRIENDS), C=rng.choice(COLORS),
                 adj=rng.choice(ADJS), **{k: rng.choice(v) for k, v in FILL.items()})
    mood = mood or rng.choice(["pos", "neg", "mixed"])
    n_middle = rng.randint(2, 6) if n_middle is None else n_middle
    # the protagonist is often called by name and animal ("Lily the fox went..."), as a child tells it
    call = lambda s: s.replace("{N}", "{N} the {A}", 1) if "{A}" not in s and rng.random() < 0.5 else s
    sentences = [rng.choice(OPENINGS)] if opening else []
    for i in range(n_middle):
        m = mood if mood != "mixed" else rng.choice(["pos", "neg"])
        sentences.append(call(rng.choice(EVENTS) if i % 2 == 0 else rng.choice(MOOD[m])))
    if repeat and n_middle:  # one of the middle sentences, said several times
        k = rng.randrange(len(sentences) - n_middle, len(sentences))
        sentences[k + 1:k + 1] = [sentences[k]] * rng.randint(2, 4)
    sentences += [call(rng.choice(ENDINGS[mood if mood != "mixed" else rng.choice(["pos", "neg"])])), THE_END]
    text = " ".join(s.format(**slots) for s in sentences)
    if not finished:  # cut off somewhere in the last third
        words = text.split(" ")
        text = " ".join(words[:rng.randint(2 * len(words) // 3, len(words) - 2)])
    return text


TITLES = ["The story of {N} the {A}", "{N} and the {P}", "{N} the {A} at the {P}", "A {A} at the {P}",
          "A story about {N}", "A story about a {A}"]


def collection(rng, p_title=0.3):
    """One corpus document: one to three stories, one after another, each about a character of its own, as books
    of bedtime stories are; some stories have a title that they keep to. Pretraining learns to keep to a story's
    own characters, to begin each story anew (what came before it is no request) and, from the few titles, that
    a heading can say what comes next: SFT builds on that to make a request say what the story is about."""
    stories = []
    for _ in range(rng.choice([1, 2, 3])):
        slots = dict(N=rng.choice(NAMES), A=rng.choice(ANIMALS), P=rng.choice(PLACES))
        text = story(rng, name=slots["N"], animal=slots["A"], place=slots["P"], repeat=rng.random() < 0.1,
                     finished=rng.random() < 0.9)
        stories.append(rng.choice(TITLES).format(**slots) + "\n\n" + text if rng.random() < p_title else text)
    return "\n\n".join(stories)


def pretrain_corpus(n_docs, seed=0):
    """n_docs collections of stories of every mood, length and quality: the self-supervised corpus of stage 1."""
    rng = random.Random(seed)
    return [collection(rng) for _ in range(n_docs)]


# ----------------------------------------------------------------------------- instructions and the Alpaca template

INSTRUCTIONS = ["Write a story about {N}.", "Write a story about a {A}.", "Write a story about {N} the {A}.",
                "Write a story about a {A} at the {P}.", "Tell me a story about {N} at the {P}.",
                "Write a story about {N} the {A} at the {P}."]
CONTINUE = "Continue the story."


def alpaca_prompt(instruction, input=""):
    """Stanford Alpaca's template, with or without the ### Input: section; the response follows it."""
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def split_of(instruction, input=""):
    """A fixed 20% of all possible prompts is held out for evaluation; training never sees them."""
    return "eval" if zlib.crc32(f"{instruction}|{input}".encode()) % 5 == 0 else "train"


def random_task(rng):
    """(instruction, input): a request for a character, animal and/or place, or a story opening to continue."""
    slots = dict(N=rng.choice(NAMES), A=rng.choice(ANIMALS), P=rng.choice(PLACES), adj=rng.choice(ADJS))
    if rng.random() < 0.2:
        return CONTINUE, rng.choice(OPENINGS).format(**slots)
    return rng.choice(INSTRUCTIONS).format(**slots), ""


def tasks(split, n, seed=0):
    """n distinct (instruction, input) pairs from one split ("train" or "eval")."""
    rng, seen = random.Random(seed), {}
    for _ in range(100 * n + 100000):  # enough draws to find every prompt the grammar has
        if len(seen) == n:
            return list(seen)
        task = random_task(rng)
        if split_of(*task) == split:
            seen[task] = None
    raise ValueError(f"asked for {n} distinct {split!r} prompts; the world has about {len(seen)}")


def _section(prompt, name):
    """The text of one ### section of an Alpaca prompt ("" if it has none)."""
    head = f"### {name}:"
    return prompt.split(head)[-1].split("###")[0] if head in prompt else ""


def requested(prompt):
    """What a prompt asks for: the names, animals and places in its instruction; a continuation asks to keep the
    protagonist its input names."""
    asked = set(re.findall(r"[A-Za-z]+", _section(prompt, "Instruction")))
    given = set(re.findall(r"[A-Za-z]+", _section(prompt, "Input")))
    return [w for w in NAMES + ANIMALS + PLACES if w in asked] + [w for w in NAMES if w in given]


def demonstration(rng, instruction, input=""):
    """A crowd worker's response: on topic 80% of the time (otherwise about a random character, animal and place),
    of any mood, sometimes repetitive or unfinished. The demonstrations are deliberately mediocre, so the later
    stages have something to improve."""
    want = set(re.findall(r"[A-Za-z]+", instruction + " " + input))
    follow = rng.random() < 0.8
    pick = lambda pool: next((w for w in pool if w in want), None) if follow else None
    return story(rng, name=pick(NAMES), animal=pick(ANIMALS), place=pick(PLACES), opening=not input,
                 repeat=rng.random() < 0.2, finished=rng.random() < 0.85)


def sft_examples(n, seed=0, split="train"):
    """n records {"instruction", "input", "output"} on distinct prompts of one split."""
    rng = random.Random(seed + 1)
    return [{"instruction": i, "input": x, "output": demonstration(rng, i, x)} for i, x in tasks(split, n, seed)]


# ----------------------------------------------------------------------------- the gold human

def _slot_pattern(template):
    """A regex matching every sentence a template can write: each slot becomes the alternation of its words."""
    words = dict(N=NAMES, A=ANIMALS, S=[s for s, _ in ANIMAL_TRAITS.values()], D=[d for _, d in ANIMAL_TRAITS.values()],
                 P=PLACES, V=list(PLACE_SIGHTS.values()), F=FRIENDS, O=OBJECTS, C=COLORS, adj=ADJS, **FILL)
    alt = {k: f"(?:{'|'.join(v)})" for k, v in words.items()}
    alt["N"] = f"{alt['N']}(?: the {alt['A']})?"  # a name, or a name and its animal: "Lily the fox"
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    return "".join(re.escape(p) if i % 2 == 0 else alt[p] for i, p in enumerate(parts))


# the kind of every sentence the world writes; an opening belongs first, an ending right before "The end."
SENTENCE_KINDS = [(kind, re.compile(_slot_pattern(t))) for kind, templates in
                  [("opening", OPENINGS), ("middle", EVENTS + MOOD["pos"] + MOOD["neg"]),
                   ("ending", ENDINGS["pos"] + ENDINGS["neg"]), ("end", [THE_END])] for t in templates]


def sentences(text):
    """The sentences of a text, each up to and including its full stop (a cut-off last one has none)."""
    return [s.strip() for s in re.findall(r"[^.]+(?:\.|$)", text) if s.strip()]


def sentence_kind(sentence):
    """opening, middle, ending or end: the kind of world sentence this is; None if the world never writes it."""
    return next((kind for kind, pattern in SENTENCE_KINDS if pattern.fullmatch(sentence)), None)


def ill_formed(text):
    """(words in sentences that are not world sentences in their place, all words). Out of place: an opening
    anywhere but first, an ending not followed by "The end.", "The end." anywhere but last."""
    sents = sentences(text)
    kinds = [sentence_kind(s) for s in sents]
    last = len(kinds) - 1
    in_place = [k is not None and (k != "opening" or i == 0) and (k != "end" or i == last)
                and (k != "ending" or i == last or kinds[i + 1] == "end") for i, k in enumerate(kinds)]
    n_words = [len(re.findall(r"[a-z]+", s.lower())) for s in sents]
    return sum(n for n, ok in zip(n_words, in_place) if not ok), sum(n_words)


def gold_terms(prompt, response):
    """The gold human's judgement of a response, term by term (gold_reward is their sum, about -10 to +3.5):
      follow    4 * (fraction of the requested name/animal/place the story is about) - 2    in [-2, 2]
                (about: mentioned, and no other name/animal/place of the same kind is)
      mood      tanh((distinct happy words - distinct sad words) / 2)                      in (-1, 1)
      finished  +0.5 if the text ends with "The end.", else -0.5
      repeat    -3 * (fraction of word trigrams that repeat an earlier one)               in [-3, 0]
      length    -(20 - n)/20 below 20 words, -(n - 70)/30 above 70, else 0                n = word count
      grammar   -3 * (fraction of words in sentences that are not world sentences in place) in [-3, 0]
    Distinct words, not counts, set the mood: saying "happy" ten times is not ten times happier. The grammar term
    is what makes this a judge of stories: a bag of the judge's favourite words is no sentence it knows, and a good
    story's sentences shuffled put its opening and ending out of place."""
    words = re.findall(r"[a-z]+", response.lower())
    n = len(words)
    about, asked = requests_met(prompt, response)
    trigrams = list(zip(words, words[1:], words[2:]))
    bad, n_words = ill_formed(response)
    return dict(
        follow=4 * about / asked - 2 if asked else 0.0,
        mood=math.tanh((len(POSITIVE & set(words)) - len(NEGATIVE & set(words))) / 2),
        finished=0.5 if response.rstrip().endswith(THE_END) else -0.5,
        repeat=-3 * (1 - len(set(trigrams)) / len(trigrams)) if trigrams else 0.0,
        length=-max(0, 20 - n) / 20 - max(0, n - 70) / 30,
        grammar=-3 * bad / n_words if n_words else 0.0)


def requests_met(prompt, response):
    """(how many of the requested names, animals and places the story is about, how many were requested). About:
    mentioned, and no other word of its kind is (a story that names every animal is about none of them)."""
    said = set(re.findall(r"[A-Za-z]+", response))
    want = requested(prompt)
    kind = {w: k for k in (NAMES, ANIMALS, PLACES) for w in k}
    return sum(w in said and not (said & set(kind[w])) - {w} for w in want), len(want)


def follows(prompt, response):
    """Does the response do everything its prompt asks: is it about every requested name, animal and place?"""
    about, asked = requests_met(prompt, response)
    return about == asked


def gold_reward(prompt, response):
    """The gold human's score: the sum of gold_terms. Deterministic; defined for any text."""
    return sum(gold_terms(prompt, response).values())


# ----------------------------------------------------------------------------- the tokenizer

# pre-tokenizer: words with their leading space, digits, punctuation runs, white space (GPT-2's split, in ASCII
# classes so Python's re and tiktoken split alike; other characters fall to the punctuation class as bytes)
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
EOT, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
VOCAB_SIZE = 1024  # at most 256 bytes + merges + 3 specials; on our corpus BPE runs out of pairs at 744
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "tokenizer")


def train_bpe(texts, n_merges, pattern=PATTERN):
    """Byte-level BPE (Sennrich et al. 2016): start from the 256 bytes, repeatedly merge the most frequent
    adjacent pair inside pre-tokenized words. Returns tiktoken's mergeable ranks {bytes: rank}."""
    word_counts = Counter()
    for t in texts:  # pre-tokenize with the same regex tiktoken will use
        for piece in re.findall(pattern, t):
            word_counts[piece.encode()] += 1
    words = {w: [bytes([b]) for b in w] for w in word_counts}
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the bytes, so training is deterministic
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return ranks


def bpe_training_texts():
    """What the tokenizer is trained on: stories and prompts in the template, so both become few tokens."""
    rng = random.Random(1234)
    texts = pretrain_corpus(3000, seed=1234)
    texts += [alpaca_prompt(*random_task(rng)) for _ in range(300)]
    return texts


@functools.lru_cache(maxsize=None)
def fingerprint():
    """A short id of this world, saved with every stage: the tokenizer's vocabulary (trained on the corpus), and a
    few demonstrations and the gold human's scores of them under their own and other prompts. A change to the
    corpus, the instructions, the tokenizer or the gold human changes it, so no stage built before is reused."""
    enc, demos = tokenizer(), sft_examples(16, seed=0)
    prompts = [alpaca_prompt(d["instruction"], d["input"]) for d in demos]
    world = [enc.n_vocab, enc.encode(" ".join(prompts)), demos,
             [round(gold_reward(p, d["output"]), 6) for p in prompts[:4] for d in demos]]
    return f"{zlib.crc32(json.dumps(world).encode()):08x}"


@functools.lru_cache(maxsize=None)
def tokenizer(cache_dir=TOKENIZER_DIR):
    """The lab's tiktoken.Encoding: BPE ranks trained once on the corpus (a second or two), then read from a file
    named by a checksum of the training text, so a change to the world never meets a stale vocabulary."""
    texts = bpe_training_texts()
    path = os.path.join(cache_dir, f"lab-{zlib.crc32(''.join(texts).encode()):08x}.bpe")
    if os.path.exists(path):
        with open(path) as f:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    else:  # under torchrun every process trains the same ranks, and rank 0 alone writes them
        ranks = train_bpe(texts, VOCAB_SIZE - 256 - 3)
        if process_rank() == 0:
            with atomic_write(path) as f:  # tiktoken's own file format: base64 token, rank
                f.writelines(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks.items())
    n = len(ranks)
    return tiktoken.Encoding("lab", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: n, PAD: n + 1, MASK: n + 2})


def encode(text):
    """Token ids of text; special-token strings inside text are encoded as plain text, never as specials."""
    return tokenizer().encode(text, disallowed_special=())


def decode(ids):
    return tokenizer().decode([int(i) for i in ids])


def special(name):
    """The id of EOT, PAD or MASK."""
    return tokenizer()._special_tokens[name]


# ----------------------------------------------------------------------------- batches

def lm_batch(stream, block_size, batch_size, rng):
    """Causal-LM batch of random windows of a 1-d token stream (the EOT-joined documents).
    x (B, T) and y (B, T) = x shifted left by one."""
    ix = torch.randint(len(stream) - block_size, (batch_size,), generator=rng)
    x = torch.stack([stream[i:i + block_size] for i in ix])  # (B, T)
    y = torch.stack([stream[i + 1:i + 1 + block_size] for i in ix])  # (B, T)
    return x, y


def mlm_mask(x, mask_id, n_normal, rng, p=0.15):
    """BERT's masking: choose 15% of positions; of those 80% -> [MASK], 10% -> a random token, 10% unchanged.
    Returns (inputs (B, T), targets (B, T)) with targets = -1 where nothing is to be predicted."""
    chosen = torch.rand(x.shape, generator=rng) < p  # (B, T)
    u = torch.rand(x.shape, generator=rng)
    inputs = x.clone()
    inputs[chosen & (u < 0.8)] = mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = torch.randint(n_normal, x.shape, generator=rng)[swap]
    targets = torch.where(chosen, x, torch.full_like(x, -1))
    return inputs, targets


def example_tensors(prompt, response, block_size):
    """One training example from token lists: ids = prompt + response, labels -1 on the prompt so a loss covers
    the response only, cut to block_size. Returns (ids, labels) 1-d tensors; labels[t] is the token after ids[t]."""
    ids, labels = (prompt + response)[:block_size + 1], ([-1] * len(prompt) + response)[:block_size + 1]
    return torch.tensor(ids[:-1]), torch.tensor(labels[1:])


def sft_tensors(examples, block_size):
    """Tokenize {"instruction","input","output"} records as prompt + output + EOT (example_tensors)."""
    eot = special(EOT)
    return [example_tensors(encode(alpaca_prompt(ex["instruction"], ex.get("input", ""))),
                            encode(ex["output"]) + [eot], block_size) for ex in examples]


def pad_right(seqs, value):
    """Stack 1-d tensors of different lengths into (B, T_max), right-padded with value."""
    T = max(len(s) for s in seqs)
    return torch.stack([torch.cat([s, s.new_full((T - len(s),), value)]) for s in seqs])


def pad_left(seqs, value):
    """Stack 1-d tensors into (B, T_max), left-padded with value; also the (B, T_max) mask of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.stack([torch.cat([s.new_full((T - len(s),), value), s]) for s in seqs])
    mask = torch.stack([torch.arange(T) >= T - len(s) for s in seqs])
    return ids, mask


# ----------------------------------------------------------------------------- the user's own files

def load_sft_jsonl(path):
    """A user's demonstrations: {"instruction", "output"} and optionally "input"."""
    return [{"input": "", **r} for r in load_jsonl(path, ("instruction", "output"))]


def load_corpus(path):
    """A plain UTF-8 text file for pretraining; documents are separated by blank lines."""
    docs = [d.strip() for d in re.split(r"\n\s*\n", read_text(path)) if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no text")
    return docs
