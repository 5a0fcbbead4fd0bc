"""Tests for spoco_vol.losses, including the known bugs of the reference implementations
(torch-em / kreshuklab spoco): `loss += loss` batching, a gradient-free instance Dice,
label 0 pulled in sparse mode, an inverted EMA, weights that never reach the loss."""
import math

import pytest
import torch
from torch import nn

from spoco_vol.errors import SpocoInputError
from spoco_vol.losses import (PositiveUnlabeledLoss, 
    ConsistencyLoss, InstanceDiceLoss, PseudoBackgroundLoss, PullLoss, PushLoss, RegularizerLoss, SpocoLoss,
    UnlabeledPushLoss, _objects, _soft_mask, make_momentum_network, update_momentum_network,
)

DV, DD, T = 0.5, 2.0, 0.9
S = DV ** 2 / math.log(1 / T)


# ---------------------------------------------------------------- naive references
def _ref_objects(e, lab, ignore):
    ids = [int(k) for k in torch.unique(lab) if ignore is None or int(k) != ignore]
    return [(k, lab == k, e[:, lab == k].mean(1)) for k in ids]


def ref_pull(e, lab, ignore=0):
    objs = _ref_objects(e, lab, ignore)
    if not objs:
        return 0.0
    return sum(float(((((e[:, m] - mu[:, None]).norm(dim=0) - DV).clamp(min=0)) ** 2).mean())
               for _, m, mu in objs) / len(objs)


def ref_push(e, lab, ignore=0):
    mus = [mu for _, _, mu in _ref_objects(e, lab, ignore)]
    c = len(mus)
    if c < 2:
        return 0.0
    return sum(max(0.0, 2 * DD - float((mus[k] - mus[l]).norm())) ** 2
               for k in range(c) for l in range(c) if k != l) / (c * (c - 1))


def ref_reg(e, lab, ignore=0):
    objs = _ref_objects(e, lab, ignore)
    return sum(float(mu.norm()) for _, _, mu in objs) / len(objs) if objs else 0.0


def ref_instance(e, lab, ignore=0):
    objs = _ref_objects(e, lab, ignore)
    if not objs:
        return 0.0
    total = 0.0
    for _, m, mu in objs:
        s = torch.exp(-((e - mu[:, None]) ** 2).sum(0) / S)
        mf = m.to(e.dtype)
        total += float(1 - 2 * (s * mf).sum() / ((s * s).sum() + (mf * mf).sum() + 1e-6))
    return total / len(objs)


def ref_unlabeled(e, lab, ignore=0):
    objs = _ref_objects(e, lab, ignore)
    u = lab == ignore if ignore is not None else torch.zeros_like(lab, dtype=torch.bool)
    if not objs or not u.any():
        return 0.0
    return sum(float(((DD - (e[:, u] - mu[:, None]).norm(dim=0)).clamp(min=0) ** 2).mean())
               for _, _, mu in objs) / len(objs)


REFS = [(PullLoss, ref_pull), (PushLoss, ref_push), (RegularizerLoss, ref_reg),
        (InstanceDiceLoss, ref_instance), (UnlabeledPushLoss, ref_unlabeled)]


def random_batch(shape=(2, 4, 6, 7), n_labels=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(shape, generator=g, dtype=dtype)
    emb[1:] *= 2  # items with clearly different loss values
    lab = torch.randint(0, n_labels, shape[:1] + shape[2:], generator=g)
    return emb, lab


def ref_batch(ref, emb, lab, ignore=0):
    b, e = emb.shape[:2]
    return sum(ref(emb[i].reshape(e, -1), lab[i].reshape(-1), ignore) for i in range(b)) / b


# ---------------------------------------------------------------- values and batching
@pytest.mark.parametrize("cls,ref", REFS)
@pytest.mark.parametrize("shape", [(2, 4, 6, 7), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("ignore", [0, None])
def test_matches_naive_reference(cls, ref, shape, ignore):
    emb, lab = random_batch(shape)
    loss = cls(ignore_label=ignore)(emb, lab)
    assert loss.item() == pytest.approx(ref_batch(ref, emb, lab, ignore), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("cls", [c for c, _ in REFS])
def test_batch_loss_is_mean_over_items(cls):
    emb, lab = random_batch()
    loss = cls()
    l0, l1 = loss(emb[:1], lab[:1]).item(), loss(emb[1:], lab[1:]).item()
    assert abs(l0 - l1) > 1e-3, "test needs items with different losses"
    both = loss(emb, lab).item()
    assert both == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert both != pytest.approx(l0 + l1, rel=1e-3)      # not a sum
    assert both != pytest.approx(2 * l1, rel=1e-3)       # not torch-em's `loss += loss`


def test_batch_mean_consistency_and_spoco():
    emb, lab = random_batch()
    g_emb = emb + 0.3 * torch.randn_like(emb)
    cons = ConsistencyLoss()
    gen = torch.Generator().manual_seed(3)
    l0 = cons(emb[:1], g_emb[:1], lab[:1], gen).item()
    l1 = cons(emb[1:], g_emb[1:], lab[1:], gen).item()
    both = cons(emb, g_emb, lab, torch.Generator().manual_seed(3)).item()
    assert abs(l0 - l1) > 1e-3
    assert both == pytest.approx((l0 + l1) / 2, rel=1e-6)
    spoco = SpocoLoss()
    t0 = spoco(emb[:1], lab[:1])[0].item()
    t1 = spoco(emb[1:], lab[1:])[0].item()
    assert spoco(emb, lab)[0].item() == pytest.approx((t0 + t1) / 2, rel=1e-6)


@pytest.mark.parametrize("cls", [c for c, _ in REFS])
@pytest.mark.parametrize("shape", [(2, 4, 6, 7), (2, 3, 3, 4, 5)])
def test_item_without_objects_is_zero(cls, shape):
    emb, lab = random_batch(shape, dtype=torch.float32)
    emb.requires_grad_(True)
    lab[1] = 0
    loss = cls()
    both = loss(emb, lab)
    assert torch.isfinite(both)
    assert both.item() == pytest.approx(loss(emb[:1], lab[:1]).item() / 2, rel=1e-5)
    empty = loss(emb, torch.zeros_like(lab))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.isfinite(emb.grad).all() and (emb.grad == 0).all()


def test_push_needs_two_objects():
    emb, lab = random_batch()
    lab[:] = 0
    lab[:, :2] = 5
    assert PushLoss()(emb, lab).item() == 0.0


def test_rejects_bad_input():
    emb, lab = random_batch()
    with pytest.raises(SpocoInputError):
        PullLoss()(emb, lab.double())
    with pytest.raises(SpocoInputError):
        PullLoss()(emb, lab[:, :-1])
    with pytest.raises(SpocoInputError):
        PullLoss()(emb[0], lab[0])


# ---------------------------------------------------------------- hinges and the soft mask
def _two_pixel_item(points, labels):
    emb = torch.tensor(points, dtype=torch.float64).t().reshape(1, len(points[0]), 1, len(points))
    return emb, torch.tensor(labels).reshape(1, 1, -1)


@pytest.mark.parametrize("dist,expected", [(1.0, 9.0), (3.5, 0.25), (4.0, 0.0), (5.0, 0.0)])
def test_push_hinge_at_twice_delta_d(dist, expected):
    emb, lab = _two_pixel_item([[0.0, 0.0], [dist, 0.0]], [1, 2])
    assert PushLoss(DD)(emb, lab).item() == pytest.approx(expected)


def test_unlabeled_push_hinge_at_delta_d():
    # object 1 at the origin; unlabeled pixels at 1.5*delta_d and 0.5*delta_d
    far, near = [1.5 * DD, 0.0], [0.0, 0.5 * DD]
    loss = UnlabeledPushLoss(DD)
    assert loss(*_two_pixel_item([[0.0, 0.0], far], [1, 0])).item() == 0.0
    assert loss(*_two_pixel_item([[0.0, 0.0], near], [1, 0])).item() == pytest.approx((0.5 * DD) ** 2)
    # hinge at delta_d, not 2*delta_d: a pixel at 1.5*delta_d would cost (0.5*delta_d)^2 there
    emb, lab = _two_pixel_item([[0.0, 0.0], far, near], [1, 0, 0])
    assert loss(emb, lab).item() == pytest.approx((0.5 * DD) ** 2 / 2)
    assert UnlabeledPushLoss(DD, ignore_label=None)(emb, lab).item() == 0.0


@pytest.mark.parametrize("t", [0.5, 0.9])
def test_soft_mask_is_threshold_at_delta_v(t):
    assert _soft_mask(torch.tensor(DV ** 2), DV, t).item() == pytest.approx(t)
    assert _soft_mask(torch.tensor(0.0), DV, t).item() == 1.0
    # through the loss: object at the origin, one unlabeled pixel at distance delta_v
    emb, lab = _two_pixel_item([[0.0, 0.0]] * 3 + [[0.0, DV]], [1, 1, 1, 0])
    got = InstanceDiceLoss(DV, t)(emb, lab).item()
    assert got == pytest.approx(1 - 2 * 3 / (3 + t ** 2 + 3 + 1e-6), rel=1e-9)


def test_pull_hinge_at_delta_v():
    # mean at the origin; pixels at distance 0.4, 0.5 (inside) and 0.9 (0.4 beyond)
    emb, lab = _two_pixel_item([[0.4, 0.0], [-0.9, 0.0], [0.5, 0.0]], [1, 1, 1])
    assert PullLoss(DV)(emb, lab).item() == pytest.approx(0.4 ** 2 / 3)


# ---------------------------------------------------------------- gradients
def test_instance_dice_carries_gradient():
    emb, lab = random_batch(dtype=torch.float32)
    emb.requires_grad_(True)
    loss = InstanceDiceLoss()(emb, lab)
    assert loss.requires_grad
    loss.backward()
    assert emb.grad.abs().sum() > 0
    # moving object pixels toward their anchor (mean) makes the masks crisper
    with torch.no_grad():
        e = emb.detach().reshape(2, 4, -1).clone()
        flat = lab.reshape(2, -1)
        for b in range(2):
            for k in torch.unique(flat[b]).tolist():
                if k == 0:
                    continue
                m = flat[b] == k
                mu = e[b][:, m].mean(1, keepdim=True)
                e[b][:, m] = mu + 0.3 * (e[b][:, m] - mu)
        closer = InstanceDiceLoss()(e.reshape(emb.shape), lab)
        stepped = InstanceDiceLoss()(emb - 0.5 * emb.grad / emb.grad.norm(), lab)
    assert closer < loss and stepped < loss


def test_instance_dice_gradcheck():
    emb, lab = random_batch((1, 2, 3, 3), n_labels=3, seed=1)
    emb.requires_grad_(True)
    for anchor in ("mean", "pixel"):
        f = lambda x: InstanceDiceLoss(anchor=anchor)(x, lab, torch.Generator().manual_seed(0))
        assert torch.autograd.gradcheck(f, (emb,))


def test_instance_pixel_anchor():
    emb, lab = random_batch((2, 4, 8, 8), dtype=torch.float32)
    emb.requires_grad_(True)
    loss = InstanceDiceLoss(anchor="pixel")
    a = loss(emb, lab, torch.Generator().manual_seed(1))
    b = loss(emb, lab, torch.Generator().manual_seed(1))
    assert a.item() == b.item()
    assert a.item() != pytest.approx(InstanceDiceLoss()(emb, lab).item(), rel=1e-4)
    a.backward()
    assert emb.grad.abs().sum() > 0
    # the anchor is a pixel of its object and lies within delta_v of the mean where possible
    e = torch.zeros(2, 5)
    e[0, 3] = 0.4
    e[0, 4] = 3.0
    obj = _objects(e, torch.tensor([0, 1, 1, 1, 1]), 0)  # mean x = 0.85: only 0.4 is near
    for seed in range(10):
        anchors = loss._pixel_anchors(obj, torch.Generator().manual_seed(seed))
        assert torch.allclose(anchors, torch.tensor([[0.4, 0.0]]))


def test_label_zero_not_pulled_in_sparse_mode():
    emb, lab = random_batch(dtype=torch.float32)
    zero = lab == 0
    changed = emb.clone()
    changed.permute(0, 2, 3, 1)[zero] = 100 * torch.randn(int(zero.sum()), emb.shape[1])
    for cls in (PullLoss, PushLoss, RegularizerLoss):
        assert cls()(changed, lab).item() == pytest.approx(cls()(emb, lab).item(), rel=1e-6)
    x = emb.clone().requires_grad_(True)
    PullLoss()(x, lab).backward()
    assert (x.grad.permute(0, 2, 3, 1)[zero] == 0).all()
    assert x.grad.permute(0, 2, 3, 1)[~zero].abs().sum() > 0
    # full supervision: background is an ordinary object and is pulled
    assert PullLoss(ignore_label=None)(changed, lab).item() > PullLoss(ignore_label=None)(emb, lab).item() + 1
    x.grad = None
    PullLoss(ignore_label=None)(x, lab).backward()
    assert x.grad.permute(0, 2, 3, 1)[zero].abs().sum() > 0
    full, sparse = SpocoLoss("full"), SpocoLoss("sparse", instance_weight=0, unlabeled_weight=0)
    assert full(changed, lab)[1]["pull"] > full(emb, lab)[1]["pull"] + 1
    assert sparse(changed, lab)[0].item() == pytest.approx(sparse(emb, lab)[0].item(), rel=1e-6)


# ---------------------------------------------------------------- momentum network
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))


def test_ema_moves_g_toward_f():
    f = _net()
    g = make_momentum_network(f)
    assert all(not p.requires_grad for p in g.parameters())
    assert all(p.requires_grad for p in f.parameters())
    with torch.no_grad():  # f moves away (a training step) and updates its BN statistics
        for p in f.parameters():
            p.add_(torch.randn_like(p))
    f(torch.randn(2, 1, 8, 8))
    f_before = {k: v.clone() for k, v in f.state_dict().items()}
    g_before = {k: v.clone() for k, v in g.named_parameters()}
    m = 0.9
    update_momentum_network(f, g, m)
    for name, pf in f.named_parameters():
        pg = dict(g.named_parameters())[name]
        assert torch.allclose(pg - pf, m * (g_before[name] - pf), atol=1e-6)
        assert (pg - pf).norm().item() == pytest.approx(m * (g_before[name] - pf).norm().item(), rel=1e-5)
        assert not pg.requires_grad
    for k, v in f.state_dict().items():
        assert torch.equal(v, f_before[k])  # f untouched (an inverted EMA would move f)
    for (k, bf), (_, bg) in zip(f.named_buffers(), g.named_buffers()):
        assert torch.equal(bf, bg)
    with pytest.raises(ValueError):
        update_momentum_network(f, nn.Conv2d(1, 4, 3), m)


def test_momentum_ramp_makes_g_the_mean_of_fs_iterates():
    """With the ramp, g after step t is the plain mean of f_0..f_t until m takes over, so
    f's initial weights fade as 1/(t+1) and then as m^t; without it they keep m^t."""
    from spoco_vol.losses import ConsistencyTeacher
    torch.manual_seed(0)
    f = nn.Linear(3, 2)
    ramped, constant = ConsistencyTeacher("momentum", f, 0.9, ramp=True), ConsistencyTeacher("momentum", f, 0.9)
    iterates = [f.weight.detach().clone()]
    for t in range(1, 21):
        with torch.no_grad():  # a training step of f
            f.weight.add_(torch.randn_like(f.weight))
        iterates.append(f.weight.detach().clone())
        ramped.after_step(step=t)
        constant.after_step(step=t)
        if t <= 9:  # 1 - 1/(t + 1) <= m = 0.9
            torch.testing.assert_close(ramped.g.weight, torch.stack(iterates).mean(0))
    assert [ramped.momentum_at(t) for t in (1, 3, 9, 10, 100)] == pytest.approx([0.5, 0.75, 0.9, 0.9, 0.9])
    assert constant.momentum_at(1) == 0.9
    # from step 10 on both are EMAs with m: the ramped g is then that EMA started from the mean
    expected = torch.stack(iterates[:10]).mean(0)
    for w in iterates[10:]:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ramped.g.weight, expected)
    assert not torch.allclose(constant.g.weight, expected)


def test_g_gets_no_gradient():
    f, lab = random_batch(dtype=torch.float32)
    g = (f + 0.3 * torch.randn_like(f)).requires_grad_(True)
    f.requires_grad_(True)
    ConsistencyLoss()(f, g, lab, torch.Generator().manual_seed(0)).backward()
    assert g.grad is None or (g.grad == 0).all()
    assert f.grad.abs().sum() > 0
    net_f = _net()
    net_g = make_momentum_network(net_f)
    x = torch.randn(1, 1, 8, 8)
    total, _ = SpocoLoss()(net_f(x), torch.randint(0, 3, (1, 8, 8)), net_g(x), torch.Generator().manual_seed(0))
    total.backward()
    assert all(p.grad is None for p in net_g.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net_f.parameters())


# ---------------------------------------------------------------- consistency
def test_consistency_identical_is_zero_and_deterministic():
    f, lab = random_batch((2, 4, 12, 12), dtype=torch.float32)
    cons = ConsistencyLoss()
    assert cons(f, f.clone(), lab, torch.Generator().manual_seed(0)).item() < 1e-4
    g = f + 0.5 * torch.randn_like(f)
    a = cons(f, g, lab, torch.Generator().manual_seed(7)).item()
    b = cons(f, g, lab, torch.Generator().manual_seed(7)).item()
    assert a == b and a > 0.01
    full = ConsistencyLoss(ignore_label=None)
    assert full(f, g, torch.ones_like(lab), torch.Generator().manual_seed(0)).item() > 0.01
    assert cons(f, g, torch.ones_like(lab)).item() == 0.0  # no unlabeled region


def test_consistency_3d_and_anchor_limit():
    f, lab = random_batch((1, 3, 4, 6, 6), dtype=torch.float32)
    g = f + 0.5 * torch.randn_like(f)
    f.requires_grad_(True)
    loss = ConsistencyLoss()(f, g, lab, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert f.grad.abs().sum() > 0
    # a single anchor reproduces the Dice of the first drawn pixel's masks: the unlabeled
    # pixel ranked first by the generator's random permutation
    one = ConsistencyLoss(max_anchors=1)(f, g, lab, torch.Generator().manual_seed(0)).item()
    ff, gg, u = f.detach().reshape(3, -1), g.reshape(3, -1), lab.reshape(-1) == 0
    rank = torch.randperm(u.numel(), generator=torch.Generator().manual_seed(0))
    p = torch.where(u, rank, -1).argmax()
    mf = torch.exp(-((ff - ff[:, p, None]) ** 2).sum(0) / S)
    mg = torch.exp(-((gg - gg[:, p, None]) ** 2).sum(0) / S)
    expected = 1 - 2 * (mf * mg).sum() / ((mf * mf).sum() + (mg * mg).sum() + 1e-6)
    assert one == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_anchors_cover_the_region_and_the_loss_is_their_mean_dice():
    """Each anchor is an unlabeled pixel no earlier anchor covers (within delta_v in both
    spaces); drawing stops at max_anchors or when less than stop_fraction is uncovered;
    the loss is the mean Dice of the anchors' f and g masks."""
    f, lab = random_batch((1, 2, 16, 16), dtype=torch.float64)
    g = f + 0.2 * torch.randn_like(f)
    lab[0] = 0
    lab[0, :4] = 1
    for max_anchors, stop in ((20, 0.05), (3, 0.0), (20, 0.5)):
        cons = ConsistencyLoss(max_anchors=max_anchors, stop_fraction=stop)
        ft, gt = f[0].reshape(2, -1).t(), g[0].reshape(2, -1).t()
        region = lab.reshape(-1) == 0
        anchors, drawn = cons._anchors(ft[None], gt[None], (ft * ft).sum(1)[None], (gt * gt).sum(1)[None],
                                       region[None], torch.Generator().manual_seed(1))
        anchors = anchors[0][drawn[0]]
        near = lambda x, p: ((x - x[p]) ** 2).sum(1) < 0.25  # delta_v = 0.5
        remaining = region.clone()
        for p in anchors:
            assert remaining[p], "an anchor must be an uncovered unlabeled pixel"
            remaining &= ~(near(ft, p) & near(gt, p))
            remaining[p] = False
        assert len(anchors) == max_anchors or remaining.sum() < stop * region.numel()
        assert len(anchors) >= min(max_anchors, 3)
        mf = torch.stack([torch.exp(-((ft - ft[p]) ** 2).sum(1) / S) for p in anchors])
        mg = torch.stack([torch.exp(-((gt - gt[p]) ** 2).sum(1) / S) for p in anchors])
        dice = 1 - 2 * (mf * mg).sum(1) / ((mf * mf).sum(1) + (mg * mg).sum(1) + 1e-6)
        loss = cons(f, g, lab, torch.Generator().manual_seed(1)).item()
        assert loss == pytest.approx(dice.mean().item(), rel=1e-9)


# ---------------------------------------------------------------- SpocoLoss
WEIGHTS = ["pull", "push", "reg", "instance", "unlabeled", "consistency"]


def _spoco_inputs():
    emb, lab = random_batch(dtype=torch.float64)
    return emb, lab, emb + 0.3 * torch.randn_like(emb)


def test_spoco_terms_and_defaults():
    emb, lab, g = _spoco_inputs()
    total, terms = SpocoLoss()(emb, lab, g, torch.Generator().manual_seed(0))
    assert set(terms) == set(WEIGHTS)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-9)
    assert all(not v.requires_grad for v in terms.values())
    # each default weight reaches its term (spoco: unlabeled weight 0, consistency lost)
    assert terms["unlabeled"].item() == pytest.approx(UnlabeledPushLoss()(emb, lab).item()) and terms["unlabeled"] > 0
    assert terms["consistency"].item() == pytest.approx(
        ConsistencyLoss()(emb, g, lab, torch.Generator().manual_seed(0)).item())
    assert terms["reg"].item() == pytest.approx(0.001 * RegularizerLoss()(emb, lab).item())
    assert "consistency" not in SpocoLoss()(emb, lab)[1]
    full_terms = SpocoLoss("full")(emb, lab, g, torch.Generator().manual_seed(0))[1]
    assert "unlabeled" not in full_terms
    assert full_terms["pull"].item() == pytest.approx(PullLoss(ignore_label=None)(emb, lab).item())
    with pytest.raises(ValueError):
        SpocoLoss("dense")


@pytest.mark.parametrize("name", WEIGHTS)
def test_each_weight_scales_its_term(name):
    emb, lab, g = _spoco_inputs()
    base_total, base = SpocoLoss()(emb, lab, g, torch.Generator().manual_seed(0))
    w = {"reg": 0.001}.get(name, 1.0)
    total2, doubled = SpocoLoss(**{f"{name}_weight": 2 * w})(emb, lab, g, torch.Generator().manual_seed(0))
    assert base[name].item() > 0
    assert doubled[name].item() == pytest.approx(2 * base[name].item(), rel=1e-9)
    assert total2.item() - base_total.item() == pytest.approx(base[name].item(), rel=1e-6)
    for other in WEIGHTS:
        if other != name:
            assert doubled[other].item() == pytest.approx(base[other].item(), rel=1e-9)
    total0, zeroed = SpocoLoss(**{f"{name}_weight": 0})(emb, lab, g, torch.Generator().manual_seed(0))
    assert name not in zeroed
    assert base_total.item() - total0.item() == pytest.approx(base[name].item(), rel=1e-6)


def _separated(shape):
    """Objects at constant, far-apart embeddings; label 0 far from all of them."""
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 4, shape, generator=g)
    centres = torch.tensor([[0.0, 0, 0, 10], [10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    emb = centres[lab].movedim(-1, 1).contiguous()
    return emb, lab


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 3, 6, 6)])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_separated_embedding_is_near_zero_random_is_large(shape, mode):
    emb, lab = _separated(shape)
    loss = SpocoLoss(mode, reg_weight=0)
    total, terms = loss(emb, lab, emb.clone(), torch.Generator().manual_seed(0))
    assert total.item() < 1e-3, terms
    rand = 0.1 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    assert loss(rand, lab, rand.clone(), torch.Generator().manual_seed(0))[0].item() > 0.5
    assert SpocoLoss(mode)(emb, lab)[0].item() < 0.02  # only the tiny regulariser is left


@pytest.mark.parametrize("cls", [c for c, _ in REFS])
def test_label_values_and_dtypes_do_not_matter(cls):
    emb, lab = random_batch()
    expected = cls()(emb, lab).item()
    huge = torch.where(lab > 0, lab * 10 ** 9 + 7, 0)  # sparse ids: the torch.unique path
    for other in (huge, lab.to(torch.int32), lab.to(torch.uint8)):
        assert cls()(emb, other).item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- pseudo-background
def _background_scene(spread=0.0, seed=0):
    """One item 10x10, 2D embeddings padded to 4: an annotated object (label 1) at
    (10,0,0,0); the unlabeled region holds background at the origin (70 px) and an
    unannotated object at (0,10,0,0) (10 px). ``spread`` scatters the background."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(1, 10, 10, dtype=torch.long)
    lab[0, :2] = 1
    emb = torch.zeros(1, 4, 10, 10, dtype=torch.float64)
    emb[0, 0, :2] = 10.0
    emb[0, 1, 9] = 10.0  # the unannotated object: row 9
    bg = torch.zeros(10, 10, dtype=torch.bool)
    bg[2:9] = True
    emb[0, :, bg] += spread * torch.randn(4, int(bg.sum()), generator=g, dtype=torch.float64)
    return emb, lab, bg


def test_pseudo_background_mask_is_the_unlabeled_mode():
    emb, lab, bg = _background_scene(spread=0.3)
    mask = PseudoBackgroundLoss().pseudo_mask(emb[0].reshape(4, -1), lab[0].reshape(-1) == 0)
    # the background pixels, not the annotated object and not the unannotated one
    assert torch.equal(mask.reshape(10, 10), bg)


def test_pseudo_background_selection_radius():
    """Background structures 2.5 from the mode are left out at the default radius
    (delta_d = 2) and taken in at radius 3; the unannotated object (10 away) never is."""
    emb, lab, bg = _background_scene(spread=0.0)
    emb[0, 2, 2] = 2.5  # row 2 of the background: a structure off the mode
    u = lab[0].reshape(-1) == 0
    narrow = PseudoBackgroundLoss().pseudo_mask(emb[0].reshape(4, -1), u).reshape(10, 10)
    wide = PseudoBackgroundLoss(radius=3.0).pseudo_mask(emb[0].reshape(4, -1), u).reshape(10, 10)
    assert not narrow[2].any() and narrow[3:9].all()
    assert torch.equal(wide, bg)
    assert SpocoLoss(background_weight=1.0, background_radius=3.0).background.radius == 3.0


def test_pseudo_background_compact_far_is_zero_spread_is_large():
    emb, lab, _ = _background_scene(spread=0.0)
    assert PseudoBackgroundLoss()(emb, emb.clone(), lab).item() == pytest.approx(0.0, abs=1e-12)
    spread, _, _ = _background_scene(spread=1.0)
    assert PseudoBackgroundLoss()(spread, spread.clone(), lab).item() > 0.05
    near = emb.clone()
    near[0, 0, :2] = 1.0  # the annotated object sits next to the background mode: pushed
    assert PseudoBackgroundLoss()(near, near.clone(), lab).item() > 5


def test_pseudo_background_gradient_reaches_f_not_g_and_g_chooses():
    emb, lab, bg = _background_scene(spread=1.0)
    f = emb.clone().requires_grad_(True)
    g = emb.clone().requires_grad_(True)
    PseudoBackgroundLoss()(f, g, lab).backward()
    assert g.grad is None
    grad = f.grad[0].abs().sum(0)
    assert grad[bg].sum() > 0 and grad[9].sum() == 0  # the unannotated object is left alone
    # the pixels are chosen in g space: a g that puts everything at one point picks all of U
    flat = torch.zeros_like(emb)
    f2 = emb.clone().requires_grad_(True)
    PseudoBackgroundLoss()(f2, flat, lab).backward()
    assert f2.grad[0, :, 9].abs().sum() > 0


def test_pseudo_background_in_spoco_loss():
    emb, lab, g = _spoco_inputs()
    gen = torch.Generator
    on = SpocoLoss(background_weight=1.0)(emb, lab, g, gen().manual_seed(0))[1]
    assert on["background"].item() == pytest.approx(PseudoBackgroundLoss()(emb, g, lab).item())
    twice = SpocoLoss(background_weight=2.0)(emb, lab, g, gen().manual_seed(0))[1]
    assert twice["background"].item() == pytest.approx(2 * on["background"].item())
    assert "background" not in SpocoLoss(background_weight=1.0)(emb, lab)[1]  # needs g
    assert "background" not in SpocoLoss("full", background_weight=1.0)(emb, lab, g, gen().manual_seed(0))[1]
    assert "background" not in SpocoLoss()(emb, lab, g, gen().manual_seed(0))[1]  # off by default


def _pu_scene(prior=0.25, n=400):
    """Labels of n pixels: 40 annotated, the rest unlabeled; a share ``prior`` of the
    unlabeled ones are (unannotated) objects."""
    lab = torch.zeros(n, dtype=torch.long)
    lab[:40] = 1
    hidden = torch.zeros(n, dtype=torch.bool)
    hidden[40:40 + int(prior * (n - 40))] = True
    return lab, hidden


def test_positive_unlabeled_loss_is_lowest_where_the_prior_share_of_unlabeled_is_object():
    lab, hidden = _pu_scene()
    right = torch.where((lab > 0) | hidden, 10.0, -10.0)  # annotated and hidden objects called objects
    loss = PositiveUnlabeledLoss(0.25)
    assert loss(right, lab).item() == pytest.approx(0, abs=1e-3)
    # calling every unlabeled pixel an object, or flipping the hidden ones, costs more
    assert loss(torch.full_like(right, 10.0), lab).item() > 0.5
    assert loss(torch.where(lab > 0, 10.0, -10.0), lab).item() > 0.3
    assert loss(torch.zeros(400), lab).item() > 0.5


def test_positive_unlabeled_loss_never_rewards_a_negative_background_risk():
    """nnPU: calling all unlabeled pixels background makes the background risk estimate
    negative (the prior says some of them are objects); the loss is then that estimate
    negated, positive, and its gradient raises the unlabeled pixels' logits."""
    lab, _ = _pu_scene()
    z = torch.where(lab > 0, 10.0, -10.0).requires_grad_(True)
    loss_fn = PositiveUnlabeledLoss(0.25)
    obj, bg = loss_fn.risks(z, lab)
    assert bg.item() < 0
    loss = loss_fn(z, lab)
    assert loss.item() == pytest.approx(-bg.item())
    # push the unlabeled logits up (toward the hidden objects): the gradient of the
    # sigmoid loss is tiny at -10, so look at a less saturated score
    z2 = torch.where(lab > 0, 3.0, -3.0).requires_grad_(True)
    loss_fn(z2, lab).backward()
    assert (z2.grad[lab == 0] < 0).all()
    with pytest.raises(SpocoInputError):
        PositiveUnlabeledLoss(1.0)
    with pytest.raises(SpocoInputError):
        loss_fn(z, lab[:10])
