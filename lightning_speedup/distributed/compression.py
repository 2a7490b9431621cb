"""Lossy encodings of what is exchanged: bfloat16, float16, and blockwise int8.

Casting to 16 bits halves the bytes on the wire (fp16 compression in DDP comm hooks, PyTorch
``default_hooks``). Int8 with one float32 absmax scale per block of ``INT8_BLOCK`` elements
quarters them (the blockwise scheme of Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022, used for communication by ZeRO++ qgZ, Wang et al. 2023). Int8 values
cannot be summed on the wire, so :mod:`~lightning_speedup.distributed.collectives` averages
them with an all-to-all, a local float32 sum, and an all-gather.

Encode what is small and centred (pseudo-gradients, parameter deltas), not raw parameters:
the error is relative to the block's largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Compression = Literal["none", "bf16", "fp16", "int8"]
COMPRESSIONS: tuple[str, ...] = ("none", "bf16", "fp16", "int8")
INT8_BLOCK = 1024
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_compression(compress: str) -> None:
    """Raise a ValueError naming the choices if ``compress`` is not one of :data:`COMPRESSIONS`."""
    if compress not in COMPRESSIONS:
        raise ValueError(f"Unknown compression {compress!r}; choose one of {list(COMPRESSIONS)}.")


def wire_bytes(numel: int, compress: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes that ``numel`` elements of ``dtype`` take on the wire under ``compress``."""
    if compress == "none":
        return numel * torch.empty((), dtype=dtype).element_size()
    if compress in _CAST:
        return numel * 2
    if compress == "int8":
        return numel + 4 * -(-numel // INT8_BLOCK)
    raise ValueError(f"Unknown compression {compress!r}; choose one of {list(COMPRESSIONS)}.")


@dataclass
class Int8Blocks:
    """Blockwise int8 codes ``q`` (numel padded to a multiple of the block) and float32 ``scales``."""

    q: Tensor
    scales: Tensor
    numel: int


def padded_numel(numel: int, multiple: int = INT8_BLOCK) -> int:
    return -(-numel // multiple) * multiple


def int8_encode(x: Tensor, block: int = INT8_BLOCK) -> Int8Blocks:
    """Quantize flat ``x`` to int8 per block of ``block`` elements (round to nearest, absmax scale)."""
    n = x.numel()
    padded = torch.zeros(padded_numel(n, block), device=x.device, dtype=torch.float32)
    padded[:n] = x.reshape(-1)
    blocks = padded.view(-1, block)  # (num_blocks, block)
    scales = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(blocks / scales[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)
    return Int8Blocks(q, scales, n)


def int8_decode(codes: Int8Blocks, out: Tensor | None = None, block: int = INT8_BLOCK) -> Tensor:
    """Float32 values of ``codes`` (the first ``codes.numel`` of them), written into ``out`` if given."""
    values = (codes.q.view(-1, block).float() * codes.scales[:, None]).view(-1)[: codes.numel]
    if out is None:
        return values
    out.copy_(values.view_as(out))
    return out


def roundtrip(x: Tensor, compress: str) -> Tensor:
    """What the receiver decodes from ``x`` under ``compress``, as float32 (``x`` itself for "none")."""
    if compress == "none":
        return x
    if compress in _CAST:
        return x.to(_CAST[compress]).to(x.dtype)
    return int8_decode(int8_encode(x)).view_as(x).to(x.dtype)
