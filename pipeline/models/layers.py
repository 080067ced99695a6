"""The transformer parts every tokenmill model is made of: RMSNorm, rotary positions, attention that
takes a mask and a KV cache, a SwiGLU MLP and the pre-norm block.

Shapes: B batch, T new positions, S positions attended to (cached + new), C d_model, nh heads, hs head size.
Masks are boolean, True where attention is allowed, broadcastable to (B, nh, T, S).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    d_model: int = 256
    n_head: int = 4
    mlp_ratio: float = 8 / 3            # SwiGLU hidden = ratio * d_model (rounded to 64), ~ the 4x MLP's size
    dropout: float = 0.0                # on each residual branch's output (attention weights are not dropped:
                                        # PyTorch's CPU kernel has no fused path for dropout with a mask)
    rope_base: float = 10000.0

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        return 64 * max(1, round(self.mlp_ratio * self.d_model / 64))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * norm).type_as(x) * self.weight


def rotary(positions: torch.Tensor, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, 1, T, hs/2) for integer positions (B, T)."""
    inverse = 1.0 / base ** (torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    angles = positions.float()[..., None] * inverse            # (B, T, hs/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the tables of `rotary` (pairs are the two halves of the head)."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, one (B, nh, S, hs) pair per layer."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.image_start: torch.Tensor | None = None     # (B,) position of each row's last <boi> (Decoder)

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (e.g. to drop finished samples)."""
        self.layers = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.layers]
        if self.image_start is not None:
            self.image_start = self.image_start[index]


# Keys up to which reduced-precision attention on CPU runs as explicit matmuls: there PyTorch's fused
# CPU kernel is slower in bf16, mostly in its backward (benchmarks/attention.py: 3.2-3.6x at 96 keys,
# 1.15-1.4x at 192-320, 0.85x at 384-512); in fp32 the fused kernel is always the faster.
CPU_EXPLICIT_KEYS = 320


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, nh, S, hs) with a boolean mask:
    PyTorch's fused kernel, or in bf16/fp16 on CPU with few keys the same sums as explicit matmuls."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or k.shape[-2] > CPU_EXPLICIT_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention; self-attention with rotary positions, or cross-attention (`memory`)."""

    def __init__(self, c: TransformerConfig, cross: bool = False):
        super().__init__()
        self.c, self.cross = c, cross
        self.q = nn.Linear(c.d_model, c.d_model, bias=False)
        self.kv = nn.Linear(c.d_model, 2 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, C) -> (B, nh, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, self.c.n_head, self.c.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None = None,
                cache: KVCache | None = None, layer: int = 0, memory: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.q(x))
        k, v = (self._heads(t) for t in self.kv(x if memory is None else memory).chunk(2, dim=-1))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        y = attention(q, k, v, mask)
        B, _, T, _ = y.shape
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.c.d_model)))


class SwiGLU(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.gate_up = nn.Linear(c.d_model, 2 * c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.d_model, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to an encoder's output, MLP."""

    def __init__(self, c: TransformerConfig, cross: bool = False):
        super().__init__()
        self.norm1, self.attn = RMSNorm(c.d_model), Attention(c)
        self.norm_cross, self.cross = (RMSNorm(c.d_model), Attention(c, cross=True)) if cross else (None, None)
        self.norm2, self.mlp = RMSNorm(c.d_model), SwiGLU(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None, cache: KVCache | None = None,
                layer: int = 0, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, rope, cache, layer)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), memory_mask, memory=memory)
        return x + self.mlp(self.norm2(x))


def document_mask(doc_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, T) mask letting a position see only its own document (doc_ids (B, T); -1 marks
    padding, which sees only itself so no row of the mask is empty), and only earlier positions
    when `causal`."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    same = same & (doc_ids[:, :, None] >= 0) | torch.eye(doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device)
    if causal:
        same = same & torch.ones_like(same[0], dtype=torch.bool).tril()
    return same[:, None]


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
