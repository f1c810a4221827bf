"""Long texts tokenized in pieces give the ids one whole-text tokenizer call gives, for the
tokenizer kinds this toolkit meets: SentencePiece (T5, PEGASUS, mBART), byte-level BPE (BART),
and a post-processor that appends a language code (mBART)."""

import numpy as np
import pytest
import transformers as hf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cached_ds import synthetic
from cached_ds.long_text import split_between_words, token_ids, token_ids_of_each

ODD = ("Müller naïve café, 1234 5678. End.\nNew line  double  spaces\tand a tab; \"quotes\" (parens) "
       "1,000,000 x-y e.g. U.S. 漢字かな漢字混じりの文章はスペースがありません ")


def corpus_text() -> str:
    documents = synthetic.make_documents(4, seed=3)
    return " ".join(d["document"] for d in documents)


def sentencepiece(tmp_path):
    return synthetic.train_tokenizer([corpus_text(), ODD], str(tmp_path / "spiece"), vocab_size=300)


def byte_level_bpe(template: str = "<s> $A </s>"):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "xx_XX"]
    tokenizer.train_from_iterator([corpus_text(), ODD], trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("<s>", "</s>", "xx_XX")])
    return hf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level-bpe", "language-code-suffix"])
def tokenizer(request, tmp_path_factory):
    if request.param == "sentencepiece":
        return sentencepiece(tmp_path_factory.mktemp("tok"))
    return byte_level_bpe("<s> $A </s>" if request.param == "byte-level-bpe" else "$A </s> xx_XX")


def test_pieces_give_the_whole_texts_ids(tokenizer):
    text = (corpus_text() + " " + ODD) * 3
    want = tokenizer(text)["input_ids"]
    got = token_ids(tokenizer, text, piece_chars=40)
    assert len(list(split_between_words(text, 40))) > 50  # really cut into pieces
    assert got.dtype == np.int32 and got.tolist() == want


@pytest.mark.parametrize("max_length", [1, 2, 5, 37, 10**6])
@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_the_special_tokens_as_hf_does(tokenizer, max_length, side):
    """Either side, and a max_length the special tokens alone fill (HF then keeps the text whole)."""
    text = corpus_text()
    tokenizer.truncation_side = side
    try:
        want = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        assert token_ids(tokenizer, text, max_length, piece_chars=40).tolist() == want
    finally:
        tokenizer.truncation_side = "right"


def test_a_text_without_spaces_is_not_cut():
    text = "漢字" * 500
    assert list(split_between_words(text, 40)) == [text]
    text = "a " + "漢字" * 500 + " b c"
    assert "".join(split_between_words(text, 40)) == text


def test_a_batch_mixes_whole_and_pieced_texts(tmp_path):
    tokenizer = sentencepiece(tmp_path)
    texts = ["short one", corpus_text() * 40, ""]  # the long one is past 2 pieces of the default size
    got = token_ids_of_each(tokenizer, texts)
    assert [ids.tolist() for ids in got] == tokenizer(texts)["input_ids"]


@pytest.mark.parametrize("max_length", [5, 64])
def test_short_and_long_texts_of_a_batch_are_truncated_as_hf_truncates(tokenizer, max_length):
    """--max_source_tokens reaches every document: those tokenized in one batched call (short)
    and those tokenized in pieces (long) alike; the batched call without truncation passed every
    test before (mutation testing), so the flag would have cut no document under ~512K characters."""
    texts = ["short one with a few more words than five tokens", corpus_text() * 40, corpus_text()]
    got = token_ids_of_each(tokenizer, texts, max_length)
    assert [ids.tolist() for ids in got] == tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("template", ["$A", "<s> $A"], ids=["no-special-tokens", "prefix-only"])
def test_tokenizers_that_add_nothing_after_the_text(template):
    """A tokenizer without a post-processor (check_ends_with_eos warns of those, it does not
    refuse them), or one adding only a prefix: pieced ids still equal the whole text's."""
    tokenizer = byte_level_bpe(template)
    text = (corpus_text() + " " + ODD) * 3
    assert token_ids(tokenizer, text, piece_chars=40).tolist() == tokenizer(text)["input_ids"]
    assert token_ids(tokenizer, text, 37, piece_chars=40).tolist() == tokenizer(text, truncation=True, max_length=37)["input_ids"]


def test_runs_of_spaces_are_never_cut_inside(tokenizer):
    """Only a single space between two non-space characters is a cut: a text whose spaces all come
    in pairs, or before a newline or tab, is tokenized as it is whole."""
    words = corpus_text().split()[:400]
    for separator in ("  ", " \n", " \t"):
        text = separator.join(words)
        assert token_ids(tokenizer, text, piece_chars=40).tolist() == tokenizer(text)["input_ids"], repr(separator)
