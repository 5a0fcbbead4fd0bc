"""The adversarial instance term (spoco_vol.adversarial): the critic's gradient penalty,
what the critic learns, and how the term reaches training."""
import csv
import os

import pytest
import torch
from click.testing import CliRunner

from spoco_vol import checkpoint
from spoco_vol.adversarial import AdversarialTerm, MaskCritic, gradient_penalty, instance_masks
from spoco_vol.cli import cli


class Linear(torch.nn.Module):
    """D(x) = sum(w * x): its gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_is_the_squared_distance_of_the_gradient_norm_from_one():
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    unit = torch.ones(1, 8, 8) / 8.0  # norm 1
    assert float(gradient_penalty(Linear(unit), real, fake).detach()) == pytest.approx(0.0, abs=1e-10)
    assert float(gradient_penalty(Linear(3 * unit), real, fake).detach()) == pytest.approx(4.0)  # (3 - 1)^2


def test_the_critic_learns_real_masks_from_soft_ones():
    """Binary discs (real) against blurred, faded copies (soft): after a few hundred steps
    the critic scores the real ones higher."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    real = torch.stack([((yy - c) ** 2 + (xx - c) ** 2 < 49).float() for c in (10, 16, 22)])[:, None]
    soft = 0.6 * torch.nn.functional.avg_pool2d(real, 5, 1, 2) + 0.1
    term = AdversarialTerm(2, weight=1.0, device="cpu", lr=1e-3)
    for _ in range(200):
        term.critic_step(soft, real)
    assert float(term.critic(real).mean().detach()) > float(term.critic(soft).mean().detach()) + 0.5


def test_the_embeddings_get_the_gradient_and_the_critic_does_not():
    torch.manual_seed(0)
    emb = torch.randn(1, 4, 16, 16, requires_grad=True)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 2:8, 2:8], labels[0, 9:15, 9:15] = 1, 2
    soft, real = instance_masks(emb, labels, 0.5, 0.9)
    assert soft.shape == real.shape == (2, 1, 16, 16) and set(real.unique().tolist()) == {0.0, 1.0}
    term = AdversarialTerm(2, weight=0.5, device="cpu")
    loss = term.embedding_loss(soft)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.critic.parameters()) and all(p.requires_grad for p in
                                                                        term.critic.parameters())
    assert isinstance(term.critic, MaskCritic)


def test_training_with_the_term_logs_it_and_resumes_exactly(blob_volume, tmp_path):
    raw, labels = blob_volume
    tiny = ["--raw", raw, "--labels", labels, "--dims", "2", "--patch-shape", "32,32", "--batch-size", "2",
            "--features", "4,8", "--val-every", "2", "--quiet", "--no-amp", "--iterations", "4",
            "--adversarial-weight", "0.1"]
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert CliRunner().invoke(cli, ["train", *tiny, "--out", straight]).exit_code == 0
    assert CliRunner().invoke(cli, ["train", *tiny, "--out", split, "--stop-after", "2"]).exit_code == 0
    assert CliRunner().invoke(cli, ["train", *tiny, "--out", split, "--resume"]).exit_code == 0
    rows = list(csv.DictReader(open(os.path.join(straight, "log.csv"))))
    assert all(r["adversarial"] for r in rows)
    a, b = (checkpoint.load(os.path.join(d, "latest.pt")) for d in (straight, split))
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    off = str(tmp_path / "off")
    no_term = [t for t in tiny if t not in ("--adversarial-weight", "0.1")]
    assert CliRunner().invoke(cli, ["train", *no_term, "--out", off]).exit_code == 0
    assert not any(r["adversarial"] for r in csv.DictReader(open(os.path.join(off, "log.csv"))))
