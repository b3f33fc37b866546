"""The diffusion-based class prompt encoder (E_P) of AutoMedSAM.

Input: a MedSAM image embedding F (B,256,64,64) and class ids c. Output: a sparse prompt
embedding (B,2,256), the stand-in for the two corner tokens a box would give, a dense
prompt embedding (B,256,64,64), the stand-in for SAM's mask prompt, and a presence logit
(B,) saying whether the class is in the slice at all.

Forward diffusion perturbs F over T steps with Gaussian noise and the class map phi(c);
a U-Net-like reverse network (stride 1, 64x64 throughout) with a shared encoder and two
decoder branches (dense: spatial attention, sparse: channel attention) turns the noisy,
class-conditioned embedding into prompts.

Where the paper is silent the choices are ours (see the bundle's docs), all switchable:

* ``schedule``: ``"linear"`` (DDPM variance schedule, default), ``"cosine"``, or
  ``"additive"`` (the authors' x <- x + eps_t/(t+1) + phi(c)); the closed form of q(x_t|x_0)
  is used, so the T steps cost nothing.
* training draws t uniformly in 1..T and fresh noise (the reverse network learns every noise
  level); eval uses t = ``eval_step`` (default T/10: a light perturbation) and a fixed noise
  tensor stored with the weights, so the same input gives the same output bit for bit. The
  model's ``sample`` draws N noises instead and reports the mean mask and its spread.
* ``layout``: ``"authors"`` (the class enters at the U-Net input: nothing is shared between
  classes) or ``"shared_trunk"`` (the class-independent trunk runs once per slice and the
  class enters at the bottleneck and in the attention gates).
* ``use_diffusion=False`` (ablation): no noise, the class map goes straight to the branches.
* ``branches``: ("dense", "sparse"), or one of them (the other prompt is SAM's "no prompt").
* ``presence`` (ours, not the paper's): a small head that says whether the class is in the slice
  at all, used to blank its mask. ``presence=False`` builds no head and answers "present" for
  every item (``PRESENT_LOGIT``), so masks are ungated; train it without the ``presence`` loss term.
* ``reverse_steps`` (ours): 0 or 1 (default) is the one-pass model above; S >= 2 samples the sparse
  prompt by an S-step reverse diffusion (DDIM from a stored noise, conditioned on the sparse
  branch's tokens, the class and the bottleneck) trained to denoise towards the ground-truth box's
  SAM tokens (:mod:`automedsam.reverse_diffusion`; ``reverse``: its keyword arguments). Dense
  prompt and presence stay one-pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine", "additive")
# the presence logit of an item known to be present (a user's box or point, or no presence head)
PRESENT_LOGIT = 20.0
LAYOUTS = ("authors", "shared_trunk")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions (stride 1) with GroupNorm and SiLU.

    When its input is a concatenation of a per-item part and a per-slice part (a skip connection
    from the class-independent trunk), the first convolution splits by linearity:
    ``conv(cat[a, s]) = conv_a(a) + conv_s(s)``. :meth:`shared` computes the per-slice term once
    and :meth:`forward_split` adds it to each item's own term, so classes asked of the same slice
    do not repeat it.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.SiLU(),
        )

    def shared(self, x: torch.Tensor, channels: slice) -> torch.Tensor:
        """The first convolution's response to input ``channels`` (bias included), from ``x``."""
        conv = self[0]
        return F.conv2d(x, conv.weight[:, channels], conv.bias, padding=conv.padding)

    def forward_split(self, x: torch.Tensor, channels: slice, shared: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The block on the concatenation of ``x`` (input ``channels``) and the per-slice part whose
        term is ``shared`` (from :meth:`shared`); ``owner[i]`` is item i's row of ``shared``."""
        conv = self[0]
        y = F.conv2d(x, conv.weight[:, channels], None, padding=conv.padding) + shared.index_select(0, owner)
        for layer in list(self)[1:]:
            y = layer(y)
        return y


class SpatialAttention(nn.Module):
    """Gate features by a per-pixel weight from the features and the class map (1x1 conv)."""

    def __init__(self, ch: int):
        super().__init__()
        self.gate = nn.Conv2d(ch + 1, 1, 1)

    def forward(self, x: torch.Tensor, class_map: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(torch.cat([x, class_map], 1)))


class ChannelAttention(nn.Module):
    """Squeeze-and-excite style gate: global pooling, 1x1 convs, sigmoid, conditioned on the class."""

    def __init__(self, ch: int, cond_dim: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(ch + cond_dim, ch // reduction, 1), nn.SiLU(), nn.Conv2d(ch // reduction, ch, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean((2, 3), keepdim=True), cond[:, :, None, None]], 1)
        return x * torch.sigmoid(self.fc(pooled))


class Branch(nn.Module):
    """One decoder branch: attention on the middle features, two skip-connected up blocks."""

    def __init__(self, c1: int, c2: int, out_ch: int, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.up2 = ConvBlock(c2 + c2, c2)
        self.up1 = ConvBlock(c2 + c1, c1)
        self.out = nn.Conv2d(c1, out_ch, 1)

    def shared(self, skip2: torch.Tensor, skip1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip connections' terms of both up blocks: once per slice."""
        c2 = skip2.shape[1]
        return self.up2.shared(skip2, slice(c2, None)), self.up1.shared(skip1, slice(c2, None))

    def forward(self, mid, shared: tuple[torch.Tensor, torch.Tensor], owner: torch.Tensor, cond_arg):
        """``mid`` and ``cond_arg`` per item; ``shared`` from :meth:`shared`, row ``owner[i]`` for item i."""
        c2 = mid.shape[1]
        x = self.attention(mid, cond_arg)
        x = self.up2.forward_split(x, slice(0, c2), shared[0], owner)
        x = self.up1.forward_split(x, slice(0, c2), shared[1], owner)
        return self.out(x)


@dataclass
class Prompts:
    sparse: torch.Tensor  # (B, 2, 256)
    dense: torch.Tensor  # (B, 256, 64, 64)
    presence_logit: torch.Tensor  # (B,)
    # the items that ``sparse`` and ``dense`` belong to (rows of ``presence_logit``); None: all of
    # them. Inference may skip the branches of items judged absent, whose masks are blanked anyway.
    rows: torch.Tensor | None = None
    # reverse diffusion, training with box targets: per item, the denoiser's squared error (B,)
    denoise_error: torch.Tensor | None = None


def class_items(n: int, class_ids, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class for each of ``n`` embeddings, class-major within each: (owner, class id) per item."""
    ids = torch.as_tensor(class_ids if torch.is_tensor(class_ids) else list(class_ids), device=device).long().reshape(-1)
    return torch.arange(n, device=device).repeat_interleave(ids.numel()), ids.repeat(n)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


class DiffusionClassPromptEncoder(nn.Module):
    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 256,
        embedding_size: int = 64,
        channels: tuple[int, int] = (64, 128),
        class_dim: int = 128,
        timesteps: int = 100,
        schedule: str = "linear",
        eval_step: int | None = None,
        use_diffusion: bool = True,
        layout: str = "authors",
        branches: tuple[str, ...] = ("dense", "sparse"),
        no_mask_embed: torch.Tensor | None = None,
        noise_seed: int = 0,
        embedding_scale: float = 8.0,
        presence: bool = True,
        reverse_steps: int = 0,
        reverse: dict | None = None,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got '{schedule}'")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
        branches = tuple(branches)
        if not branches or any(b not in ("dense", "sparse") for b in branches):
            raise ValueError(f"branches must be a non-empty subset of ('dense', 'sparse'), got {branches}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.size = embedding_size
        self.timesteps = timesteps
        self.schedule = schedule
        self.eval_step = max(1, timesteps // 10) if eval_step is None else eval_step
        self.use_diffusion = use_diffusion
        self.layout = layout
        self.branches = branches
        # MedSAM embeddings have std ~0.1; scale them to ~unit variance before adding unit noise
        # (the same role as latent diffusion's scale factor)
        self.embedding_scale = embedding_scale
        c1, c2 = channels

        # class conditioning: a learned table -> a 64x64 class map and a class vector
        self.class_embed = nn.Embedding(num_classes, class_dim)
        self.class_map = nn.Linear(class_dim, embedding_size * embedding_size)
        self.time_embed = nn.Sequential(nn.Linear(class_dim, class_dim), nn.SiLU(), nn.Linear(class_dim, class_dim))

        in_ch = embed_dim + (1 if layout == "authors" else 0)
        self.enc1 = ConvBlock(in_ch, c1)
        self.enc2 = ConvBlock(c1, c2)
        self.mid = ConvBlock(c2 + (1 if layout == "shared_trunk" else 0), c2)
        self.film = nn.Linear(class_dim, 2 * c2)  # class (and step) modulation of the bottleneck

        if "dense" in branches:
            self.dense_branch = Branch(c1, c2, embed_dim, SpatialAttention(c2))
            nn.init.zeros_(self.dense_branch.out.weight)
            nn.init.zeros_(self.dense_branch.out.bias)
        if "sparse" in branches:
            self.sparse_branch = Branch(c1, c2, embed_dim, ChannelAttention(c2, class_dim))
            self.token_pool = nn.Conv2d(embed_dim, 2, 1)  # two attention-pooled tokens
        self.presence_head = nn.Sequential(nn.Linear(c2 + class_dim, class_dim), nn.SiLU(),
                                           nn.Linear(class_dim, 1)) if presence else None
        self.reverse = None  # one-pass sparse prompt; else the S-step reverse diffusion
        if int(reverse_steps) >= 2:
            if "sparse" not in branches:
                raise ValueError("reverse_steps >= 2 diffuses the sparse prompt: it needs the 'sparse' branch")
            from .reverse_diffusion import SparseReverseDiffusion

            self.reverse = SparseReverseDiffusion(embed_dim, class_dim + c2, int(reverse_steps), **(reverse or {}))
        elif int(reverse_steps) < 0:
            raise ValueError(f"reverse_steps must be >= 0 (0 or 1: one pass), got {reverse_steps}")

        # SAM's "no mask" embedding: the dense prompt starts as what SAM uses without a mask
        nma = torch.zeros(embed_dim) if no_mask_embed is None else no_mask_embed.detach().reshape(embed_dim).clone()
        self.register_buffer("no_mask_embed", nma)
        self.register_buffer("alphas_cumprod", self._alphas_cumprod(schedule, timesteps))
        g = torch.Generator().manual_seed(noise_seed)
        self.register_buffer("eval_noise", torch.randn(embed_dim, embedding_size, embedding_size, generator=g))

    @staticmethod
    def _alphas_cumprod(schedule: str, T: int) -> torch.Tensor:
        if schedule == "linear":  # DDPM's beta range over T steps (alpha_bar_T ~ 0.36 at T = 100)
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
            return torch.cumprod(1 - betas, 0).float()
        if schedule == "cosine":
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            return (f[1:] / f[0]).clamp(min=1e-5).float()
        # additive (authors): x_t = x_0 + sum_{k<t} eps_k/(k+1); variance of the sum, kept in the same buffer
        return torch.cumsum(1.0 / torch.arange(1, T + 1, dtype=torch.float64) ** 2, 0).float()

    # ---- forward diffusion -------------------------------------------------------------
    def diffuse(self, x0: torch.Tensor, cmap: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0, c) in closed form: the T-step chain at no extra cost."""
        idx = (t - 1).clamp(0, self.timesteps - 1)
        a = self.alphas_cumprod[idx].view(-1, 1, 1, 1)
        if self.schedule == "additive":
            return x0 + a.sqrt() * noise + t.view(-1, 1, 1, 1).float() * cmap / self.timesteps
        return a.sqrt() * x0 + (1 - a).sqrt() * noise + cmap

    def _steps_and_noise(self, x: torch.Tensor, noise: torch.Tensor | None, t: torch.Tensor | None):
        b = x.shape[0]
        if t is None:
            if self.training:
                t = torch.randint(1, self.timesteps + 1, (b,), device=x.device)
            else:
                t = torch.full((b,), self.eval_step, device=x.device, dtype=torch.long)
        if noise is None:
            noise = torch.randn_like(x) if self.training else self.eval_noise.to(x.dtype).expand_as(x)
        return t, noise

    def grow_classes(self, n: int) -> None:
        """Enlarge the class table to ``n`` classes: the existing rows are kept bit for bit, the new
        rows start at the mean of the old ones (a neutral class, to be taught). Never shrinks."""
        old = self.class_embed
        n = int(n)
        if n < old.num_embeddings:
            raise ValueError(f"the class table has {old.num_embeddings} rows; cannot shrink it to {n}")
        if n == old.num_embeddings:
            return
        new = nn.Embedding(n, old.embedding_dim).to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = old.weight.mean(0, keepdim=True)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.class_embed = new
        self.num_classes = n

    # ---- reverse network ---------------------------------------------------------------
    def check_class_ids(self, class_ids: torch.Tensor) -> None:
        if class_ids.numel() and (class_ids.min() < 1 or class_ids.max() > self.num_classes):
            raise ValueError(f"class ids must be in 1..{self.num_classes}, got {class_ids.tolist()}")

    def condition(self, class_ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class vector (with the step embedding) and class map (B,1,64,64)."""
        self.check_class_ids(class_ids)
        vec = self.class_embed(class_ids - 1)
        cmap = self.class_map(vec).view(-1, 1, self.size, self.size)
        if self.use_diffusion:
            vec = vec + self.time_embed(_timestep_embedding(t, vec.shape[1]))
        return vec, cmap

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-independent part of the shared-trunk layout: run once per slice."""
        s1 = self.enc1(x)
        return s1, self.enc2(s1)

    def heads(self, s1, s2, vec, cmap, owner: torch.Tensor | None = None, skip_absent: bool = False,
              x0: torch.Tensor | None = None, reverse_noise: torch.Tensor | None = None) -> Prompts:
        """Prompts per item. ``s1``, ``s2``: the trunk's features per slice; ``vec``, ``cmap``: the class
        condition per item; ``owner[i]``: item i's slice (default: one item per slice). What comes
        from the trunk alone (the skip connections' convolution terms) is computed once per slice.
        ``skip_absent``: run the branches only for items whose presence logit is > 0 (``rows`` of
        the result); for inference, where the others' masks are blanked whatever the branches say.
        With the reverse diffusion: ``x0`` (B,2,256), per item, the box tokens to learn to denoise to
        (training; gives ``denoise_error``), ``reverse_noise`` (B,2,256) its x_T (default: fresh
        noise in training, the stored noise in eval)."""
        c2 = s2.shape[1]
        if owner is None:
            owner = torch.arange(vec.shape[0], device=vec.device)
        if self.layout == "shared_trunk":  # mid sees cat[s2, cmap]: s2's term once per slice
            mid = self.mid.forward_split(cmap, slice(c2, None), self.mid.shared(s2, slice(0, c2)), owner)
        else:
            mid = self.mid(s2.index_select(0, owner))
        gamma, beta = self.film(vec).chunk(2, 1)
        mid = mid * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        if self.presence_head is not None:
            presence = self.presence_head(torch.cat([mid.mean((2, 3)), vec], 1)).squeeze(1)
        else:
            presence = mid.new_full((mid.shape[0],), PRESENT_LOGIT)
        rows = None
        if skip_absent:
            rows = torch.nonzero(presence > 0).squeeze(1)
            mid, vec, cmap, owner = mid[rows], vec[rows], cmap[rows], owner[rows]
            x0 = None if x0 is None else x0[rows]
            reverse_noise = None if reverse_noise is None else reverse_noise[rows]
        b = mid.shape[0]
        if "dense" in self.branches:
            shared = self.dense_branch.shared(s2, s1)
            dense = self.dense_branch(mid, shared, owner, cmap) + self.no_mask_embed.view(1, -1, 1, 1)
        else:
            dense = self.no_mask_embed.view(1, -1, 1, 1).expand(b, -1, self.size, self.size)
        if "sparse" in self.branches:
            feats = self.sparse_branch(mid, self.sparse_branch.shared(s2, s1), owner, vec)  # (B,256,64,64)
            attn = self.token_pool(feats).flatten(2).softmax(-1)  # (B,2,HW)
            sparse = torch.einsum("bkn,bcn->bkc", attn, feats.flatten(2))
        else:
            sparse = mid.new_zeros(b, 0, self.embed_dim)
        denoise_error = None
        if self.reverse is not None:  # the sparse branch's tokens condition the reverse chain
            ctx = self.reverse.denoiser.context(sparse, torch.cat([vec, mid.mean((2, 3))], 1))
            if x0 is not None:
                denoise_error = self.reverse.denoise_error(ctx, x0)
            if reverse_noise is None and self.training:
                reverse_noise = torch.randn(b, *self.reverse.noise.shape, device=ctx.device, dtype=ctx.dtype)
            sparse = self.reverse.sample(ctx, reverse_noise)
        return Prompts(sparse=sparse, dense=dense, presence_logit=presence, rows=rows, denoise_error=denoise_error)

    def forward(self, embeddings: torch.Tensor, class_ids: torch.Tensor, noise: torch.Tensor | None = None,
                t: torch.Tensor | None = None, skip_absent: bool = False, x0: torch.Tensor | None = None,
                reverse_noise: torch.Tensor | None = None) -> Prompts:
        """Prompts for one class per embedding; ``x0``, ``reverse_noise``: see :meth:`heads`."""
        class_ids = torch.as_tensor(class_ids, device=embeddings.device).long().reshape(-1)
        if class_ids.numel() != embeddings.shape[0]:
            raise ValueError(f"need one class id per embedding: {class_ids.numel()} ids, {embeddings.shape[0]} embeddings")
        x = embeddings.float() * self.embedding_scale
        t, noise = self._steps_and_noise(x, noise, t)
        vec, cmap = self.condition(class_ids, t)
        if self.use_diffusion:
            x = self.diffuse(x, cmap if self.layout == "authors" else torch.zeros_like(cmap), t, noise)
        if self.layout == "authors":
            x = torch.cat([x, cmap], 1)
        s1, s2 = self.trunk(x)
        return self.heads(s1, s2, vec, cmap, skip_absent=skip_absent, x0=x0, reverse_noise=reverse_noise)

    def forward_classes(self, embeddings: torch.Tensor, class_ids: list[int] | torch.Tensor,
                        noise: torch.Tensor | None = None, skip_absent: bool = False) -> Prompts:
        """Prompts for every class in ``class_ids`` for each embedding; output batch is B*K, class-major
        within each embedding. ``skip_absent``: see :meth:`heads`."""
        owner, ids = class_items(embeddings.shape[0], class_ids, embeddings.device)
        return self.prompts_for(embeddings, owner, ids, noise=noise, skip_absent=skip_absent)

    def prompts_for(self, embeddings: torch.Tensor, owner: torch.Tensor, class_ids: torch.Tensor,
                    noise: torch.Tensor | None = None, skip_absent: bool = False,
                    reverse_noise: torch.Tensor | None = None) -> Prompts:
        """Prompts for items: item i asks for class ``class_ids[i]`` of embedding ``owner[i]`` (noise, if
        given, per embedding; ``reverse_noise``, if given, per item: see :meth:`heads`). The
        shared-trunk layout runs its trunk (and the skip connections' terms) once per embedding, the
        authors' layout everything once per item."""
        if self.layout == "authors":
            return self(embeddings.index_select(0, owner), class_ids,
                        noise=None if noise is None else noise.index_select(0, owner), skip_absent=skip_absent,
                        reverse_noise=reverse_noise)
        x = embeddings.float() * self.embedding_scale
        t, noise = self._steps_and_noise(x, noise, None)
        if self.use_diffusion:
            x = self.diffuse(x, torch.zeros_like(x[:, :1]), t, noise)
        s1, s2 = self.trunk(x)
        vec, cmap = self.condition(class_ids, t.index_select(0, owner))
        return self.heads(s1, s2, vec, cmap, owner=owner, skip_absent=skip_absent, reverse_noise=reverse_noise)
