"""Flat, bucketed copies of a module's tensors, so that communication is one call per bucket.

Averaging parameters tensor by tensor costs one collective (one latency term) per tensor: a GPT
block alone has a dozen. DDP solves this with gradient buckets (Li et al., "PyTorch Distributed",
VLDB 2020); the same idea is used here for parameters and buffers. :class:`FlatBuckets` groups
tensors by dtype and device into contiguous buffers of at most ``bucket_cap_mb`` megabytes,
``pack()`` copies the live tensors in, ``unpack()`` copies the buffers back out. The buffers are
copies, never aliases, so optimizers, precision plugins and ``module.to()`` keep working on the
module's own tensors.

Each bucket is padded to a multiple of ``pad_to`` elements so that it splits into equal shards
for the hierarchical (sharded) collectives in :mod:`lightning_speedup.distributed.collectives`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_speedup._validation import check_float


@dataclass(frozen=True)
class _Slot:
    bucket: int
    offset: int
    numel: int


class FlatBuckets:
    """Contiguous buffers holding copies of ``tensors``, grouped by (device, dtype), one collective each.

    Args:
        tensors: the tensors to mirror (parameters and/or buffers); duplicates (tied weights) are kept once.
        bucket_cap_mb: the largest bucket in megabytes; a single tensor larger than that gets its own bucket.
        pad_to: every bucket's length is a multiple of this (zero padding), so it splits into ``pad_to``
            equal shards.

    Raises:
        ValueError: if ``bucket_cap_mb`` is not positive or ``pad_to`` < 1.
    """

    def __init__(self, tensors: Sequence[Tensor], bucket_cap_mb: float = 64.0, pad_to: int = 1) -> None:
        bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0)
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}.")
        seen: set[int] = set()
        self.tensors: list[Tensor] = []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                self.tensors.append(t)
        self.pad_to = pad_to
        cap_bytes = int(bucket_cap_mb * 1024 * 1024)

        # Group by (device, dtype) in first-seen order; a bucket never mixes the two.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(self.tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)

        self.buckets: list[Tensor] = []
        self._slots: list[_Slot] = [_Slot(-1, 0, 0)] * len(self.tensors)
        self._members: list[list[int]] = []
        for (device, dtype), indices in groups.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            current: list[int] = []
            size = 0
            for i in indices:
                n = self.tensors[i].numel()
                if current and (size + n) * itemsize > cap_bytes:
                    self._close_bucket(current, size, device, dtype)
                    current, size = [], 0
                current.append(i)
                size += n
            if current:
                self._close_bucket(current, size, device, dtype)

    def _close_bucket(self, members: list[int], size: int, device: torch.device, dtype: torch.dtype) -> None:
        padded = -(-size // self.pad_to) * self.pad_to
        b = len(self.buckets)
        self.buckets.append(torch.zeros(padded, device=device, dtype=dtype))
        offset = 0
        for i in members:
            n = self.tensors[i].numel()
            self._slots[i] = _Slot(b, offset, n)
            offset += n
        self._members.append(members)

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.buckets)

    @property
    def numel(self) -> int:
        """Elements of the mirrored tensors (without padding)."""
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of all buckets, padding included: what one exchange of every bucket moves."""
        return sum(b.numel() * b.element_size() for b in self.buckets)

    def views(self, bucket: int) -> list[Tensor]:
        """Views into bucket ``bucket``, one per member tensor, shaped like it."""
        flat = self.buckets[bucket]
        return [
            flat.narrow(0, self._slots[i].offset, self._slots[i].numel).view_as(self.tensors[i])
            for i in self._members[bucket]
        ]

    def members(self, bucket: int) -> list[Tensor]:
        """The live tensors mirrored by bucket ``bucket``, in layout order."""
        return [self.tensors[i] for i in self._members[bucket]]

    @torch.no_grad()
    def pack(self) -> None:
        """Copy the live tensors into the buckets."""
        for b in range(len(self.buckets)):
            torch._foreach_copy_(self.views(b), self.members(b))

    @torch.no_grad()
    def unpack(self) -> None:
        """Copy the buckets back into the live tensors."""
        for b in range(len(self.buckets)):
            torch._foreach_copy_(self.members(b), self.views(b))

    def clone_buckets(self) -> list[Tensor]:
        """Fresh copies of the buckets (e.g. a reference point or a stash)."""
        return [b.clone() for b in self.buckets]

    @torch.no_grad()
    def load_buckets(self, flats: Sequence[Tensor]) -> None:
        """Copy ``flats`` (same layout, any device) into the buckets."""
        if len(flats) != len(self.buckets) or any(
            f.shape != b.shape for f, b in zip(flats, self.buckets, strict=True)
        ):
            raise ValueError(
                "The saved flat buffers do not match this model's layout "
                f"({[tuple(f.shape) for f in flats]} vs {[tuple(b.shape) for b in self.buckets]}); "
                "resume with the same model, bucket_cap_mb and hierarchy."
            )
        for f, b in zip(flats, self.buckets, strict=True):
            b.copy_(f)
