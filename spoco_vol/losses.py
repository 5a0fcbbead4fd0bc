"""SPOCO embedding losses: Wolny, Yu, Pape, Kreshuk, "Sparse Object-level Supervision for
Instance Segmentation with Pixel Embeddings", CVPR 2022 (arXiv 2103.14572).

Embeddings are (B,E,Y,X) or (B,E,Z,Y,X), labels (B,Y,X) or (B,Z,Y,X) of integer dtype.
``ignore_label`` (0 by default) marks unlabeled pixels (positive-unlabeled setting);
``ignore_label=None`` makes label 0 an ordinary object (full supervision).

- PullLoss           L_var: pixels within delta_v of their object's mean embedding.
- PushLoss           L_dist: object means at least 2*delta_d apart.
- RegularizerLoss    L_reg: mean norm of the object means.
- InstanceDiceLoss   L_inst: Dice between the soft mask exp(-||e_i-a_k||^2/s) around an
                     anchor a_k of object k (s chosen so the mask is t at distance
                     delta_v) and the object's ground-truth mask: the differentiable
                     instance selection.
- UnlabeledPushLoss  L_U: unlabeled pixels at least delta_d from every object mean.
- ConsistencyLoss    L_cons: Dice between soft masks around the same anchor pixel in the
                     f space and in the (detached) momentum network's g space.
- PseudoBackgroundLoss  (an addition, sparse mode only, off by default) the unlabeled
                     pixels at the mode of the momentum network's embeddings form one
                     pseudo-object: pulled together, pushed from every annotated object.
- SpocoLoss          the weighted sum; make_momentum_network / update_momentum_network
                     keep g as the exponential moving average of f.

Every batch loss is the mean over batch items; an item without objects contributes 0.
"""
import copy
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from spoco_vol.errors import SpocoInputError

_EPS = 1e-6
# cdist's matmul shortcut loses precision (cancellation) exactly where distances are small
_CDIST = "donot_use_mm_for_euclid_dist"


def _check(embeddings: Tensor, labels: Tensor) -> None:
    if embeddings.dim() not in (4, 5):
        raise SpocoInputError(f"embeddings must be (B,E,Y,X) or (B,E,Z,Y,X), got {tuple(embeddings.shape)}")
    if tuple(labels.shape) != tuple(embeddings.shape[:1] + embeddings.shape[2:]):
        raise SpocoInputError(f"labels {tuple(labels.shape)} do not match embeddings {tuple(embeddings.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise SpocoInputError(f"labels must have an integer dtype, got {labels.dtype}")


def _flat(embeddings: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    _check(embeddings, labels)
    b, e = embeddings.shape[:2]
    return embeddings.reshape(b, e, -1), labels.reshape(b, -1).to(embeddings.device, torch.long)


def _unlabeled(lab: Tensor, ignore_label: Optional[int]) -> Tensor:
    if ignore_label is None:
        return torch.zeros_like(lab, dtype=torch.bool)
    return lab == ignore_label


def _randperm(n: int, generator: Optional[torch.Generator], device) -> Tensor:
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _soft_mask(sq_dist: Tensor, delta_v: float, threshold: float) -> Tensor:
    # s = delta_v^2 / ln(1/t) puts the mask value at exactly t on the delta_v sphere
    return torch.exp(-sq_dist * (math.log(1.0 / threshold) / delta_v ** 2))


class _Objects(NamedTuple):
    mask: Tensor    # (N,) annotated pixels
    inv: Tensor     # (M,) object index of each annotated pixel
    counts: Tensor  # (C,) pixels per object
    mu: Tensor      # (C,E) object means
    x: Tensor       # (M,E) annotated-pixel embeddings


def _consecutive(lab: Tensor) -> Tuple[int, Tensor]:
    """(number of distinct labels, label -> 0..C-1 in sorted order)."""
    # torch.unique(return_inverse=True) sorts and is ~10x slower than a bincount remap
    if lab.numel() and lab.min() >= 0 and lab.max() < 4 * lab.numel() + 65536:
        present = torch.bincount(lab) > 0
        return int(present.sum()), (present.cumsum(0) - 1)[lab]
    ids, inv = torch.unique(lab, return_inverse=True)
    return len(ids), inv


def _objects(e: Tensor, lab: Tensor, ignore_label: Optional[int]) -> _Objects:
    """Per-item object statistics from flattened (E,N) embeddings and (N,) labels."""
    mask = ~_unlabeled(lab, ignore_label)
    x = e[:, mask].t()
    c, inv = _consecutive(lab[mask])
    counts = torch.bincount(inv, minlength=c).to(e.dtype)
    mu = x.new_zeros(c, e.shape[0]).index_add_(0, inv, x) / counts[:, None]
    return _Objects(mask, inv, counts, mu, x)


def _batch_mean(embeddings: Tensor, labels: Tensor, ignore_label: Optional[int],
                item_loss: Callable[[Tensor, Tensor, _Objects], Optional[Tensor]]) -> Tensor:
    """Mean over items (not the sum, nor the last item); None/no objects -> 0 with grad."""
    e, lab = _flat(embeddings, labels)
    zero = embeddings.sum() * 0
    losses = []
    for b in range(e.shape[0]):
        obj = _objects(e[b], lab[b], ignore_label)
        value = item_loss(e[b], lab[b], obj) if len(obj.counts) else None
        losses.append(zero if value is None else value)
    return torch.stack(losses).mean()


def _dice(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    return 1 - 2 * (a * b).sum(dim) / ((a * a).sum(dim) + (b * b).sum(dim) + _EPS)


class PullLoss(nn.Module):
    def __init__(self, delta_v: float = 0.5, ignore_label: Optional[int] = 0):
        super().__init__()
        self.delta_v, self.ignore_label = delta_v, ignore_label

    def _item(self, e, lab, obj):
        d = (obj.x - obj.mu[obj.inv]).norm(dim=1)
        hinge = (d - self.delta_v).clamp(min=0) ** 2
        return (obj.mu.new_zeros(len(obj.counts)).index_add_(0, obj.inv, hinge) / obj.counts).mean()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item)


class PushLoss(nn.Module):
    def __init__(self, delta_d: float = 2.0, ignore_label: Optional[int] = 0):
        super().__init__()
        self.delta_d, self.ignore_label = delta_d, ignore_label

    def _item(self, e, lab, obj):
        c = len(obj.counts)
        if c < 2:
            return None
        d = torch.cdist(obj.mu, obj.mu, compute_mode=_CDIST)
        off_diagonal = ~torch.eye(c, dtype=torch.bool, device=d.device)
        return ((2 * self.delta_d - d[off_diagonal]).clamp(min=0) ** 2).mean()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item)


class RegularizerLoss(nn.Module):
    def __init__(self, ignore_label: Optional[int] = 0):
        super().__init__()
        self.ignore_label = ignore_label

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, lambda e, lab, obj: obj.mu.norm(dim=1).mean())


class InstanceDiceLoss(nn.Module):
    def __init__(self, delta_v: float = 0.5, threshold: float = 0.9, ignore_label: Optional[int] = 0,
                 anchor: str = "mean", generator: Optional[torch.Generator] = None):
        super().__init__()
        if anchor not in ("mean", "pixel"):
            raise ValueError(f"anchor must be 'mean' or 'pixel', got {anchor!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.delta_v, self.threshold, self.ignore_label = delta_v, threshold, ignore_label
        self.anchor, self.generator = anchor, generator

    def _pixel_anchors(self, obj: _Objects, generator) -> Tensor:
        # one random pixel per object; the paper draws it among pixels within delta_v of
        # the mean, so those outrank the rest (unique ranks: no ties to break)
        m = len(obj.inv)
        near = (obj.x - obj.mu[obj.inv]).detach().norm(dim=1) < self.delta_v
        rank = _randperm(m, generator, obj.inv.device) + near.long() * m
        best = torch.full_like(obj.counts, -1, dtype=torch.long).scatter_reduce(0, obj.inv, rank, "amax")
        pix = (rank == best[obj.inv]).nonzero().squeeze(1)
        idx = torch.zeros_like(best).scatter_(0, obj.inv[pix], pix)
        return obj.x[idx]

    def forward(self, embeddings: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        generator = generator if generator is not None else self.generator

        def item(e, lab, obj):
            anchors = obj.mu if self.anchor == "mean" else self._pixel_anchors(obj, generator)
            # masks over ALL pixels of the item: unlabeled pixels near an anchor are penalised
            s = _soft_mask(torch.cdist(anchors, e.t(), compute_mode=_CDIST) ** 2, self.delta_v, self.threshold)
            own = s[:, obj.mask].gather(0, obj.inv[None]).squeeze(0)
            inter = obj.counts.new_zeros(len(obj.counts)).index_add_(0, obj.inv, own)
            return (1 - 2 * inter / ((s * s).sum(1) + obj.counts + _EPS)).mean()

        return _batch_mean(embeddings, labels, self.ignore_label, item)


class UnlabeledPushLoss(nn.Module):
    def __init__(self, delta_d: float = 2.0, ignore_label: Optional[int] = 0):
        super().__init__()
        self.delta_d, self.ignore_label = delta_d, ignore_label

    def _item(self, e, lab, obj):
        u = _unlabeled(lab, self.ignore_label)
        if not u.any():
            return None
        d = torch.cdist(e[:, u].t(), obj.mu, compute_mode=_CDIST)
        # every object sees the same |U| pixels, so 1/C sum_k 1/|U| sum_i is the plain mean
        return ((self.delta_d - d).clamp(min=0) ** 2).mean()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item)


class ConsistencyLoss(nn.Module):
    def __init__(self, delta_v: float = 0.5, threshold: float = 0.9, max_anchors: int = 20,
                 stop_fraction: float = 0.05, ignore_label: Optional[int] = 0):
        super().__init__()
        self.delta_v, self.threshold, self.ignore_label = delta_v, threshold, ignore_label
        self.max_anchors, self.stop_fraction = max_anchors, stop_fraction

    def _item(self, f: Tensor, g: Tensor, region: Tensor, generator) -> Optional[Tensor]:
        n = region.numel()
        remaining = region.clone()
        losses = []
        gen_device = generator.device if generator is not None else "cpu"
        # Pixel-major copies and squared norms: each anchor then costs one mat-vec;
        # reducing (E, N) over E directly is ~20x slower on CPU.
        ft, gt = f.t().contiguous(), g.t().contiguous()
        fn2, gn2 = (ft * ft).sum(1), (gt * gt).sum(1)
        while remaining.any() and len(losses) < self.max_anchors:
            candidates = remaining.nonzero().squeeze(1)
            p = candidates[torch.randint(len(candidates), (1,), generator=generator, device=gen_device).item()]
            df2 = (fn2 - 2 * (ft @ ft[p]) + fn2[p]).clamp(min=0)
            dg2 = (gn2 - 2 * (gt @ gt[p]) + gn2[p]).clamp(min=0)
            mf = _soft_mask(df2, self.delta_v, self.threshold)
            mg = _soft_mask(dg2, self.delta_v, self.threshold)
            losses.append(_dice(mf, mg))
            covered = (df2.detach() < self.delta_v ** 2) & (dg2 < self.delta_v ** 2)
            remaining &= ~covered
            remaining[p] = False  # guarantees progress even if the two spaces disagree at p
            if remaining.sum() < self.stop_fraction * n:
                break
        return torch.stack(losses).mean() if losses else None

    def forward(self, f_embeddings: Tensor, g_embeddings: Tensor, labels: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
        if f_embeddings.shape != g_embeddings.shape:
            raise SpocoInputError(f"f {tuple(f_embeddings.shape)} and g {tuple(g_embeddings.shape)} differ")
        f, lab = _flat(f_embeddings, labels)
        g = g_embeddings.detach().reshape(f.shape)  # g is the target: never gets gradient
        zero = f_embeddings.sum() * 0
        losses = []
        for b in range(f.shape[0]):
            region = torch.ones_like(lab[b], dtype=torch.bool)  # full supervision: every pixel
            if self.ignore_label is not None:
                region = lab[b] == self.ignore_label
            value = self._item(f[b], g[b], region, generator)
            losses.append(zero if value is None else value)
        return torch.stack(losses).mean()


def embedding_mode(x: Tensor, radius: float, steps: int = 10) -> Tensor:
    """The densest point of (N,E) embeddings: their median, then mean-shift steps over
    the points within ``radius``, so a minority cluster cannot pull it off."""
    center = x.median(dim=0).values
    for _ in range(steps):
        near = x[(x - center).norm(dim=1) < radius]
        if len(near) == 0:
            break
        center = near.mean(dim=0)
    return center


class PseudoBackgroundLoss(nn.Module):
    """Background as a pseudo-object in the positive-unlabeled setting.

    Nothing in L_U or L_cons asks the unlabeled background to form ONE cluster, so the
    Mutex Watershed breaks it into fragments. In EM, background is most of the unlabeled
    region: the unlabeled pixels whose momentum-network (g) embedding lies within
    ``radius`` of the mode of g over the unlabeled region are taken as background. Their
    f embeddings are pulled to their mean (hinge delta_v), and that mean is pushed
    2*delta_d from every annotated object's mean. g (detached, slow-moving) chooses the
    pixels, so the choice does not chase f. Unannotated objects that look like annotated
    ones sit far from the mode and are left alone.
    """

    def __init__(self, delta_v: float = 0.5, delta_d: float = 2.0, radius: Optional[float] = None,
                 ignore_label: int = 0, min_pixels: int = 16):
        super().__init__()
        self.delta_v, self.delta_d = delta_v, delta_d
        self.radius = delta_d if radius is None else radius
        self.ignore_label, self.min_pixels = ignore_label, min_pixels

    def pseudo_mask(self, g: Tensor, u: Tensor) -> Tensor:
        """(N,) bool: unlabeled pixels (u) whose g embedding (E,N) is at the background mode."""
        gu = g[:, u].t().float()
        center = embedding_mode(gu, self.radius)
        mask = torch.zeros_like(u)
        mask[u] = (gu - center).norm(dim=1) < self.radius
        return mask

    def forward(self, f_embeddings: Tensor, g_embeddings: Tensor, labels: Tensor) -> Tensor:
        if f_embeddings.shape != g_embeddings.shape:
            raise SpocoInputError(f"f {tuple(f_embeddings.shape)} and g {tuple(g_embeddings.shape)} differ")
        f, lab = _flat(f_embeddings, labels)
        g = g_embeddings.detach().reshape(f.shape)
        zero = f_embeddings.sum() * 0
        losses = []
        for b in range(f.shape[0]):
            u = lab[b] == self.ignore_label
            if u.sum() < self.min_pixels:
                losses.append(zero)
                continue
            bg = self.pseudo_mask(g[b], u)
            if bg.sum() < self.min_pixels:
                losses.append(zero)
                continue
            x = f[b][:, bg].t()
            mu = x.mean(dim=0)
            pull = (((x - mu).norm(dim=1) - self.delta_v).clamp(min=0) ** 2).mean()
            obj = _objects(f[b], lab[b], self.ignore_label)
            push = zero
            if len(obj.counts):
                d = (obj.mu - mu).norm(dim=1)
                push = ((2 * self.delta_d - d).clamp(min=0) ** 2).mean()
            losses.append(pull + push)
        return torch.stack(losses).mean()


class SpocoLoss(nn.Module):
    def __init__(self, mode: str = "sparse", delta_v: float = 0.5, delta_d: float = 2.0, threshold: float = 0.9,
                 w_pull: float = 1.0, w_push: float = 1.0, w_reg: float = 0.001, w_instance: float = 1.0,
                 w_unlabeled: float = 1.0, w_consistency: float = 1.0, anchor: str = "mean",
                 w_background: float = 0.0, background_radius: Optional[float] = None):
        super().__init__()
        if mode not in ("sparse", "full"):
            raise ValueError(f"mode must be 'sparse' or 'full', got {mode!r}")
        self.mode = mode
        ignore = 0 if mode == "sparse" else None
        self.weights = dict(pull=w_pull, push=w_push, reg=w_reg, instance=w_instance,
                            unlabeled=w_unlabeled if mode == "sparse" else 0.0, consistency=w_consistency,
                            background=w_background if mode == "sparse" else 0.0)
        self.pull = PullLoss(delta_v, ignore)
        self.push = PushLoss(delta_d, ignore)
        self.reg = RegularizerLoss(ignore)
        self.instance = InstanceDiceLoss(delta_v, threshold, ignore, anchor)
        self.unlabeled = UnlabeledPushLoss(delta_d, ignore)
        self.consistency = ConsistencyLoss(delta_v, threshold, ignore_label=ignore)
        self.background = PseudoBackgroundLoss(delta_v, delta_d, radius=background_radius)

    def forward(self, f_embeddings: Tensor, labels: Tensor, g_embeddings: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Returns (total, terms); terms holds each computed WEIGHTED term, detached.
        Terms with weight 0 (and consistency/background without g) are skipped and absent."""
        compute = dict(
            pull=lambda: self.pull(f_embeddings, labels),
            push=lambda: self.push(f_embeddings, labels),
            reg=lambda: self.reg(f_embeddings, labels),
            instance=lambda: self.instance(f_embeddings, labels, generator),
            unlabeled=lambda: self.unlabeled(f_embeddings, labels),
            consistency=lambda: self.consistency(f_embeddings, g_embeddings, labels, generator),
            background=lambda: self.background(f_embeddings, g_embeddings, labels),
        )
        total = f_embeddings.sum() * 0
        terms: Dict[str, Tensor] = {}
        for name, fn in compute.items():
            w = self.weights[name]
            if w == 0 or (name in ("consistency", "background") and g_embeddings is None):
                continue
            value = w * fn()
            terms[name] = value.detach()
            total = total + value
        return total, terms


def make_momentum_network(f: nn.Module) -> nn.Module:
    """A frozen copy of f to be used as the momentum (teacher) network g."""
    g = copy.deepcopy(f)
    for p in g.parameters():
        p.requires_grad_(False)
        p.grad = None
    return g


@torch.no_grad()
def update_momentum_network(f: nn.Module, g: nn.Module, momentum: float = 0.999) -> None:
    """theta_g <- m*theta_g + (1-m)*theta_f: g moves toward f, f is untouched."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    fp, gp = dict(f.named_parameters()), dict(g.named_parameters())
    fb, gb = dict(f.named_buffers()), dict(g.named_buffers())
    if fp.keys() != gp.keys() or fb.keys() != gb.keys():
        raise ValueError("f and g must have the same architecture")
    for name, p in gp.items():
        p.mul_(momentum).add_(fp[name].detach(), alpha=1.0 - momentum)
    for name, buf in gb.items():  # running statistics follow f directly
        buf.copy_(fb[name])
