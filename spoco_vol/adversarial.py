"""The adversarial instance term (the SPOCO paper's appendix A.1), off by default.

A critic learns to tell ground-truth instance masks from the differentiable soft masks
the embeddings select around each annotated object (the masks the instance Dice loss
compares): a Wasserstein GAN with gradient penalty (Gulrajani et al. 2017). The
embedding network is then rewarded, with weight beta (``--adversarial-weight``), for
soft masks the critic takes for real ones: crisp, object-shaped masks.

- critic loss: D(soft) - D(real) + lambda * (||grad D(x_hat)|| - 1)^2, with x_hat a random
  point between a real and a soft mask (lambda = 10, the WGAN-GP default);
- the embedding network's term: -beta * D(soft).
The critic sees masks only (one channel, the patch's shape); it has no normalisation
layers, which the penalty assumes (it is per sample).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

GP_WEIGHT = 10.0
MAX_MASKS = 8  # objects per batch item whose masks the critic sees


class MaskCritic(nn.Module):
    """A small CNN scoring masks (K, 1, *spatial) -> (K,); strided convolutions and
    LeakyReLU, then the mean over space."""

    def __init__(self, dims: int, features=(16, 32, 64)):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers, prev = [], 1
        for f in features:
            layers += [conv(prev, f, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            prev = f
        self.body = nn.Sequential(*layers)
        self.head = conv(prev, 1, 1)

    def forward(self, masks: Tensor) -> Tensor:
        return self.head(self.body(masks)).flatten(1).mean(1)


def instance_masks(embeddings: Tensor, labels: Tensor, delta_v: float, threshold: float,
                   ignore_label: int | None = 0, max_masks: int = MAX_MASKS) -> tuple[Tensor, Tensor]:
    """The soft mask around each annotated object's mean embedding (as the instance term
    makes it; differentiable) and its binary ground-truth mask, for up to ``max_masks``
    objects of each item: (soft, real), both (K, 1, *spatial)."""
    soft, real = [], []
    scale = math.log(1.0 / threshold) / delta_v ** 2
    for e, lab in zip(embeddings, labels):
        ids = torch.unique(lab)
        if ignore_label is not None:
            ids = ids[ids != ignore_label]
        for k in ids[:max_masks]:
            m = lab == k
            mu = e[:, m].mean(1)
            d2 = ((e - mu.view(-1, *([1] * (e.ndim - 1)))) ** 2).sum(0)
            soft.append(torch.exp(-d2 * scale))
            real.append(m.to(e.dtype))
    if not soft:
        empty = embeddings.new_zeros((0, 1, *embeddings.shape[2:]))
        return empty, empty
    return torch.stack(soft)[:, None], torch.stack(real)[:, None]


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean of (||grad D(x_hat)|| - 1)^2 over the masks, x_hat = eps * real + (1 - eps) *
    fake with eps uniform per mask."""
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), generator=generator, device="cpu").to(real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class AdversarialTerm:
    """The critic, its optimizer (Adam, lr 1e-4, betas (0.5, 0.9) as in WGAN-GP) and the
    two losses; ``weight`` is beta."""

    def __init__(self, dims: int, weight: float, device, lr: float = 1e-4):
        self.weight = float(weight)
        self.critic = MaskCritic(dims).to(device)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.5, 0.9))

    def critic_step(self, soft: Tensor, real: Tensor, generator: torch.Generator | None = None) -> float:
        """One update of the critic on masks of the batch (the soft ones detached)."""
        if not len(real):
            return 0.0
        fake = soft.detach().float()
        loss = self.critic(fake).mean() - self.critic(real).mean() + \
            GP_WEIGHT * gradient_penalty(self.critic, real, fake, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def embedding_loss(self, soft: Tensor) -> Tensor:
        """beta * -D(soft): lower when the critic takes the soft masks for real ones. Its
        gradient reaches the embeddings only (the critic's own is dropped)."""
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:
            return -self.weight * self.critic(soft.float()).mean() if len(soft) else soft.sum() * 0
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["critic_optimizer"])
