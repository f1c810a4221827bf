"""Tags that survive the aliases DeepSpeed ZeRO-3 hands modules (``cached_ds.tensor_tags``): its
module hooks pass every positional input through an autograd Function returning ``x.detach()``,
which drops Python attributes. The engine-level check (the gradient sink and the host-memory
mark reach every streaming layer under ZeRO-3, decoder checkpointing included) is in
``test_engine_attention_kernels.py``."""

import gc

import torch
from tiny_models import make_model_without_cross_attention_dropout, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq, tensor_tags
from cached_ds.streaming_cross_attention import install_streaming_cross_attention
from cached_ds.tensor_tags import get_tag, set_tag


class DetachAlias(torch.autograd.Function):
    """What ZeRO-3's PostBackwardFunctionModule does to a module's inputs."""

    @staticmethod
    def forward(x):
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class Owner:
    pass


def test_a_tag_is_found_on_aliases_but_not_on_copies_or_other_views():
    states = torch.randn(2, 5, 3, requires_grad=True)
    set_tag(states, "sink", "the sink")
    alias = DetachAlias.apply(states)
    assert not hasattr(alias, "sink") and alias is not states
    assert get_tag(alias, "sink") == "the sink" and get_tag(states.detach(), "sink") == "the sink"
    assert get_tag(states.clone(), "sink") is None  # other memory
    assert get_tag(states[:, 1:], "sink") is None and get_tag(states.transpose(0, 1), "sink") is None  # other views


def test_a_tag_lives_as_long_as_its_owner_and_does_not_keep_a_self_owned_value():
    states = torch.randn(4, 3)
    owner = Owner()
    set_tag(states, "mark", True, owner=owner)
    del owner
    gc.collect()
    assert get_tag(states, "mark") is None
    sink = Owner()
    set_tag(states, "sink", sink, owner=sink)
    assert get_tag(states.detach(), "sink") is sink
    del sink
    gc.collect()
    assert get_tag(states, "sink") is None  # the tag held it weakly: it died, and its tag with it


def test_a_training_step_leaves_no_tags_behind():
    model = make_model_without_cross_attention_dropout("bart")
    install_streaming_cross_attention(model, block=7)
    ids, mask, labels = random_batch([53, 20], [7, 4], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=16, group_windows=2, offload_gradient_cache=True,
                                                offload_encoder_states=True, cross_attention_block=7))
    gc.collect()
    before = len(tensor_tags._tags)
    for _ in range(3):
        wrapped(ids, mask, labels=labels).loss.backward()
    gc.collect()
    assert len(tensor_tags._tags) == before
