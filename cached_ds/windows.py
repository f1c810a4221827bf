"""Split a padded batch of long documents into non-overlapping windows and window groups.

Every document of the micro-batch is cut into windows of ``window`` tokens (the last one may be
partial); windows are listed document by document and packed into *groups* that the encoder sees
as one batch (windows stacked on the batch dimension, padded to the group's longest window).
Each group also holds the row ranges (``runs``) that move its encoder output between its padded
layout and the fused (batch, tokens, hidden) tensor the decoder attends to
(``fused_states.FusedStates``) — and the gradient back the other way (``split_gradient``).

The plan lives where the batch's ids do. Kept in host memory (``host_offload.placed``), the ids
of a multi-million-token document cost the device nothing: ``cached_encoder.encode_group``
copies each group's ids to the encoder's device when it encodes the group, and the model moves
a padded batch's key mask to the decoder's device once per step.

    >>> plan = WindowPlan.build(ids, mask, window=1024, group_windows=8, pad_token_id=1)
    >>> [encode(g.input_ids, g.attention_mask) for g in plan.groups]
"""

from __future__ import annotations

from collections.abc import Iterator

from dataclasses import dataclass

import torch

from .host_offload import prefetched, rows_to_device


@dataclass(frozen=True)
class WindowGroup:
    """Windows encoded together: ``input_ids``/``attention_mask`` are (windows, group_len).

    A group whose windows follow each other in one document, all of the group's length, holds
    a view of the batch's ids and a broadcast mask of ones; only a group that pads a shorter
    window or crosses into the next document copies. Copies of every group's ids and mask would
    be 16 more bytes per document token, growing with the document beside its fused states
    ([decoder-memory]: nothing else may grow); copies are made where the ids are (see the
    module docstring)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    # Where the group's real (unpadded) tokens go: (first row in the group's flat
    # (windows * group_len) layout, first row in the fused flat (batch * longest) layout, row
    # count), adjacent ranges merged: one per document a group touches, when its windows are full.
    # Ranges, not index lists: a copy between host and device cannot index.
    runs: tuple[tuple[int, int, int], ...] = ()
    padding: bool = False  # a one-token stand-in that contributes nothing (see WindowPlan.padded_to)
    has_padding: bool = True  # some window is shorter than group_len

    @property
    def encoder_mask(self) -> torch.Tensor | None:
        """The mask to give the encoder: ``None`` where every token is real. Given a mask, HF
        checks it for padding (``masking_utils._ignore_bidirectional_mask_sdpa``: ``.all()``, a
        host sync on a GPU) in every encoder call: twice per group per step in CachED."""
        return self.attention_mask if self.has_padding else None


@dataclass(frozen=True)
class WindowPlan:
    groups: list[WindowGroup]
    fused_mask: torch.Tensor  # (batch, longest document): 1 on real tokens
    has_padding: bool = True  # some document is shorter than the longest

    @property
    def decoder_mask(self) -> torch.Tensor | None:
        """The encoder mask to give the decoder: ``None`` when no document is padded (no sync,
        no (batch, 1, target, N) mask built by HF; see ``WindowGroup.encoder_mask``)."""
        return self.fused_mask if self.has_padding else None

    @staticmethod
    def document_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Real tokens per document; raises ``ValueError`` on anything we would otherwise truncate."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids.unsqueeze(0)"
            )
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold token ids (an integer dtype), got {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids"
            )
        lengths = attention_mask.sum(dim=1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"input_ids rows {empty} are empty documents (attention_mask is all zero); "
                "drop empty documents before batching"
            )
        # ones then zeros in every row: only 0/1, never rising. Bool temporaries: an int64 copy
        # of the mask to compare with would be 8 bytes per document token on the device.
        binary = ((attention_mask == 0) | (attention_mask == 1)).all()
        if not bool(binary & (attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            raise ValueError(
                "attention_mask must be right-padded (ones then zeros in every row); "
                "set tokenizer.padding_side = 'right' or re-pad the batch"
            )
        return lengths.long()  # a float mask (HF takes those too) sums to float counts

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        window: int,
        pad_token_id: int,
        group_windows: int | None = None,
        group_tokens: int | None = None,
    ) -> WindowPlan:
        """Windows of ``window`` tokens, grouped by count (``group_windows``; ``None`` with no
        ``group_tokens`` = all windows in one group) or by a padded-token budget (``group_tokens``)."""
        lengths = cls.document_lengths(input_ids, attention_mask).tolist()
        longest = max(lengths)
        device = input_ids.device
        spans = [(doc, start, min(window, n - start)) for doc, n in enumerate(lengths) for start in range(0, n, window)]

        groups = [_group(input_ids, members, pad_token_id, longest) for members in _group_spans(spans, group_windows, group_tokens)]
        batch = len(lengths)
        if attention_mask is None:  # every document is the whole row
            fused_mask = torch.ones((), dtype=torch.long, device=device).expand(batch, longest)
        elif attention_mask.dtype == torch.long:  # right-padded (checked above): its first columns are the fused mask
            fused_mask = attention_mask[:, :longest]
        else:
            fused_mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
        return cls(groups, fused_mask, has_padding=min(lengths) < longest)

    def padded_to(self, num_groups: int, pad_token_id: int) -> WindowPlan:
        """The same plan led by one-token padding groups up to ``num_groups`` groups.

        Data-parallel ranks must run the same number of encoder calls when each call issues
        collectives (ZeRO-3 gathers parameters per call: unequal counts abort gloo, hang NCCL).
        Padding groups come first so the last group, whose backward delivers the gradients, is
        real; their outputs and gradients are dropped."""
        missing = num_groups - len(self.groups)
        if missing <= 0:
            return self
        device = self.fused_mask.device
        ids = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
        stand_in = WindowGroup(ids, torch.ones_like(ids), padding=True, has_padding=False)
        return WindowPlan([stand_in] * missing + self.groups, self.fused_mask, self.has_padding)

    @property
    def batch_size(self) -> int:
        return self.fused_mask.shape[0]

    def split_gradient(self, cache: torch.Tensor, device: torch.device | None = None, ahead: bool = False) -> Iterator[torch.Tensor]:
        """Each group's slice of the (batch, longest, hidden) gradient ``cache`` in the group's
        padded (windows, group_len, hidden) layout, zeros on padding, on ``device`` (default: the
        cache's), made when asked for: one group's slice exists beside the cache (which is
        N-sized, and fp32 when the decoder wrote it out of band). ``ahead``, for a cache in host
        memory: the next group's slice is already on its way, on a side stream (``host_offload``),
        while this one is used; two slices then exist."""
        rows = cache.reshape(-1, cache.shape[-1])

        def fetch(group: WindowGroup):
            windows, group_len = group.input_ids.shape
            from_fused = [(fused_row, group_row, n) for group_row, fused_row, n in group.runs]
            return rows_to_device(rows, from_fused, windows * group_len, device or cache.device, zeros=True)

        slices = prefetched(self.groups, fetch) if ahead else ((group, fetch(group).ready()) for group in self.groups)
        for group, grad in slices:
            yield grad.view(*group.input_ids.shape, -1)


def _group(input_ids: torch.Tensor, members: list[tuple[int, int, int]], pad_token_id: int, longest: int) -> WindowGroup:
    """One group of window spans (doc, start, length): views where its windows are whole and
    follow each other in one document (see ``WindowGroup``), copies padded to the longest otherwise."""
    group_len = max(length for _, _, length in members)
    doc, start, _ = members[0]
    count = len(members)
    if all(m == (doc, start + i * group_len, group_len) for i, m in enumerate(members)):
        ids = input_ids[doc, start : start + count * group_len].reshape(count, group_len)
        mask = torch.ones((), dtype=torch.long, device=input_ids.device).expand(count, group_len)
        return WindowGroup(ids, mask, ((0, doc * longest + start, count * group_len),), has_padding=False)
    ids = input_ids.new_full((count, group_len), pad_token_id)
    mask = torch.zeros((count, group_len), dtype=torch.long, device=input_ids.device)
    runs = []
    for row, (doc, start, length) in enumerate(members):
        ids[row, :length] = input_ids[doc, start : start + length]
        mask[row, :length] = 1
        runs.append((row * group_len, doc * longest + start, length))
    return WindowGroup(ids, mask, _merged(runs), has_padding=any(length < group_len for _, _, length in members))


def _merged(runs: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """(group row, fused row, count) ranges, each joined to the previous one where both continue it."""
    merged: list[tuple[int, int, int]] = []
    for group_row, fused_row, count in runs:
        if merged and merged[-1][0] + merged[-1][2] == group_row and merged[-1][1] + merged[-1][2] == fused_row:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + count)
        else:
            merged.append((group_row, fused_row, count))
    return tuple(merged)


def _group_spans(spans, group_windows, group_tokens):
    """Consecutive runs of window spans: ``group_windows`` per run, or as many as fit in
    ``group_tokens`` once padded to the run's longest window (never fewer than one)."""
    if group_tokens is None:
        size = group_windows or len(spans)
        return [spans[i : i + size] for i in range(0, len(spans), size)]
    runs, run, run_len = [], [], 0
    for span in spans:
        longest = max(run_len, span[2])
        if run and longest * (len(run) + 1) > group_tokens:
            runs.append(run)
            run, longest = [], span[2]
        run.append(span)
        run_len = longest
    runs.append(run)
    return runs
