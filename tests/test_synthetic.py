"""The generated long-document task (cached_ds.synthetic): its guarantees, tokenizer and model config."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from cached_ds import CachedConfig, CachedSeq2Seq
from cached_ds.synthetic import (
    ATTRIBUTES,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    make_documents,
    tiny_bart_config,
    train_tokenizer,
)

WINDOW = 256


@pytest.fixture(scope="module")
def docs():
    return make_documents(24, seed=3, window=WINDOW)


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([d["document"] for d in docs] + [d["summary"] for d in docs], str(out)), out


def statement_starts(ids: list[int], pattern: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(pattern) + 1) if ids[i:i + len(pattern)] == pattern]


def test_deterministic_under_seed():
    a = make_documents(3, seed=7, doc_words=600, window=128, mentions=2)
    assert a == make_documents(3, seed=7, doc_words=600, window=128, mentions=2)
    assert a != make_documents(3, seed=8, doc_words=600, window=128, mentions=2)


def test_summary_states_exactly_the_planted_facts(docs):
    vocabularies = {a: set(values) for a, values in ATTRIBUTES.items()}
    for d in docs:
        sentences = [s.split() for s in d["summary"].split(" .") if s.strip()]
        assert all(len(s) == 2 for s in sentences)  # "color red ." : attribute, value
        stated = {s[0]: s[1] for s in sentences}
        assert list(stated) == list(ATTRIBUTES)  # fixed attribute order, whatever the document order
        assert stated == d["facts"]
        words = d["document"].split()
        for attribute, value in d["facts"].items():
            # the document names this attribute's value and no other value of it
            assert set(words) & vocabularies[attribute] == {value}
            for start in d["fact_word_positions"][attribute]:
                assert words[start:start + 5] == ["the", attribute, "is", value, "."]


@pytest.mark.parametrize("window,mentions", [(WINDOW, 4), (128, 1), (512, 2)])
def test_facts_after_first_window_in_tokens(tokenizer, window, mentions):
    tok, _ = tokenizer
    docs = make_documents(12, seed=11, doc_words=2048, window=window, mentions=mentions)
    for d in docs:
        ids = tok(d["document"]).input_ids
        assert len(ids) >= 2048 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        after = 0
        for attribute, value in d["facts"].items():
            pattern = tok(f"the {attribute} is {value} .", add_special_tokens=False).input_ids
            starts = statement_starts(ids, pattern)
            assert len(starts) == mentions
            after += min(starts) >= window
        assert len(d["facts"]) >= 4 and after >= 3
        assert after >= len(d["facts"]) - 1  # the default: all facts but one lie after the first window


def test_more_facts_after_window_on_request():
    for d in make_documents(4, seed=0, doc_words=1024, window=128, facts_after=len(ATTRIBUTES)):
        assert all(min(p) >= 128 for p in d["fact_word_positions"].values())


def test_tokenizer_round_trips(tokenizer, docs, tmp_path):
    tok, out = tokenizer
    loaded = hf.AutoTokenizer.from_pretrained(out)
    assert type(loaded) is type(tok) and len(loaded) == len(tok)
    loaded.save_pretrained(tmp_path)
    again = hf.AutoTokenizer.from_pretrained(tmp_path)
    for text in [docs[0]["document"], docs[1]["summary"], "the color is red . a new road"]:
        ids = tok(text).input_ids
        assert loaded(text).input_ids == ids == again(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert loaded.decode(ids, skip_special_tokens=True) == text
    # the HF tokenizer splits exactly as the trained sentencepiece model (kept as spiece.model)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    assert sp.encode(docs[2]["document"]) == tok(docs[2]["document"], add_special_tokens=False).input_ids


def test_special_ids_match_config(tokenizer):
    tok, _ = tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, UNK_ID, BOS_ID)
    config = tiny_bart_config(tok, window=WINDOW)
    assert config.vocab_size == len(tok)
    assert config.max_position_embeddings == WINDOW and config.scale_embedding
    assert config.pad_token_id == tok.pad_token_id
    assert config.eos_token_id == config.forced_eos_token_id == tok.eos_token_id
    assert config.bos_token_id == config.decoder_start_token_id == tok.bos_token_id


def test_tiny_bart_trains_and_generates_on_a_document(tokenizer, docs):
    tok, _ = tokenizer
    torch.manual_seed(0)
    model = hf.BartForConditionalGeneration(tiny_bart_config(tok, window=WINDOW))
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=4))
    batch = tok([d["document"] for d in docs[:2]], return_tensors="pt", padding=True)
    labels = tok([d["summary"] for d in docs[:2]], return_tensors="pt", padding=True).input_ids
    labels[labels == tok.pad_token_id] = -100
    loss = wrapped(batch.input_ids, batch.attention_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.shared.weight.grad.abs().sum() > 0
    out = wrapped.generate(batch.input_ids, batch.attention_mask, max_new_tokens=8, num_beams=1, do_sample=False)
    assert out.shape[0] == 2 and (out[:, 0] == tok.bos_token_id).all()
