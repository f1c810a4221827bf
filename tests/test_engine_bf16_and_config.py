"""bf16 engines sum the encoder's per-group gradients in fp32; the "cached" section is validated."""

import copy
import json

import pytest
import torch
from ds_helpers import CONFIGS, resolved_config, single_rank_distributed
from reference import windowed_hf_step
from tiny_models import make_model, random_batch

from cached_ds.deepspeed_engine import EngineSettings, initialize
from cached_ds.ds_config import AUTO_FIELDS, auto_values, load_config, resolve_auto, unresolved_auto

WINDOW = 16
BOUND = 0.01


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


def encoder_layer_error(config: str, grad_dtype: str) -> float:
    """Relative error of a bf16 engine's encoder-layer gradients vs the fp32 reference, over
    64 window groups with dropout off (so only rounding differs)."""
    from ds_helpers import reduced_grad

    model = make_model("bart", dropout=0.0)
    ids, mask, labels = random_batch([64 * WINDOW], [12], model.config.pad_token_id, seed=5)
    _, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=0)
    cached = {"window": WINDOW, "group_windows": 1, "group_tokens": None, "grad_dtype": grad_dtype}
    engine, *_ = initialize(model, resolved_config(config, bf16=True, cached=cached))
    engine.backward(engine(ids, mask, labels=labels).loss)
    keys = [k for k in ref if k.startswith("model.encoder.layers")]
    grads = {n: reduced_grad(p).float() for n, p in engine.module.model.named_parameters() if n in keys}
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    engine.step()
    num = sum(float((grads[k] - ref[k]).pow(2).sum()) for k in keys)
    return (num / sum(float(ref[k].pow(2).sum()) for k in keys)) ** 0.5


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_bf16_sums_group_gradients_in_fp32(config):
    assert encoder_layer_error(config, "float32") <= BOUND
    assert encoder_layer_error(config, "bfloat16") > BOUND, "the bf16-accumulating control must fail the bound"


def test_unknown_cached_key():
    with pytest.raises(ValueError, match=r"unknown keys \['group_size'\] in the \"cached\" section; valid keys"):
        EngineSettings.from_section({"group_size": 4})


def test_cached_section_must_be_an_object():
    with pytest.raises(ValueError, match='"cached" section must be a JSON object'):
        EngineSettings.from_section([1, 2])


@pytest.mark.parametrize("key", ["keep_encoder_gathered", "keep_decoder_gathered"])
def test_keeping_gathered_needs_zero3_and_a_bool(key):
    with pytest.raises(ValueError, match=f"{key}\" needs ZeRO stage 3 .*stage 2"):
        initialize(make_model("bart"), resolved_config("zero2", cached={key: True}))
    with pytest.raises(ValueError, match=f'"cached.{key}" must be true or false, got 1'):
        EngineSettings.from_section({key: 1})


def test_layerdrop_refused_under_zero3():
    with pytest.raises(ValueError, match="encoder_layerdrop=0.2 is not supported under ZeRO-3"):
        initialize(make_model("bart", encoder_layerdrop=0.2), resolved_config("zero3"))


def test_unresolved_auto_fields_are_named():
    """A shipped config straight from its file still has HF-style "auto" values: DeepSpeed
    itself would fail on them with a type error that names no field."""
    with pytest.raises(ValueError, match=r'still has "auto" in \[.*\'train_batch_size\'.*\'zero_optimization\.stage3_prefetch_bucket_size\'.*resolve_auto'):
        initialize(make_model("bart"), CONFIGS / "zero3.json")


def test_shipped_configs_reduce_in_5e7_buckets_while_auto_stays_hfs():
    """hidden² would give every weight matrix a ZeRO flush of its own (docs/engine.md, "ZeRO's
    reduce bucket"): the shipped configs set 5e7; "auto" in a user's config is still HF's hidden²."""
    for name in ("zero1", "zero2", "zero3", "zero3_offload", "zero3_long"):
        assert load_config(CONFIGS / f"{name}.json")["zero_optimization"]["reduce_bucket_size"] == 50_000_000, name
    values = auto_values(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, lr=1e-3, weight_decay=0.0,
                         warmup_steps=0, total_steps=1, max_grad_norm=1.0, bf16=True, hidden_size=1024)
    assert resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, values)["zero_optimization"]["reduce_bucket_size"] == 1024**2


def test_deepspeeds_own_auto_fields_are_left_to_it():
    """DeepSpeed interprets some "auto" itself (data_types.keep_in_fp32_modules): neither the
    resolution nor initialize's check touches them; an fp16 section's "enabled" is its own (off,
    as HF's Trainer without --fp16), not bf16's."""
    config = resolved_config("zero2")
    config["data_types"] = {"keep_in_fp32_modules": "auto"}
    config["fp16"] = {"enabled": "auto"}
    values = auto_values(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, lr=1e-3, weight_decay=0.0,
                         warmup_steps=0, total_steps=1, max_grad_norm=1.0, bf16=True, hidden_size=16)
    assert set(values) == AUTO_FIELDS
    resolved = resolve_auto(config | {"bf16": {"enabled": "auto"}}, values)
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["data_types"]["keep_in_fp32_modules"] == "auto"
    assert unresolved_auto(resolved) == []
    del config["fp16"]
    initialize(make_model("bart"), config)  # DeepSpeed takes its own "auto"


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass --deepspeed ds_configs/zero3.json"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "train_batch_size": 1,\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ValueError, match="not valid JSON: .* at line 3, column"):
        load_config(broken)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload", "zero3_long"])
def test_shipped_configs_have_a_valid_cached_section(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    settings = EngineSettings.from_section(config["cached"])
    assert settings.cached.mode == "cached"


def test_the_long_document_config_is_zero3_with_streaming_cross_attention():
    """zero3_long.json is a copy of zero3.json (JSON has no includes) that differs only in the two
    streaming settings: a change to zero3.json must be made there too."""
    long, base = load_config(CONFIGS / "zero3_long.json"), load_config(CONFIGS / "zero3.json")
    extra = {"cross_attention_block": 65536, "keep_attention_dropout": False}
    assert long["cached"] == {**base["cached"], **extra}
    assert {k: v for k, v in long.items() if k != "cached"} == {k: v for k, v in base.items() if k != "cached"}


def test_each_zero3_engine_runs_the_linear_its_config_asks_for():
    """DeepSpeed swaps F.linear for its wrapper process-wide when a ZeRO-3 config leaves
    memory_efficient_linear on, and never swaps it back: an engine that says false, built after
    one that said true, gets torch's own again (zero3.json says false: the whole model stays
    gathered through the step there, so the wrapper would save no memory, only time)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    assert load_config(CONFIGS / "zero3.json")["zero_optimization"]["memory_efficient_linear"] is False
    assert "memory_efficient_linear" not in load_config(CONFIGS / "zero3_offload.json")["zero_optimization"]
    for config, wrapped in [("zero3_offload", True), ("zero3", False), ("zero3_offload", True), ("zero2", True), ("zero3", False)]:
        initialize(make_model("bart"), resolved_config(config))
        assert (torch.nn.functional.linear.__name__ == "zero3_linear_wrap") is wrapped, config
    assert torch.nn.functional.linear is InsertPostInitMethodToModuleSubClasses.linear_bk
    torch_linear = torch.nn.functional.linear

    def someone_elses_linear(*args, **kwargs):
        return torch_linear(*args, **kwargs)

    torch.nn.functional.linear = someone_elses_linear  # not DeepSpeed's: left alone
    try:
        initialize(make_model("bart"), resolved_config("zero3"))
        assert torch.nn.functional.linear is someone_elses_linear
    finally:
        torch.nn.functional.linear = torch_linear


@pytest.mark.parametrize("cpu_checkpointing", [False, True])
def test_deepspeed_checkpointing_with_fast_t5_attention_is_refused_by_name(cpu_checkpointing):
    """The fast T5 layers pass their position bias between layers as a non-tensor, which
    DeepSpeed's reentrant checkpoint builds without autograd in layer 0: the decoder's
    relative_attention_bias gradient came out ~90% wrong. torch's non-reentrant checkpointing
    (decoder_gradient_checkpointing) is exact with it (test_engine_attention_kernels)."""
    config = resolved_config("zero3", cached={"window": 16, "fast_t5_attention": True})
    config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": cpu_checkpointing}
    with pytest.raises(ValueError, match=r'"activation_checkpointing" .* not exact with "cached.fast_t5_attention"; .*decoder_gradient_checkpointing'):
        initialize(make_model("t5", dropout=0.0), config)


def test_partitioned_activations_are_refused_by_name():
    """DeepSpeed's partition_activations mis-merges the None arguments of HF's decoder layers in
    its backward ("got multiple values for argument"); refused before any step."""
    config = resolved_config("zero3")
    config["activation_checkpointing"] = {"partition_activations": True, "cpu_checkpointing": False}
    with pytest.raises(ValueError, match=r'"activation_checkpointing.partition_activations" .* set it false'):
        initialize(make_model("bart"), config)


@pytest.mark.parametrize("given", [None, 123])
def test_zero3_reuse_distance_is_bounded_unless_the_config_sets_it(given):
    """DeepSpeed's default 1e9 makes ZeRO-3's first traced step O(trace²) (ds_config.reuse_distance)."""
    config = resolved_config("zero3")
    del config["zero_optimization"]["stage3_max_reuse_distance"]
    if given is not None:
        config["zero_optimization"]["stage3_max_reuse_distance"] = given
    model = make_model("bart")
    engine, *_ = initialize(model, config)
    expected = model.config.d_model ** 2 if given is None else given
    assert engine._config.zero_config.max_reuse_distance == expected


def test_kept_gathered_encoder_runs_without_zero3_module_hooks():
    """keep_encoder_gathered takes ZeRO-3's per-module hooks off the encoder's submodules for the
    pass (pure overhead while everything is gathered) and puts them back, in order, afterwards."""
    from cached_ds.deepspeed_engine import _zero3_module_hook_ids

    model = make_model("bart")
    ids, mask, labels = random_batch([4 * WINDOW], [5], model.config.pad_token_id)
    cached = {"window": WINDOW, "group_windows": 1, "group_tokens": None, "keep_encoder_gathered": True}
    engine, *_ = initialize(model, resolved_config("zero3", cached=cached))
    zero3 = _zero3_module_hook_ids(engine)
    encoder = engine.module.model.get_encoder()
    watched = [encoder.layers[0].self_attn.q_proj, encoder]  # the encoder module's own hooks too: one call per group
    before = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in watched]
    assert all(zero3 & set(pre) and zero3 & set(post) for pre, post in before)
    seen = []
    probes = [m.register_forward_pre_hook(lambda module, args: seen.append(zero3 & set(module._forward_pre_hooks))) for m in watched]
    engine.backward(engine(ids, mask, labels=labels).loss)
    engine.step()
    for probe in probes:
        probe.remove()
    assert len(seen) == 2 * 2 * 4  # two modules, in the no-grad pass and the recompute, one call per window group
    assert not any(seen)
    assert [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in watched] == before


def zero3_hooks_on(module, zero3) -> bool:
    return bool(zero3 & set(module._forward_pre_hooks)) and bool(zero3 & set(module._forward_hooks))


@pytest.mark.parametrize("family, tied", [("bart", True), ("t5", True), ("bart", False)])
def test_kept_gathered_decoder_runs_without_zero3_module_hooks_until_its_backward_ends(family, tied):
    """keep_decoder_gathered: the decoder and the LM head stay gathered, with ZeRO-3's module hooks
    off, from the decoder's forward through its backward (decoder checkpointing's recompute
    included: nothing would gather them there), then are partitioned with the hooks back in order.
    A tied LM head is the shared embedding, which stays with ZeRO-3 (the encoder uses it too)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from cached_ds.deepspeed_engine import _zero3_module_hook_ids

    model = make_model(family, **({} if tied else {"tie_word_embeddings": False}))
    ids, mask, labels = random_batch([2 * WINDOW + 3], [5], model.config.pad_token_id)
    cached = {"window": WINDOW, "group_windows": 1, "group_tokens": None, "keep_decoder_gathered": True,
              "decoder_gradient_checkpointing": True}
    engine, *_ = initialize(model, resolved_config("zero3", cached=cached))
    zero3 = _zero3_module_hook_ids(engine)
    hf_model = engine.module.model
    ffn = hf_model.get_decoder().layers[0].fc1 if family == "bart" else hf_model.get_decoder().block[0].layer[-1].DenseReluDense.wo
    head = hf_model.get_output_embeddings()
    assert (head.weight is hf_model.get_input_embeddings().weight) == tied
    held = [ffn] + ([] if tied else [head])
    watched = held + [hf_model.get_decoder()]  # the decoder module's own hooks are lifted too
    seen = []
    probes = [m.register_forward_pre_hook(lambda module, args: seen.append(zero3_hooks_on(module, zero3)))
              for m in (ffn, hf_model.get_decoder())]
    before = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in watched]
    assert all(zero3_hooks_on(m, zero3) for m in watched)

    def gathered():
        return {p.ds_status for m in held for p in m.parameters()}

    for step in range(2):  # the second step finds the same state: nothing leaked from the first
        loss = engine(ids, mask, labels=labels).loss
        assert gathered() == {ZeroParamStatus.AVAILABLE}
        engine.backward(loss)
        assert gathered() == {ZeroParamStatus.NOT_AVAILABLE}
        engine.step()
        assert [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in watched] == before
    for probe in probes:
        probe.remove()
    assert seen == [False] * 6  # two steps: the decoder's forward, the layer in it and in checkpointing's recompute

    with torch.no_grad():  # nothing to backpropagate: released when the forward returns
        engine(ids, mask, labels=labels)
    assert gathered() == {ZeroParamStatus.NOT_AVAILABLE}
    engine(ids, mask, labels=labels)  # a loss never backpropagated: released with its graph
    assert gathered() == {ZeroParamStatus.NOT_AVAILABLE}


def test_a_second_backward_through_a_kept_gathered_decoder_is_refused_by_name():
    """After the first backward the decoder's parameters are released; a second one through the
    same graph would run on empty partitions (a shape error naming nothing): it is refused first."""
    model = make_model("bart")
    ids, mask, labels = random_batch([2 * WINDOW], [5], model.config.pad_token_id)
    cached = {"window": WINDOW, "group_windows": 1, "group_tokens": None, "keep_decoder_gathered": True}
    engine, *_ = initialize(model, resolved_config("zero3", cached=cached))
    loss = engine(ids, mask, labels=labels).loss
    engine.backward(loss, retain_graph=True)
    with pytest.raises(RuntimeError, match='second backward through one forward.*"keep_decoder_gathered": false'):
        engine.backward(loss)
