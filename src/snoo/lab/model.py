"""A decoder-only transformer small enough to read on one screen.

Two flavours share one code path: ``gpt`` (LayerNorm, learned positions, GELU MLP, as in GPT-2) and ``llama``
(RMSNorm, rotary positions, SwiGLU MLP). The head is tied to the token embedding or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


@dataclass
class ModelConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    flavour: str = "llama"  # "gpt" or "llama"
    tie_head: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        if self.flavour not in ("gpt", "llama"):
            raise ValueError(f"model flavour must be 'gpt' or 'llama', got {self.flavour!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.flavour == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"flavour llama rotates pairs of channels: n_embd / n_head must be even, "
                f"got {self.n_embd // self.n_head}"
            )


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.RMSNorm(cfg.n_embd) if cfg.flavour == "llama" else nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rotary_tables(head_dim: int, block_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # [T, head_dim/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; rotate each (even, odd) half-pair by the position's angle
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = rotary[0][:T], rotary[1][:T]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.flavour == "llama"
        # SwiGLU keeps the parameter count of a 4x GELU MLP with a hidden width of 8/3 n_embd
        hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64) if self.swiglu else 4 * cfg.n_embd
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, h = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * h)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.flavour == "gpt" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.head.weight = self.embed.weight
        if cfg.flavour == "llama":
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2: residual projections scaled down by depth so the residual stream does not grow with n_layer
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters (a tied head counted once); ``embeddings=False`` leaves out the token and position embeddings
        (and the head tied to them), the count that scaling laws use (Kaplan et al. 2020)."""
        skip = set() if embeddings else {id(self.embed.weight), *([id(self.pos.weight)] if self.pos else [])}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab], or the mean cross-entropy when ``targets`` is given."""
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        rotary = (self.rotary_cos, self.rotary_sin) if self.pos is None else None
        for block in self.blocks:
            x = block(x, rotary)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: torch counts its CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention runs here
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def training_flops_per_token(model: GPT) -> float:
    """Matmul FLOPs of one training step (forward and backward) per token, at the model's block size.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` over one sequence: every Linear, the head included (the
    embedding is a lookup; norms, activations, the loss and the optimizer are not counted), and attention's two
    products per layer, dense ``T x T`` as torch counts them (a causal kernel may skip about half). For ``N``
    weights in Linear layers, ``L`` layers of width ``C`` and block size ``T`` this is

    .. math:: 6 N + 14 L T C

    (forward :math:`2N + 4LTC`; backward :math:`4N + 10LTC`, since the fused attention kernel computes the scores
    again instead of keeping them). Gradients are taken with ``torch.autograd.grad``, so the model's ``.grad`` is
    left as it was.
    """
    idx = torch.zeros(1, model.cfg.block_size, dtype=torch.long, device=model.embed.weight.device)
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        torch.autograd.grad(model(idx, idx), params)
    return counter.get_total_flops() / model.cfg.block_size
