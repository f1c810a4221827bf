"""Whole-document inference: ``encode_long`` and generation through HF ``generate``."""

import pytest
import torch
from reference import windowed_encoder_states
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq

WINDOW = 16


@pytest.mark.parametrize("family", ["bart", "mbart", "pegasus", "t5", "longt5-local", "longt5-tglobal"])
def test_encode_long_equals_per_window_hf_encoder(family):
    model = make_model(family).eval()
    ids, mask, _ = random_batch([3 * WINDOW + 5, WINDOW + 2], [1, 1], model.config.pad_token_id)
    encoder_outputs, fused_mask = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2)).encode_long(ids, mask)
    with torch.no_grad():
        ref, ref_mask = windowed_encoder_states(model, ids, mask, WINDOW, 2)
    assert torch.equal(fused_mask, ref_mask)
    torch.testing.assert_close(encoder_outputs.last_hidden_state * fused_mask[..., None], ref * ref_mask[..., None])


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_logits_without_labels_equal_hf_on_the_fused_states(family):
    """Scoring: decoder_input_ids and no labels give HF's logits on the windowed states."""
    model = make_model(family).eval()
    ids, mask, _ = random_batch([3 * WINDOW + 5, WINDOW + 2], [1, 1], model.config.pad_token_id)
    decoder_ids = torch.randint(4, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        ours = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))(ids, mask, decoder_input_ids=decoder_ids)
        states, fused_mask = windowed_encoder_states(model, ids, mask, WINDOW, 2)
        ref = model(encoder_outputs=(states,), attention_mask=fused_mask, decoder_input_ids=decoder_ids)
    assert ours.loss is None
    torch.testing.assert_close(ours.logits, ref.logits)


@pytest.mark.parametrize("family", ["bart", "t5", "longt5-tglobal"])
@pytest.mark.parametrize("lengths", [[WINDOW - 3], [WINDOW, WINDOW - 6]], ids=["one-doc", "padded-batch"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_hf_generate_within_one_window(family, lengths, num_beams):
    model = make_model(family).eval()
    ids, mask, _ = random_batch(lengths, [1] * len(lengths), model.config.pad_token_id)
    kwargs = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    ours = CachedSeq2Seq(model, CachedConfig(window=WINDOW)).generate(ids, mask, **kwargs)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("search", [dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_k=5)], ids=["greedy", "beams", "sampling"])
@pytest.mark.parametrize("setting", [{"encoder_repetition_penalty": 0.1}, {"encoder_no_repeat_ngram_size": 1}])
def test_settings_that_read_the_documents_ids_act_as_in_hf(family, search, setting):
    """HF's generate is given encoder states here, not ids: it dropped these two with a warning
    that no input_ids were passed. With the ids handed to HF's own processors: HF's tokens, with
    the end token in the documents (as tokenizers write it) and HF forcing it at the last step."""
    model = make_model(family).eval()
    ids, mask, _ = random_batch([WINDOW, WINDOW - 6], [1, 1], model.config.pad_token_id)
    ids[0, -1] = ids[1, WINDOW - 7] = model.config.eos_token_id
    model.generation_config.forced_eos_token_id = model.config.eos_token_id
    kwargs = dict(max_new_tokens=10, min_new_tokens=8, **search)  # tiny models stop at once

    def hf_generate(**more):
        torch.manual_seed(0)
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs, **more)

    ids[:, 2:5] = hf_generate()[:, 1:4]  # the documents hold what it would write
    torch.manual_seed(0)
    ours = CachedSeq2Seq(model, CachedConfig(window=WINDOW)).generate(ids, mask, **kwargs, **setting)
    assert torch.equal(ours, hf_generate(**setting))
    assert not torch.equal(hf_generate(**setting), hf_generate()), "the setting changes the summary"


def test_generation_reads_the_whole_document():
    """Tokens past the first window change the summary: nothing is truncated."""
    model = make_model("bart").eval()
    ids, mask, _ = random_batch([4 * WINDOW], [1], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW))
    changed = ids.clone()
    changed[0, 3 * WINDOW :] = torch.randint(4, 96, (WINDOW,), generator=torch.Generator().manual_seed(9))
    first = wrapped.encode_long(ids, mask)[0].last_hidden_state
    second = wrapped.encode_long(changed, mask)[0].last_hidden_state
    torch.testing.assert_close(first[:, : 3 * WINDOW], second[:, : 3 * WINDOW])
    assert not torch.allclose(first[:, 3 * WINDOW :], second[:, 3 * WINDOW :])


def test_config_is_the_hf_models_as_hf_code_expects():
    """Code written for HF models reads ``model.config`` (HF's Trainer fills DeepSpeed's "auto"
    buckets from its hidden size, generation from its pad and start ids) and
    ``model.generation_config``: the wrapper hands over the HF model's; its own settings are
    ``cached_config``."""
    model = make_model("bart")
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))
    assert wrapped.config is model.config and wrapped.config.d_model == model.config.d_model
    assert wrapped.generation_config is model.generation_config
    assert wrapped.cached_config.window == WINDOW and wrapped.cached_config.group_windows == 2


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_save_pretrained_and_from_pretrained_round_trip(family, tmp_path):
    """An HF folder plus the CachED settings: ``from_pretrained`` gives the same model, windows
    and loss; HF's own ``from_pretrained`` loads the folder too."""
    import json

    from transformers import AutoModelForSeq2SeqLM

    model = make_model(family).eval()
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2, cross_attention_block=5))
    wrapped.save_pretrained(tmp_path / "saved")
    loaded = CachedSeq2Seq.from_pretrained(tmp_path / "saved").eval()
    assert loaded.cached_config == CachedConfig(window=WINDOW, group_windows=2, cross_attention_block=5)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [4, 3], model.config.pad_token_id)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, labels=labels).loss, wrapped(ids, mask, labels=labels).loss)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))

    settings = json.loads((tmp_path / "saved" / "cached_config.json").read_text())
    # settings that changed nothing, saved by an older version before they were refused: still loads
    older = {**settings, "cross_attention_block": None, "keep_attention_dropout": False, "mode": "full", "offload_gradient_cache": True,
             **({"fast_t5_attention": True, "t5_attention_kernel": "local_sdpa"} if family == "t5" else {})}
    (tmp_path / "saved" / "cached_config.json").write_text(json.dumps(older))
    reloaded = CachedSeq2Seq.from_pretrained(tmp_path / "saved").cached_config
    assert (reloaded.mode, reloaded.offload_gradient_cache, reloaded.t5_attention_kernel) == ("full", False, "flex")
    assert reloaded.keep_attention_dropout is (family != "t5")  # t5: fast_t5_attention is on, so it did act
    (tmp_path / "saved" / "cached_config.json").write_text(json.dumps({**settings, "future_setting": 1}))
    with pytest.raises(ValueError, match=r"settings this version of cached-ds does not know: \['future_setting'\]"):
        CachedSeq2Seq.from_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "hf_only")
    with pytest.raises(ValueError, match="cached_config.json is missing: give a folder written by CachedSeq2Seq.save_pretrained"):
        CachedSeq2Seq.from_pretrained(tmp_path / "hf_only")


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_summarize_batches_documents_of_different_lengths_as_hf_summarises_each_alone(family):
    """``evaluation.summarize`` with batch_size > 1 pads the shorter documents: each summary is
    the one plain HF ``generate`` gives that document alone (documents within one window, where
    CachED generation is HF's), decoded by a real HF tokenizer over the tiny vocabulary."""
    import transformers as hf
    from tiny_models import VOCAB
    from tokenizers import Tokenizer, models

    from cached_ds.evaluation import summarize

    # BART's default init std gives a tiny model whose greedy summary ignores its document
    model = make_model(family, **({"init_std": 0.5} if family == "bart" else {})).eval()
    pad = model.config.pad_token_id
    vocabulary = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = hf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t3")),
                                           pad_token=f"t{pad}", eos_token=f"t{model.config.eos_token_id}")
    ids, mask, _ = random_batch([WINDOW - 1, WINDOW - 9, WINDOW - 4], [1, 1, 1], pad)
    documents = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]
    settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=1, do_sample=False)  # tiny models stop at once
    got = summarize(CachedSeq2Seq(model, CachedConfig(window=WINDOW)), tokenizer, documents, batch_size=3, **settings)
    with torch.no_grad():
        alone = [model.generate(input_ids=torch.tensor([document]), **settings) for document in documents]
    assert got == [tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip() for ids in alone]
    assert len(set(got)) > 1, "the documents got different summaries: the comparison can tell them apart"


@pytest.mark.parametrize("world, count, expected", [
    # rank -> (its own documents, the generate calls it makes), written out by hand
    (2, 5, {0: ([0, 2, 4], [0, 2, 4]), 1: ([1, 3], [1, 3, 0])}),
    (3, 2, {0: ([0], [0]), 1: ([1], [1]), 2: ([], [0])}),  # fewer documents than ranks: rank 2 repeats one
    (2, 6, {0: ([0, 2, 4], [0, 2, 4]), 1: ([1, 3, 5], [1, 3, 5])}),
    (4, 7, {0: ([0, 4], [0, 4]), 1: ([1, 5], [1, 5]), 2: ([2, 6], [2, 6]), 3: ([3], [3, 0])}),
])
def test_each_rank_summarises_its_own_documents_then_as_many_calls_as_the_others(world, count, expected):
    """The evaluation's sharding: every document is some rank's own exactly once, each rank's calls
    start with its own, and every rank makes ceil(count / world) generate calls (ZeRO-3's gathers
    are collectives). A shard that ignored the rank passed the launcher tests (mutation testing):
    rank 1 would have summarised rank 0's documents under its own indices."""
    from cached_ds.evaluation import shard

    assert {rank: shard(rank, world, count) for rank in range(world)} == expected
