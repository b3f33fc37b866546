"""A real reverse diffusion for the class prompt encoder's sparse prompt (ours; selectable).

The class prompt encoder's one-pass model (``reverse_steps`` 0 or 1) noises the image embedding
once and runs its U-Net once: "diffusion" there is training-time noise. With ``reverse_steps``
S >= 2 the sparse prompt (2 x 256 tokens, the stand-in for a box's two corner tokens) is instead
*sampled* by an S-step reverse process:

* diffusion variable: the sparse prompt x. Its clean value x0 is what SAM's prompt encoder gives
  the ground-truth box (``SamBackbone.prompt(boxes=...)``), so the end of the chain is a prompt
  the mask decoder already knows how to read;
* forward process: DDPM's q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), cosine schedule over
  ``timesteps`` (default 1000; ab_T ~ 1e-5, so x_T is pure noise);
* denoiser (:class:`TokenDenoiser`): a small transformer over 5 tokens, the two noisy prompt tokens,
  the two tokens the U-Net's sparse branch pools for the class (where in the image the class is)
  and one token of the class vector, the bottleneck's mean and the timestep; it predicts x0
  (x0-parameterisation);
* sampling: deterministic DDIM (eta = 0) over S steps t = T, T(S-1)/S, ..., T/S from x_T, a fixed
  noise stored with the weights (``noise_seed``), so the same input gives the same prompt bit for bit;
  the output is the last step's x0 prediction;
* training (:meth:`SparseReverseDiffusion.denoise_error`): random t, x_t ~ q(x_t | x0), squared
  error of the prediction against x0 per item (the loss's ``denoise`` term, on items with a box);
  the mask losses see the sparse prompt at the end of the S-step chain, unrolled from fresh noise
  (the denoiser is small: a step costs ~1% of a class decode).

Dense prompt and presence stay one-pass (the U-Net's dense branch and presence head).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# prompt_encoder imports this module only when it builds a reverse diffusion: no cycle at import
from .prompt_encoder import DiffusionClassPromptEncoder, _timestep_embedding


class _Block(nn.Module):
    """Pre-norm transformer block (self-attention written out: exports to ONNX as plain matmuls)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"reverse diffusion width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (w // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class TokenDenoiser(nn.Module):
    """x0-prediction over the sparse prompt: (x_t (B,N,E), t (B,), context) -> x0 estimate (B,N,E).
    The context (:meth:`context`: the sparse branch's tokens and the class/bottleneck vector, projected)
    is computed once per item and reused by every step."""

    def __init__(self, embed_dim: int, cond_dim: int, tokens: int = 2, width: int = 128, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.x_in = nn.Linear(embed_dim, width)
        self.c_in = nn.Linear(embed_dim, width)
        self.v_in = nn.Linear(cond_dim, width)
        self.t_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.pos = nn.Parameter(0.02 * torch.randn(2 * tokens + 1, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def context(self, cond_tokens: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        """(B, N+1, width): the condition tokens, with the position tags of their slots."""
        ctx = torch.cat([self.c_in(cond_tokens), self.v_in(cond_vec)[:, None]], 1)
        return ctx + self.pos[self.tokens:]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        temb = self.t_in(_timestep_embedding(t, self.width))[:, None]
        seq = torch.cat([self.x_in(x_t) + self.pos[:self.tokens], ctx], 1) + temb
        for block in self.blocks:
            seq = block(seq)
        return self.out(self.norm(seq[:, :self.tokens]))


class SparseReverseDiffusion(nn.Module):
    """S-step DDIM over the sparse prompt (see the module docstring).

    Args:
        embed_dim: prompt token width (SAM: 256).
        cond_dim: width of the per-item condition vector (class vector + pooled bottleneck).
        steps: S, the number of reverse steps (>= 1; the model is built for S >= 2, and evaluation
            may set ``steps`` to any S >= 1 afterwards: 1 is the denoiser's single guess from noise).
        timesteps: T of the forward process; ``schedule``: ``cosine`` (default) or ``linear``.
        width, depth, heads: the denoiser's transformer.
        noise_seed: seeds x_T, stored with the weights (inference is deterministic).
    """

    def __init__(self, embed_dim: int, cond_dim: int, steps: int, tokens: int = 2, timesteps: int = 1000,
                 schedule: str = "cosine", width: int = 128, depth: int = 2, heads: int = 4, noise_seed: int = 0):
        super().__init__()
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"reverse diffusion schedule must be 'cosine' or 'linear', got '{schedule}'")
        if int(timesteps) < 2:
            raise ValueError(f"reverse diffusion timesteps must be >= 2, got {timesteps}")
        self.timesteps = int(timesteps)
        self.steps = int(steps)
        self.denoiser = TokenDenoiser(embed_dim, cond_dim, tokens, width, depth, heads)
        self.register_buffer("alphas_cumprod", DiffusionClassPromptEncoder._alphas_cumprod(schedule, self.timesteps))
        g = torch.Generator().manual_seed(int(noise_seed))
        self.register_buffer("noise", torch.randn(tokens, embed_dim, generator=g))

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        if int(value) < 1 or int(value) > self.timesteps:
            raise ValueError(f"reverse diffusion steps must be in 1..{self.timesteps}, got {value}")
        self._steps = int(value)

    def schedule(self, steps: int | None = None) -> list[int]:
        """The DDIM timesteps, from T down: T, T(S-1)/S, ..., T/S."""
        s = self.steps if steps is None else int(steps)
        return [max(1, round(self.timesteps * (s - i) / s)) for i in range(s)]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t - 1].view(-1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def denoise_error(self, ctx: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per item: mean squared error of the x0 prediction from x_t ~ q(x_t | x0) at t (default:
        uniform in 1..T), the denoising objective that gives every step its meaning."""
        x0 = x0.to(ctx.dtype)
        if t is None:
            t = torch.randint(1, self.timesteps + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        pred = self.denoiser(self.q_sample(x0, t, noise), t, ctx)
        return F.mse_loss(pred, x0, reduction="none").flatten(1).mean(1)

    def sample(self, ctx: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from x_T = ``noise`` (default: the stored noise for every
        item) over ``steps`` steps; returns the last step's x0 prediction (B,N,E)."""
        b = ctx.shape[0]
        x = self.noise.to(ctx.dtype).expand(b, -1, -1) if noise is None else noise.to(ctx.dtype)
        ts = self.schedule()
        x0 = x
        for i, t in enumerate(ts):
            x0 = self.denoiser(x, torch.full((b,), t, device=ctx.device, dtype=torch.long), ctx)
            if i + 1 < len(ts):
                a, a_next = self.alphas_cumprod[t - 1], self.alphas_cumprod[ts[i + 1] - 1]
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x0
