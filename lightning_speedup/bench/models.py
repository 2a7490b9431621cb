"""The reference models of docs/design.md: a ResNet-9-style CNN and a character-level GPT.

ResNet-9 follows the DAWNBench/airbench layout (Page, "How to train your ResNet", 2018):
prep conv, three conv-bn-relu(-pool) layers, residual blocks after the first and the last,
about 6.6M parameters. The GPT follows nanoGPT (Karpathy): pre-LayerNorm blocks, causal
self-attention through ``scaled_dot_product_attention``, tied input/output embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 for small images. For 1x28x28 input: 28 -> 14 -> 7 -> 3 -> global max pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            conv_bn(in_channels, w),  # (B, 64, 28, 28)
            conv_bn(w, 2 * w, pool=True),  # (B, 128, 14, 14)
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),  # (B, 256, 7, 7)
            conv_bn(4 * w, 8 * w, pool=True),  # (B, 512, 3, 3)
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),  # (B, 512)
        )
        self.head = nn.Linear(8 * w, num_classes)
        self.logit_scale = 0.125  # keeps initial logits small, as in the DAWNBench ResNet-9

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x)) * self.logit_scale


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    # Tied input/output embeddings (nanoGPT). A pipeline puts the embedding and the head on different
    # stages, which cannot share a parameter: pipelined runs use tie_weights=False.
    tie_weights: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}).")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx)`` maps (B, T) token ids to (B, T, vocab) logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        _, T = idx.shape  # (B, T)
        if self.cfg.block_size < T:
            raise ValueError(f"Sequence length {T} exceeds the model's block_size {self.cfg.block_size}.")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def pipeline_layers(self) -> list[nn.Module]:
        """The layers in order for :class:`~lightning_speedup.PipelineStrategy`: embeddings, blocks, head."""
        return [_Embeddings(self), *self.blocks, _Head(self)]


class _Embeddings(nn.Module):
    """(B, T) token ids -> (B, T, C): the GPT's token and position embeddings, as one pipeline layer.

    Holds the GPT's own submodules, so parameter names stay ``tok_emb.weight``, ... of the full model.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop, self.block_size = (
            gpt.tok_emb,
            gpt.pos_emb,
            gpt.drop,
            gpt.cfg.block_size,
        )

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)


class _Head(nn.Module):
    """(B, T, C) -> (B, T, vocab): final LayerNorm and output projection, as one pipeline layer."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
