"""Multilingual models (mBART-cc25, mBART-50): ``--lang`` tags sources and summaries with the
language code, generation starts where training does, and ``--forced_bos_token`` makes every
summary begin with the code, as HF's run_summarization.py sets them; a model folder without
tokenizer files is refused instead of training on unknown tokens. Real HF tokenizers over a
sentencepiece model trained here, tiny random mBARTs saved with save_pretrained."""

import json
import re
import shutil

import pytest
import sentencepiece as spm
import torch
import transformers as hf
from ds_helpers import single_rank_distributed

from cached_ds import CachedConfig, CachedSeq2Seq, languages
from cached_ds.model_zoo import load_tokenizer
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer

WORDS = "die regierung hat heute beschlossen dass eine neue strasse über den fluss gebaut wird und bürger einwände erheben".split()
SMALL = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "sp"), vocab_size=40, minloglevel=2)
    return root / "sp.model"


def saved(root, kind: str, sentencepiece_model, **tokenizer_languages):
    """A hub-like model folder: tokenizer files and a tiny random mBART (no decoder start, as mBART-cc25)."""
    folder = root / kind
    folder.mkdir()
    shutil.copy(sentencepiece_model, folder / "sentencepiece.bpe.model")
    tokenizer = getattr(hf, kind).from_pretrained(str(folder), **tokenizer_languages)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    hf.MBartForConditionalGeneration(hf.MBartConfig(vocab_size=len(tokenizer), **SMALL)).save_pretrained(folder)
    return folder


def test_mbart_cc25_generates_from_the_language_code_training_starts_from(tmp_path, sentencepiece_model):
    tokenizer = load_tokenizer(saved(tmp_path, "MBartTokenizer", sentencepiece_model))
    model = hf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "MBartTokenizer")
    assert languages.set_language(tokenizer, "de_DE") is None
    code = tokenizer.convert_tokens_to_ids("de_DE")
    labels = tokenizer(text_target="die neue strasse")["input_ids"]
    assert labels[-2:] == [tokenizer.eos_token_id, code]  # cc25: [..., </s>, de_DE]
    assert model.generation_config.decoder_start_token_id is None  # HF would start from <s>: never trained on
    languages.set_generation_start(model, tokenizer, None)
    assert model.generation_config.decoder_start_token_id == code
    ids = torch.tensor([tokenizer("die regierung hat heute beschlossen")["input_ids"]])
    generated = CachedSeq2Seq(model.eval(), CachedConfig(window=8)).generate(ids, max_new_tokens=3)
    assert generated[0, 0] == code


def test_mbart50_summaries_are_forced_to_begin_with_the_code(tmp_path, sentencepiece_model):
    tokenizer = load_tokenizer(saved(tmp_path, "MBart50Tokenizer", sentencepiece_model))
    warning = languages.set_language(tokenizer, None)
    assert "tags documents as en_XX and summaries as en_XX" in warning and "--lang" in warning
    languages.set_language(tokenizer, "de_DE")
    code = tokenizer.convert_tokens_to_ids("de_DE")
    assert tokenizer("die strasse")["input_ids"][0] == code and tokenizer(text_target="die strasse")["input_ids"][0] == code
    model = hf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "MBart50Tokenizer").eval()
    languages.set_generation_start(model, tokenizer, "de_DE")
    ids = torch.tensor([tokenizer("die regierung hat heute beschlossen")["input_ids"]])
    generated = CachedSeq2Seq(model, CachedConfig(window=8)).generate(ids, max_new_tokens=3)
    assert generated[0, 1] == code  # after the decoder start


def test_language_codes_are_checked(tmp_path, sentencepiece_model):
    tokenizer = load_tokenizer(saved(tmp_path, "MBart50Tokenizer", sentencepiece_model))
    with pytest.raises(ValueError, match=r"--lang 'german' is not a token of the MBart50Tokenizer tokenizer \(it has e\.g\. ar_AR"):
        languages.set_language(tokenizer, "german")
    model = hf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "MBart50Tokenizer")
    with pytest.raises(ValueError, match="--forced_bos_token 'de' is not a token"):
        languages.set_generation_start(model, tokenizer, "de")
    one_language = hf.T5Tokenizer(vocab_file=str(sentencepiece_model), extra_ids=0)
    assert languages.set_language(one_language, None) is None
    with pytest.raises(ValueError, match=re.escape("--lang is for multilingual tokenizers (MBartTokenizer, MBart50Tokenizer, "
                                                   "M2M100Tokenizer, NllbTokenizer); T5Tokenizer has no language codes")):
        languages.set_language(one_language, "de_DE")


def test_a_training_run_tags_its_data_and_exports_the_language_settings(tmp_path, sentencepiece_model):
    folder = saved(tmp_path, "MBartTokenizer", sentencepiece_model)
    rows = [{"document": " ".join(WORDS[i:] + WORDS[:i]), "summary": " ".join(WORDS[i:i + 4])} for i in range(4)]
    data = tmp_path / "de.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    single_rank_distributed()
    run = parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", str(folder), "--train_file", str(data), "--eval_file",
                      str(data), "--window", "8", "--max_steps", "1", "--max_new_tokens", "4", "--lang", "de_DE",
                      "--output_dir", str(tmp_path / "run")])
    trainer = Trainer(run)
    code = trainer.tokenizer.convert_tokens_to_ids("de_DE")
    assert all(int(labels[-1]) == code for labels in trainer.train_rows["labels"])
    trainer.train()
    exported = tmp_path / "run" / "exported"
    assert json.loads((exported / "generation_config.json").read_text())["decoder_start_token_id"] == code
    assert hf.AutoTokenizer.from_pretrained(exported)(text_target="die")["input_ids"][-1] == code


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    torch.manual_seed(0)
    hf.MBartForConditionalGeneration(hf.MBartConfig(vocab_size=300, **SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                                   "*.model, *.spm, vocab.*, merges.txt); pass --tokenizer ID_OR_DIR")):
        load_tokenizer(str(tmp_path))


def test_documents_the_tokenizer_cannot_spell_are_warned_about(tmp_path, sentencepiece_model, caplog):
    """A vocabulary without the documents' script (here German pieces on Chinese text) trains on
    unknown tokens; the same tokenizer on German text is not warned about."""
    import datasets
    import numpy as np

    from cached_ds.data import check_known_tokens

    tokenizer = load_tokenizer(saved(tmp_path, "MBart50Tokenizer", sentencepiece_model, src_lang="de_DE"))

    def rows(texts):
        ids = [np.asarray(tokenizer(text)["input_ids"], dtype=np.int32) for text in texts]
        return datasets.Dataset.from_dict({"input_ids": ids}).with_format("numpy")

    with caplog.at_level("WARNING", logger="cached_ds"):
        check_known_tokens(rows(["die neue strasse über den fluss"] * 3), tokenizer)
    assert "unknown token" not in caplog.text
    with caplog.at_level("WARNING", logger="cached_ds"):
        check_known_tokens(rows(["政府 今天 决定 在 河上 修建 新的 道路"] * 3), tokenizer)
    assert re.search(r"\d+% of the first documents' tokens are the tokenizer's unknown token <unk>", caplog.text)
