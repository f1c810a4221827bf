"""One key block of softmax attention on a fused SDPA kernel that also returns the block's
log-sum-exp, and the block's share of the backward given the whole row's output and log-sum-exp.

These are the two pieces streaming cross-attention needs to visit the keys in blocks on fused
kernels: forward, each block's (output, lse) is merged into the row's by their log-sum-exps;
backward, each block's kernel is handed the *merged* output and lse, and then returns exactly that
block's share of dq and its own dk, dv (flash attention's backward computes P = exp(S - lse) and
rowsum(dO * O) from what it is given). PyTorch's context-parallel ring attention does the same
with these ops (``torch/distributed/tensor/experimental/_context_parallel/_attention.py``).

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (fp32/fp64/bf16).
- CUDA, bf16/fp16, head_dim a multiple of 8 up to 256, sm80+: ``aten._scaled_dot_product_flash_attention``.
- CUDA otherwise (fp32, or flash switched off): ``aten._scaled_dot_product_efficient_attention``,
  whose lse is padded to a multiple of 32 query rows; it is kept in that layout (``rows`` slices it).
- Anything else: ``block_kernel`` returns ``None`` and the caller keeps its plain PyTorch blocks.
The SDPA switches are honoured: ``with torch.nn.attention.sdpa_kernel(SDPBackend.MATH):`` runs
the plain blocks everywhere (and ``enable_flash_sdp(False)`` etc. choose between the two). No masks:
the caller hands each call only visible keys. No dropout.

    kernel = block_kernel(query)            # query (batch, heads, target, head_dim)
    out, lse = kernel.forward(query, key, value, scale)
    dq, dk, dv = kernel.backward(grad_out, query, key, value, merged_out, merged_lse, scale)
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


class BlockKernel:
    """(out, lse) of one block, and its backward against a merged (out, lse)."""

    name = "abstract"

    def forward(self, query, key, value, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, grad_out, query, key, value, out, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward_layout(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` as this kernel's backward reads it (once per backward, for every block)."""
        return out

    @staticmethod
    def rows(lse: torch.Tensor, target: int) -> torch.Tensor:
        """The lse of the ``target`` real query rows (a kernel may pad its layout)."""
        return lse[..., :target]


class CpuFlash(BlockKernel):
    name = "cpu-flash"

    def forward(self, query, key, value, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, scale=scale)

    def backward(self, grad_out, query, key, value, out, lse, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, lse, 0.0, False, scale=scale)


class CudaFlash(BlockKernel):
    """The kernel's extra outputs (no varlen, no dropout: nothing a block's backward reads) are
    taken from the first forward and handed to every backward, as PyTorch's ring attention does."""

    name = "cuda-flash"

    def __init__(self):
        self.extras = None

    def forward(self, query, key, value, scale):
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, False, False, scale=scale)
        if self.extras is None:
            self.extras = (cum_q, cum_k, seed, offset)
        return out, lse

    def backward(self, grad_out, query, key, value, out, lse, scale):
        cum_q, cum_k, seed, offset = self.extras
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, query, key, value, out, lse, cum_q, cum_k, query.shape[2], key.shape[2], 0.0, False, seed, offset,
            scale=scale)


class CudaEfficient(BlockKernel):
    """In fp16/bf16 its backward reads ``out`` with the row stride of the (batch, target, heads,
    head_dim) layout its own forward writes, whatever the tensor's strides say
    (``kernel_backward.h``, ``o_strideM``); the merged output is handed over in that layout."""

    name = "cuda-efficient"

    def __init__(self):
        self.extras = None

    def forward(self, query, key, value, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, False, scale=scale)
        if self.extras is None:
            self.extras = (seed, offset)
        return out, lse

    def backward_layout(self, out):
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    def backward(self, grad_out, query, key, value, out, lse, scale):
        seed, offset = self.extras
        grad_query, grad_key, grad_value, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, query, key, value, None, out, lse.contiguous(), seed, offset, 0.0, [True, True, True, False], False,
            scale=scale)
        return grad_query, grad_key, grad_value


def block_kernel(query: torch.Tensor) -> BlockKernel | None:
    """The fused kernel for ``query``'s device, dtype and head size; ``None``: none applies."""
    dtype, head_dim = query.dtype, query.shape[-1]
    backends = torch.backends.cuda  # the SDPA switches, which govern CPU SDPA too
    if query.device.type == "cpu":
        usable = dtype in (torch.float32, torch.float64, torch.bfloat16) and backends.flash_sdp_enabled() \
            and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu")
        return CpuFlash() if usable else None
    if query.device.type != "cuda":
        return None
    # Called directly, the ops skip SDPA's hardware checks: flash and bf16 need Ampere (sm80) or newer.
    ampere = torch.cuda.get_device_capability(query.device) >= (8, 0)
    if dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256 and ampere \
            and backends.flash_sdp_enabled() and backends.is_flash_attention_available():
        return CudaFlash()
    if (dtype in (torch.float32, torch.float16) or (dtype == torch.bfloat16 and ampere)) and head_dim % 8 == 0 \
            and backends.mem_efficient_sdp_enabled():
        return CudaEfficient()
    return None
