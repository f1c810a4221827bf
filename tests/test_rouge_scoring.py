"""ROUGE as the launcher scores it: rouge-score's own numbers on English, real ones elsewhere.

rouge-score's default tokenizer deletes everything outside [a-z0-9], so identical Chinese,
Russian or Arabic texts scored 0 and "Müller"/"Möller" matched (mBART is a supported family)."""

import random
import string

import pytest
from rouge_score import rouge_scorer, tokenizers

from cached_ds.evaluation import ROUGE_TYPES, UnicodeTokenizer, rouge, sentences_per_line


def english_texts(seed: int, count: int = 40) -> list[str]:
    """Sentences with capitals, digits, punctuation, hyphens, underscores and long/short words."""
    rng = random.Random(seed)
    words = ["The", "running", "runs", "ran", "generalization", "cats", "CAT", "it's", "U.S.", "3.14", "x_y",
             "state-of-the-art", "summaries", "summarised", "happily", "a", "an", "(model)", "don't", "1,024", "#hash"]
    texts = []
    for _ in range(count):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(".!?")
                     for _ in range(rng.randint(1, 4))]
        texts.append(" ".join(sentences) + rng.choice(["", " ", "\n"]) + rng.choice(["", string.punctuation[:5]]))
    return texts


def test_english_tokens_and_scores_are_rouge_scores_own():
    ours, default = UnicodeTokenizer(), tokenizers.DefaultTokenizer(use_stemmer=True)
    predictions, references = english_texts(0), english_texts(1)
    for text in predictions + references:
        assert ours.tokenize(text) == default.tokenize(text), text
    reference_scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)  # the library as it ships
    expected = {kind: 0.0 for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        scores = reference_scorer.score(sentences_per_line(reference), sentences_per_line(prediction))
        for kind in ROUGE_TYPES:
            expected[kind] += 100.0 * scores[kind].fmeasure / len(predictions)
    assert rouge(predictions, references) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected["rouge2"] < expected["rouge1"] < 100  # the texts overlap in part: not a trivial case


@pytest.mark.parametrize("text", ["Microsoft™ released Windows 11 today.", "It covers 5 km² of land.", "Revenue rose by ½ percent.",
                                  "Step ① © 2024 ACME®, 30°C ± 2 — costs €5 → “done”."])
def test_symbols_separate_words_as_in_rouge_score(text):
    """NFKC turned "™" into "tm" glued to the word before it (and "²" into "2", "½" into "1⁄2"),
    where rouge-score's tokenizer drops them: 80/75 instead of 100/100 on English text."""
    assert UnicodeTokenizer().tokenize(text) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


@pytest.mark.parametrize("text", ["北京是中国的首都。上海是最大的城市。", "東京は日本の首都です。", "Москва — столица России.",
                                  "القاهرة هي عاصمة مصر.", "Ελληνικά κείμενα εδώ.", "हिन्दी भारत की भाषा है।"])
def test_identical_texts_of_any_script_score_100(text):
    assert rouge([text], [text]) == {kind: 100.0 for kind in ROUGE_TYPES}
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(text, text)["rouge1"].fmeasure
    assert default == 0.0  # what rouge-score's default tokenizer gave: every character deleted


def test_non_english_overlap_is_partial_and_accents_count():
    # Chinese: one character of four differs -> 3 of 4 unigrams, 1 of 3 bigrams (北京)
    scores = rouge(["北京大学"], ["北京中学"])
    assert scores["rouge1"] == pytest.approx(75.0) and scores["rouge2"] == pytest.approx(100 / 3)
    assert rouge(["Herr Müller zahlt."], ["Herr Möller zahlt."])["rouge1"] == pytest.approx(100 * 2 / 3)
    assert rouge(["Привет мир"], ["Пока мир"])["rouge1"] == pytest.approx(50.0)
    assert UnicodeTokenizer().tokenize("ＡＢＣ 北京abc Straße") == ["abc", "北", "京", "abc", "straße"]
    # combining marks stay in their word (Devanagari and Arabic vowel signs); punctuation is no token
    assert UnicodeTokenizer().tokenize("हिन्दी भाषा العَرَبِيَّة 東京・大阪") == ["हिन्दी", "भाषा", "العَرَبِيَّة", "東", "京", "大", "阪"]
    assert rouge(["हिन्दी भाषा"], ["मराठी लिपि"])["rouge1"] == 0.0  # no word in common (split at the marks, 20)


def test_chinese_sentences_split_without_spaces_for_rouge_lsum():
    assert sentences_per_line("第一句。第二句！第三句？ Fourth one. 3.14 stays") == "第一句。\n第二句！\n第三句？\nFourth one.\n3.14 stays"


def test_three_letter_words_are_stemmed_exactly_as_rouge_score_stems_them():
    """rouge-score stems only tokens longer than 3 characters; Porter would turn 'was', 'has',
    'its', 'bus', 'gas' into 'wa', 'ha', 'it', 'bu', 'ga' (stemming them passed every test before:
    mutation testing)."""
    text = ("He was there; she has its bus and gas. The cats was running, dogs has gone: ties, lies, "
            "cries. Its was his. Flies, pies.")
    assert UnicodeTokenizer().tokenize(text) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)
    reference, prediction = "the bus was late and it has gas", "a bu wa late it ha ga"
    theirs = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].fmeasure * 100
    assert rouge([prediction], [reference])["rouge1"] == pytest.approx(theirs)
