"""``CachedConfig``: how documents are windowed and how the encoder is trained."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

MODES = ("cached", "full")
CROSS_ATTENTION_KERNELS = ("fused", "plain")
T5_ATTENTION_KERNELS = ("flex", "blocked", "local_sdpa")
GRAD_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GROUP_TOKENS = 16384


@dataclass
class CachedConfig:
    """Settings of the CachED step.

    window: tokens per encoder window; ``None`` = the encoder's position limit (1024 for BART),
        4096 for LongT5, 512 for T5.
    group_windows: windows encoded together as one batch (an int, or ``"all"``).
    group_tokens: instead, the most padded tokens per group (``window`` at least). With neither
        set, groups hold up to 16384 tokens.
    mode: ``cached`` (encoder memory of one group) or ``full`` (ordinary backprop through every
        window: the same model, kept as the baseline for benchmarks).
    decoder_gradient_checkpointing: recompute decoder layers in backward (HF's checkpointing).
    encoder_gradient_checkpointing: inside CachED's per-group recompute, checkpoint the encoder
        layers too (non-reentrant, RNG preserved: still exact), so a group's backward holds one
        layer's activations instead of all of them; lets a group hold more windows.
    grad_dtype: dtype in which the encoder's per-group parameter gradients are summed.
    cross_attention_block: stream the decoder's cross-attention over key blocks of this many
        tokens (``streaming_cross_attention``: no N-sized K/V or scores kept for backward);
        ``None`` keeps HF's modules. Needs cross-attention dropout 0 in training.
    cross_attention_kernel: how streaming cross-attention runs a key block: ``"fused"`` on the
        device's fused SDPA kernel where one applies (``block_attention``), else plain PyTorch
        ops; ``"plain"`` always plain ops (slower; a way around a kernel problem on some GPU).
    fast_t5_attention: T5/LongT5 only: blocked self-attention without (heads × L × L) tensors
        (``t5_attention``); modules with attention dropout in training still run HF's code.
    t5_attention_kernel: how ``fast_t5_attention`` runs on CUDA: ``"flex"`` through
        ``flex_attention`` (compiled Triton kernels, ``flex_t5``); ``"blocked"`` our blocked
        PyTorch implementation, as on CPU (slower; a way around a flex or compiler problem);
        ``"local_sdpa"`` LongT5's local and transient-global encoder attention as one SDPA call
        over query blocks with a dense bias (``local_sdpa``; also on CPU), the rest as ``"flex"``.
    offload_gradient_cache: keep the fp32 gradient cache that streaming cross-attention writes in
        host memory (pinned beside a GPU) instead of on the device: 4 bytes × hidden per token
        off the device. DeepSpeed's ``activation_checkpointing.cpu_checkpointing`` turns it on
        (with streaming cross-attention; without it there is no such cache, and it is refused).
        Copies overlap the compute (``host_offload``): they cost host-link bandwidth and host adds.
    offload_encoder_states: keep the fused encoder states in host memory too (2 bytes × hidden per
        token in bf16); needs ``cross_attention_block``, whose blocks come to the device one by one.
    keep_attention_dropout: ``False`` switches attention-probability dropout off in the modules
        the two kernels replace (they have none; hidden dropout stays on). T5/LongT5 need it for
        the kernels in training: their ``dropout_rate`` sets both dropouts.
    keep_graphs_bytes: ``cached`` mode: device memory (bytes) for encoder graphs kept from the
        forward to the backward. Leading window groups keep theirs while they fit (measured: the
        tensors autograd saves plus the group's output) and are not recomputed; the rest are.
        Exact either way. ``None`` or 0: recompute every group. Needs the encoder's parameters
        resident between forward and backward: ZeRO 0–2, or ZeRO-3 with ``keep_encoder_gathered``.
    """

    window: int | None = None
    group_windows: int | str | None = None
    group_tokens: int | None = None
    mode: str = "cached"
    decoder_gradient_checkpointing: bool = False
    encoder_gradient_checkpointing: bool = False
    grad_dtype: str = "float32"
    cross_attention_block: int | None = None
    cross_attention_kernel: str = "fused"
    fast_t5_attention: bool = False
    t5_attention_kernel: str = "flex"
    keep_attention_dropout: bool = True
    offload_gradient_cache: bool = False
    offload_encoder_states: bool = False
    keep_graphs_bytes: int | None = None

    def __post_init__(self) -> None:
        if not _is_count(self.window, 1):
            raise ValueError(f"window must be a positive integer number of tokens, got {self.window!r}")
        if self.group_windows is not None and self.group_tokens is not None:
            raise ValueError(
                "set either group_windows or group_tokens, not both; remove one (the shipped DeepSpeed configs "
                'set "group_tokens": 16384 in their "cached" section)'
            )
        if self.group_windows is not None and self.group_windows != "all":
            if not _is_count(self.group_windows, 1):
                raise ValueError(f"group_windows must be a positive integer or 'all', got {self.group_windows!r}")
        if not _is_count(self.group_tokens, 1):
            raise ValueError(f"group_tokens must be a positive integer, got {self.group_tokens!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for flag in ("decoder_gradient_checkpointing", "encoder_gradient_checkpointing", "fast_t5_attention", "keep_attention_dropout",
                     "offload_gradient_cache", "offload_encoder_states"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not self.keep_attention_dropout and self.cross_attention_block is None and not self.fast_t5_attention:
            raise ValueError("keep_attention_dropout=false switches attention dropout off in the modules the long-document "
                             "kernels replace, and neither is on (cross_attention_block, fast_t5_attention); turn one on, "
                             "or remove keep_attention_dropout")
        if self.offload_gradient_cache and self.mode != "cached":
            raise ValueError(f"offload_gradient_cache is for mode 'cached' (mode {self.mode!r} has no gradient cache to "
                             "offload); remove it")
        if self.offload_encoder_states and self.mode != "cached":
            raise ValueError(f"offload_encoder_states is for mode 'cached' (got {self.mode!r}); remove it")
        if self.offload_encoder_states and self.cross_attention_block is None:
            raise ValueError("offload_encoder_states needs cross_attention_block (only streaming cross-attention reads "
                             "host-resident states, block by block); set cross_attention_block, e.g. 8192")
        if self.cross_attention_kernel not in CROSS_ATTENTION_KERNELS:
            raise ValueError(f"cross_attention_kernel must be one of {CROSS_ATTENTION_KERNELS}, got {self.cross_attention_kernel!r}")
        if self.t5_attention_kernel not in T5_ATTENTION_KERNELS:
            raise ValueError(f"t5_attention_kernel must be one of {T5_ATTENTION_KERNELS}, got {self.t5_attention_kernel!r}")
        # the kernel choices of switched-off kernels would be ignored without a word
        if self.t5_attention_kernel != "flex" and not self.fast_t5_attention:
            raise ValueError(f"t5_attention_kernel={self.t5_attention_kernel!r} picks how fast_t5_attention runs, which is off; "
                             "set fast_t5_attention to true, or remove t5_attention_kernel")
        if self.cross_attention_kernel != "fused" and self.cross_attention_block is None:
            raise ValueError(f"cross_attention_kernel={self.cross_attention_kernel!r} picks how streaming cross-attention runs, "
                             "which is off; set cross_attention_block (e.g. 8192), or remove cross_attention_kernel")
        if not _is_count(self.cross_attention_block, 1):
            raise ValueError(f"cross_attention_block must be a positive number of key tokens or null, got {self.cross_attention_block!r}")
        if not _is_count(self.keep_graphs_bytes, 0):
            raise ValueError(
                f"keep_graphs_bytes must be a non-negative number of bytes (0 or null: recompute every group), "
                f"got {self.keep_graphs_bytes!r}"
            )
        if self.keep_graphs_bytes and self.mode != "cached":
            raise ValueError(
                f"keep_graphs_bytes is for mode 'cached' (mode {self.mode!r} keeps every group's graph); remove it"
            )
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {sorted(GRAD_DTYPES)}, got {self.grad_dtype!r}")

    @classmethod
    def from_dict(cls, values: dict) -> CachedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CachED settings {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    @property
    def grad_torch_dtype(self) -> torch.dtype:
        return GRAD_DTYPES[self.grad_dtype]

    def grouping(self) -> dict:
        """Keyword arguments for ``WindowPlan.build``."""
        if self.group_windows == "all":
            return {"group_windows": None, "group_tokens": None}
        if self.group_windows is None and self.group_tokens is None:
            return {"group_windows": None, "group_tokens": DEFAULT_GROUP_TOKENS}
        return {"group_windows": self.group_windows, "group_tokens": self.group_tokens}


def _is_count(value, minimum: int) -> bool:
    """``None``, or an int of at least ``minimum`` (JSON's true/false are not counts)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum)
