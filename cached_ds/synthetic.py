"""A generated long-document summarisation task whose answer needs the whole document.

    python -c "from cached_ds.synthetic import make_documents; print(make_documents(1, seed=0)[0]['summary'])"

Every document is a few thousand words of filler sentences with one *fact* per attribute planted in
it ("the color is red ."); the summary states the facts tersely in a fixed attribute order ("color
red . city oslo . ..."): ROUGE ignores punctuation, so every summary bigram depends on a fact and
template words earn a model that never saw the facts nothing. Facts are placed so that at least ``facts_after`` of them start
after the first ``window`` words, hence after the first ``window`` tokens too (the tokenizer below
turns every word into at least one token and adds nothing in front): a model that reads only the
first encoder window cannot know them, a model that reads the whole document can.

Used with a sentencepiece tokenizer trained on the same corpus (``train_tokenizer``) and a tiny
random BART (``tiny_bart_config``), so the whole task runs on CPU with nothing downloaded:

    docs = make_documents(512, seed=0, window=256)
    tok = train_tokenizer([d["document"] for d in docs] + [d["summary"] for d in docs], "/tmp/tok")
    model = transformers.BartForConditionalGeneration(tiny_bart_config(tok, window=256))
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Iterable

import transformers as hf

# One fact per attribute in every document. Values come from the attribute's own vocabulary, and
# neither attribute names nor values ever occur in filler: a value token identifies its fact, and
# the first window tells nothing about facts that lie after it.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "brown", "black", "white", "pink", "gray", "violet"),
    "city": ("oslo", "paris", "lima", "cairo", "tokyo", "delhi", "rome", "dublin", "quito", "seoul", "athens", "vienna"),
    "animal": ("cat", "dog", "horse", "tiger", "zebra", "camel", "otter", "eagle", "shark", "moose", "llama", "panda"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "kiwi", "lime"),
    "month": ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
              "november", "december"),
}

# Filler: a small grammar over words disjoint from ATTRIBUTES (checked at import below).
_DET = ("the", "a", "this", "that", "every", "some")
_ADJ = ("old", "new", "small", "large", "quiet", "busy", "early", "late", "simple", "strange", "happy", "tired",
        "clever", "gentle", "rough", "bright", "dark", "warm", "cold", "short")
_NOUN = ("man", "woman", "child", "farmer", "teacher", "doctor", "sailor", "baker", "market", "river", "bridge",
         "garden", "letter", "window", "table", "road", "house", "story", "song", "boat", "field", "train", "book",
         "school", "village", "forest", "stone", "door", "friend", "neighbour")
_VERB = ("saw", "found", "visited", "painted", "carried", "watched", "opened", "closed", "built", "moved", "cleaned",
         "followed", "passed", "remembered", "described", "wanted", "fixed", "sold", "bought", "shared")
_PREP = ("near", "behind", "beside", "under", "over", "past", "along", "inside", "beyond", "across")
_ADV = ("slowly", "quickly", "often", "rarely", "again", "today", "yesterday", "quietly", "carefully", "later")

FACT_WORDS = 5  # "the <attribute> is <value> ."


def _filler_sentence(rng: random.Random) -> list[str]:
    words = [rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB), rng.choice(_DET),
             rng.choice(_NOUN)]
    if rng.random() < 0.5:
        words += [rng.choice(_PREP), rng.choice(_DET), rng.choice(_NOUN)]
    if rng.random() < 0.3:
        words.append(rng.choice(_ADV))
    return words + ["."]


def fact_sentence(attribute: str, value: str) -> list[str]:
    return ["the", attribute, "is", value, "."]


def make_documents(
    n: int,
    seed: int,
    doc_words: int = 2048,
    window: int = 256,
    facts_after: int | None = None,
    mentions: int = 1,
    attributes: Iterable[str] | None = None,
) -> list[dict]:
    """``n`` records ``{"document", "summary", "facts", "fact_word_positions"}``, deterministic in ``seed``.

    doc_words: words per document (the last sentence may overshoot by a few words).
    window: first-window size in tokens (the model's encoder window). At least ``facts_after``
        facts are stated only at word index >= ``window``, i.e. at token index >= ``window`` for
        any tokenizer that gives every word at least one token and prepends nothing
        (``train_tokenizer``'s does).
    facts_after: facts after the first window; default all but one (that one lies in the first
        window, so the truncated baseline can learn it and the comparison is not all-or-nothing).
    mentions: times each fact is stated (same attribute, same value, at different places; all
        inside the first window for an early fact, all after it for a late one).
    attributes: which ATTRIBUTES to plant (default all): one fact each.
    """
    names = list(attributes) if attributes is not None else list(ATTRIBUTES)
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"attributes must be distinct names from {list(ATTRIBUTES)}, got {names}")
    facts_after = len(names) - 1 if facts_after is None else facts_after
    if not 0 <= facts_after <= len(names):
        raise ValueError(f"facts_after={facts_after} must lie in [0, {len(names)}]")
    if mentions < 1:
        raise ValueError(f"mentions={mentions} must be >= 1")
    early = len(names) - facts_after
    early_words = early * mentions * FACT_WORDS
    if early_words > window:
        raise ValueError(f"{early} facts stated {mentions} times do not fit in a first window of {window} words")
    if doc_words < window + 2 * facts_after * mentions * FACT_WORDS:
        raise ValueError(f"doc_words={doc_words} leaves too little room after the first window of {window}")

    rng = random.Random(seed)
    records = []
    for _ in range(n):
        values = {a: rng.choice(ATTRIBUTES[a]) for a in names}
        budget = doc_words - FACT_WORDS * mentions * len(names)
        filler: list[list[str]] = []
        length = 0
        while length < budget:
            filler.append(_filler_sentence(rng))
            length += len(filler[-1])
        # Word offset of each sentence boundary of the filler (a fact goes in front of sentence i).
        offsets = [0]
        for sentence in filler:
            offsets.append(offsets[-1] + len(sentence))
        # Early statements must all end inside the first window, even if stacked at one slot.
        early_slots = [i for i, o in enumerate(offsets) if o + early_words <= window]
        # Late statements: the filler before the slot already fills the first window, and
        # inserting statements only moves later text further right, so they stay after it.
        late_slots = [i for i, o in enumerate(offsets) if o >= window]
        order = names[:]
        rng.shuffle(order)  # which attributes are early, and where facts appear: random
        inserts: dict[int, list[str]] = {}
        for k, attribute in enumerate(order):
            pool = early_slots if k < early else late_slots
            for slot in rng.sample(pool, mentions) if len(pool) >= mentions else rng.choices(pool, k=mentions):
                inserts.setdefault(slot, []).append(attribute)

        words: list[str] = []
        positions: dict[str, list[int]] = {a: [] for a in names}
        for i in range(len(filler) + 1):
            for attribute in inserts.get(i, []):
                positions[attribute].append(len(words))
                words += fact_sentence(attribute, values[attribute])
            if i < len(filler):
                words += filler[i]
        # Fixed attribute order: the summary never depends on where (or in which window) facts lie.
        summary = " ".join(f"{a} {values[a]} ." for a in names)
        records.append({
            "document": " ".join(words),
            "summary": summary,
            "facts": {a: values[a] for a in names},
            "fact_word_positions": positions,  # word index of each statement's first word
        })
    return records


# Special ids (T5's layout, which hf.T5Tokenizer hard-codes: unk is id 2), plus <s> as the
# decoder's start token. tiny_bart_config wires the same ids into the model.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3


def _chunks(texts: Iterable[str], words: int = 64):
    # sentencepiece skips "sentences" longer than max_sentence_length bytes: feed short chunks.
    for text in texts:
        split = text.split()
        for i in range(0, len(split), words):
            yield " ".join(split[i:i + words])


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512) -> hf.PreTrainedTokenizerBase:
    """Train a sentencepiece unigram model on ``texts``; save and return it as a HF tokenizer.

    The result is a ``transformers.T5Tokenizer`` (backed by ``tokenizers``, as every T5Tokenizer is
    in transformers 5) built from the trained pieces and scores, so ``AutoTokenizer.from_pretrained
    (out_dir)`` loads it back; the sentencepiece model is kept beside it as ``spiece.model``. It
    appends ``</s>`` to every encoded text and prepends nothing. ``vocab_size`` is an upper bound
    (``hard_vocab_limit=False``): use ``len(tokenizer)`` for the model.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spiece")
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="unigram",
            # identity normalisation: the HF side then needs no precompiled charsmap, and
            # decode(encode(text)) == text for single-spaced text
            normalization_rule_name="identity",
            character_coverage=1.0,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            num_threads=1,  # deterministic
            minloglevel=2,
        )
        processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
        vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
        tokenizer = hf.T5Tokenizer(
            vocab=vocab,
            extra_ids=0,  # no T5 sentinels: their ids would sit beyond the trained pieces
            bos_token="<s>",
            clean_up_tokenization_spaces=False,  # would turn " ." into "." and break round trips
            model_max_length=1_000_000_000,  # documents are meant to be long: no truncation warnings
        )
        tokenizer.save_pretrained(out_dir)
        shutil.copy(prefix + ".model", os.path.join(out_dir, "spiece.model"))
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id)
    if ids != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
        raise RuntimeError(f"special ids (pad, eos, unk, bos) came out as {ids}, expected {(PAD_ID, EOS_ID, UNK_ID, BOS_ID)}")
    return tokenizer


def tiny_bart_config(
    tokenizer: hf.PreTrainedTokenizerBase,
    window: int = 256,
    d_model: int = 64,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    heads: int = 4,
    ffn_dim: int = 128,
    dropout: float = 0.0,
    init_std: float | None = None,
) -> hf.BartConfig:
    """A small random BART whose encoder window is ``window`` positions, ids wired to ``tokenizer``.

    The defaults learn ``make_documents``' task from scratch in a few hundred steps on CPU. One
    encoder layer: the encoder runs twice per CachED step over every token (no-grad pass, then the
    recompute), so it is most of the step time, and the task needs no more than a value token's own
    embedding on the encoder side; the decoder needs two layers (find the attribute, then copy).
    """
    return hf.BartConfig(
        vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_position_embeddings=window,  # CachED restarts positions in every window
        scale_embedding=True,
        dropout=dropout,
        # BART's init_std=0.02 suits d_model=1024 (~1/sqrt(d)); at d_model=64 it starts the
        # query-key products ~40x too small and cross-attention takes thousands of steps to learn to
        # find a fact among thousands of encoder states. 1/sqrt(d_model) learns it in hundreds.
        init_std=init_std if init_std is not None else d_model**-0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,  # summaries are decoded from <s>
        forced_eos_token_id=tokenizer.eos_token_id,  # BART's default (2) would be <unk> here
    )


_overlap = {w for v in ATTRIBUTES.values() for w in v} | set(ATTRIBUTES)
_overlap &= set(_DET + _ADJ + _NOUN + _VERB + _PREP + _ADV)
assert not _overlap, f"filler words {_overlap} also name facts"
