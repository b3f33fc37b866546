"""The authors' class prompt encoder, as released (``prompt_encoder#preset: authors``).

A re-implementation of ``DiffusionModel``/``UNet`` in ``AutoMedSAM/class_prompt.py`` of the
authors' public release (HP-ML/AutoPromptMedSAM), kept as one switch so that our own encoder
(:class:`automedsam.prompt_encoder.DiffusionClassPromptEncoder`) can be compared with theirs:

* class conditioning: ``fc_label``, a linear layer on the raw class index (a float), reshaped to a
  64x64 class map; the decoders' attention also sees the raw index as a constant channel;
* forward process: their loop ``for t in T..1: x <- x + eps_t / (t + 1) + phi(c)`` on the raw
  (unscaled) embedding, the whole chain, the class map accumulated at every step (T = 100);
* reverse network: one pass of their U-Net on ``cat[x_T, phi(c)]``: encoder blocks 64 and 128
  channels and a middle block 128 -> 256 -> 128, 3x3 convolutions with ReLU, no normalisation;
  dense branch: a 1x1 convolution of ``cat[middle, index]`` multiplies the middle features;
  sparse branch: global average pooling, 1x1 convolution and a sigmoid (channel attention);
  both decode with skip connections to 256 channels with a final ReLU; the sparse features are
  average-pooled to 2 tokens.

Only the bugs listed in ``shared/paper/METHOD.md`` are fixed: sparse and dense are returned in the
order SAM's decoder takes them, the token pooling keeps the batch axis at batch size 1, and
evaluation uses a fixed noise (the chain's per-step draws from ``noise_seed``, summed once) so the
same input gives the same prompts. The presence head is ours (``presence``, off by default here).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .prompt_encoder import PRESENT_LOGIT, Prompts, class_items


def _convs(*channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def chain_noise_scale(timesteps: int) -> float:
    """Standard deviation of the chain's summed noise, sqrt(sum_{t=1..T} 1/(t+1)^2)."""
    return float(sum(1.0 / (t + 1) ** 2 for t in range(1, timesteps + 1)) ** 0.5)


class AuthorsUNet(nn.Module):
    """The authors' reverse network (their ``UNet``), widths and activations as released."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.enc1 = _convs(in_channels, 64, 64)
        self.enc2 = _convs(64, 128, 128)
        self.middle = _convs(128, 256, 128)
        self.dense_attention = nn.Conv2d(128 + 1, 128, 1)
        self.dense_dec1 = _convs(256, 128, 64)
        self.dense_dec2 = _convs(128, 64, out_channels)
        self.sparse_attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(128 + 1, 128, 1), nn.Sigmoid())
        self.sparse_dec1 = _convs(256, 128, 64)
        self.sparse_dec2 = _convs(128, 64, out_channels)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return e1, e2, self.middle(e2)

    def gated(self, middle: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The middle features under the dense (spatial) and sparse (channel) attention."""
        label = index.float().view(-1, 1, 1, 1).expand(-1, 1, middle.shape[2], middle.shape[3])
        with_label = torch.cat([middle, label], 1)
        return middle * self.dense_attention(with_label), middle * self.sparse_attention(with_label)

    def decode(self, e1, e2, dense_mid, sparse_mid) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.dense_dec2(torch.cat([self.dense_dec1(torch.cat([dense_mid, e2], 1)), e1], 1))
        sparse = self.sparse_dec2(torch.cat([self.sparse_dec1(torch.cat([sparse_mid, e2], 1)), e1], 1))
        return dense, sparse


class AuthorsClassPromptEncoder(nn.Module):
    """The authors' class prompt encoder with the interface of ours (``forward``, ``prompts_for``,
    ``forward_classes``, ``presence_head``), so the rest of AutoMedSAM runs it unchanged.

    Args:
        num_classes: class ids are 1..num_classes (the raw id is what ``fc_label`` sees).
        timesteps: T, the length of the forward chain (theirs: 100).
        use_diffusion: False skips the forward chain (ablation).
        presence: add our presence head (on the dense-gated middle features and the class index).
        noise_seed: seed of the fixed evaluation noise.
    """

    preset = "authors"

    def __init__(self, num_classes: int, embed_dim: int = 256, embedding_size: int = 64, timesteps: int = 100,
                 use_diffusion: bool = True, presence: bool = False, noise_seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.size = embedding_size
        self.timesteps = timesteps
        self.use_diffusion = use_diffusion
        self.fc_label = nn.Linear(1, embedding_size * embedding_size)
        self.unet = AuthorsUNet(embed_dim + 1, embed_dim)
        self.sparse_out = nn.AdaptiveAvgPool2d((2, 1))
        self.presence_head = nn.Sequential(nn.Linear(128 + 1, 64), nn.ReLU(), nn.Linear(64, 1)) if presence else None
        self.noise_seed = noise_seed
        self.reverse = None  # no S-step reverse diffusion of the sparse prompt in the authors' encoder
        self.register_buffer("eval_noise", self._summed_chain_noise(), persistent=False)

    def step_noises(self, shape=None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The chain's per-step draws eps_T, ..., eps_1 (in the loop's order); default: the fixed
        evaluation draws from ``noise_seed``."""
        if generator is None:
            generator = torch.Generator().manual_seed(self.noise_seed)
        shape = shape or (self.embed_dim, self.size, self.size)
        return [torch.randn(shape, generator=generator) for _ in range(self.timesteps)]

    def _summed_chain_noise(self) -> torch.Tensor:
        total = torch.zeros(self.embed_dim, self.size, self.size)
        for t, eps in zip(range(self.timesteps, 0, -1), self.step_noises()):
            total += eps / (t + 1)
        return total

    def check_class_ids(self, class_ids: torch.Tensor) -> None:
        if class_ids.numel() and (class_ids.min() < 1 or class_ids.max() > self.num_classes):
            raise ValueError(f"class ids must be in 1..{self.num_classes}, got {class_ids.tolist()}")

    def class_map(self, class_ids: torch.Tensor) -> torch.Tensor:
        """phi(c): their linear layer on the raw index, as a (B,1,64,64) map."""
        return self.fc_label(class_ids.float().view(-1, 1)).view(-1, 1, self.size, self.size)

    def diffuse(self, x: torch.Tensor, cmap: torch.Tensor, noises=None) -> torch.Tensor:
        """Their forward loop, t = T..1: ``x <- x + eps_t/(t+1) + phi(c)``. ``noises``: the per-step
        draws in the loop's order (default: fresh ones)."""
        for i, t in enumerate(range(self.timesteps, 0, -1)):
            eps = torch.randn_like(x) if noises is None else noises[i].to(x)
            x = x + eps / (t + 1) + cmap
        return x

    def forward(self, embeddings: torch.Tensor, class_ids, noise: torch.Tensor | None = None,
                t: torch.Tensor | None = None, skip_absent: bool = False, x0: torch.Tensor | None = None,
                reverse_noise: torch.Tensor | None = None) -> Prompts:
        """Prompts for one class per embedding. Training runs the chain with fresh draws; evaluation
        adds the fixed draws' sum (the same chain, computed once). ``noise`` (B,C,H,W), standard
        normal: one draw of the chain's summed noise (its scale is applied here), for sampling.
        ``x0``/``reverse_noise`` belong to the S-step reverse diffusion, which this encoder does not
        have (``reverse`` is None): ignored, as the one-pass encoder of ours ignores them."""
        class_ids = torch.as_tensor(class_ids, device=embeddings.device).long().reshape(-1)
        if class_ids.numel() != embeddings.shape[0]:
            raise ValueError(f"need one class id per embedding: {class_ids.numel()} ids, {embeddings.shape[0]} embeddings")
        self.check_class_ids(class_ids)
        x = embeddings.float()
        cmap = self.class_map(class_ids)
        if self.use_diffusion:
            if noise is not None:
                x = x + noise.to(x) * chain_noise_scale(self.timesteps) + self.timesteps * cmap
            elif self.training:
                x = self.diffuse(x, cmap)
            else:
                x = x + self.eval_noise.to(x) + self.timesteps * cmap
        e1, e2, middle = self.unet.trunk(torch.cat([x, cmap], 1))
        dense_mid, sparse_mid = self.unet.gated(middle, class_ids)
        if self.presence_head is not None:
            presence = self.presence_head(torch.cat([dense_mid.mean((2, 3)), class_ids.float()[:, None]], 1)).squeeze(1)
        else:
            presence = x.new_full((x.shape[0],), PRESENT_LOGIT)
        rows = None
        if skip_absent:
            rows = torch.nonzero(presence > 0).squeeze(1)
            e1, e2, dense_mid, sparse_mid = e1[rows], e2[rows], dense_mid[rows], sparse_mid[rows]
        dense, sparse_feats = self.unet.decode(e1, e2, dense_mid, sparse_mid)
        sparse = self.sparse_out(sparse_feats).squeeze(-1).permute(0, 2, 1)  # (B,2,256)
        return Prompts(sparse=sparse, dense=dense, presence_logit=presence, rows=rows)

    def prompts_for(self, embeddings: torch.Tensor, owner: torch.Tensor, class_ids: torch.Tensor,
                    noise: torch.Tensor | None = None, skip_absent: bool = False) -> Prompts:
        """Prompts for items (item i: class ``class_ids[i]`` of embedding ``owner[i]``); nothing is
        shared between the classes of a slice in this layout."""
        return self(embeddings.index_select(0, owner), class_ids,
                    noise=None if noise is None else noise.index_select(0, owner), skip_absent=skip_absent)

    def forward_classes(self, embeddings: torch.Tensor, class_ids, noise: torch.Tensor | None = None,
                        skip_absent: bool = False) -> Prompts:
        owner, ids = class_items(embeddings.shape[0], class_ids, embeddings.device)
        return self.prompts_for(embeddings, owner, ids, noise=noise, skip_absent=skip_absent)
