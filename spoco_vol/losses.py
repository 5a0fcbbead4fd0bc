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
- PositiveUnlabeledLoss  (for the foreground classifier, spoco_vol.foreground) nnPU:
                     annotated pixels are positives, unlabeled ones a mixture with a
                     known share of positives.
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


def item_objects(embeddings: Tensor, labels: Tensor, ignore_label: Optional[int]) -> list:
    """[(E,N) embeddings, (N,) labels, object statistics] of each batch item. SpocoLoss
    computes them once for all its terms (each would otherwise gather the annotated
    pixels again: on a GPU, kernel launches and host syncs are what a term costs)."""
    e, lab = _flat(embeddings, labels)
    return [(e[b], lab[b], _objects(e[b], lab[b], ignore_label)) for b in range(e.shape[0])]


def _batch_mean(embeddings: Tensor, labels: Tensor, ignore_label: Optional[int],
                item_loss: Callable[[Tensor, Tensor, _Objects], Optional[Tensor]],
                items: Optional[list] = None) -> Tensor:
    """Mean over items (not the sum, nor the last item); None/no objects -> 0 with grad.
    ``items``: item_objects(embeddings, labels, ignore_label), if already computed."""
    items = item_objects(embeddings, labels, ignore_label) if items is None else items
    zero = embeddings.sum() * 0
    losses = []
    for e, lab, obj in items:
        value = item_loss(e, lab, obj) if len(obj.counts) else None
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

    def forward(self, embeddings: Tensor, labels: Tensor, items: Optional[list] = None) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item, items)


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

    def forward(self, embeddings: Tensor, labels: Tensor, items: Optional[list] = None) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item, items)


class RegularizerLoss(nn.Module):
    def __init__(self, ignore_label: Optional[int] = 0):
        super().__init__()
        self.ignore_label = ignore_label

    def forward(self, embeddings: Tensor, labels: Tensor, items: Optional[list] = None) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, lambda e, lab, obj: obj.mu.norm(dim=1).mean(), items)


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

    def forward(self, embeddings: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None,
                items: Optional[list] = None) -> Tensor:
        generator = generator if generator is not None else self.generator

        def item(e, lab, obj):
            anchors = obj.mu if self.anchor == "mean" else self._pixel_anchors(obj, generator)
            # masks over ALL pixels of the item: unlabeled pixels near an anchor are penalised
            s = _soft_mask(torch.cdist(anchors, e.t(), compute_mode=_CDIST) ** 2, self.delta_v, self.threshold)
            own = s[:, obj.mask].gather(0, obj.inv[None]).squeeze(0)
            inter = obj.counts.new_zeros(len(obj.counts)).index_add_(0, obj.inv, own)
            return (1 - 2 * inter / ((s * s).sum(1) + obj.counts + _EPS)).mean()

        return _batch_mean(embeddings, labels, self.ignore_label, item, items)


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

    def forward(self, embeddings: Tensor, labels: Tensor, items: Optional[list] = None) -> Tensor:
        return _batch_mean(embeddings, labels, self.ignore_label, self._item, items)


def _sq_dist_to_pixels(xt: Tensor, xn2: Tensor, idx: Tensor) -> Tensor:
    """(B,A,N) squared distances from pixels idx (B,A) of each item to all its pixels;
    xt (B,N,E) pixel-major embeddings, xn2 (B,N) their squared norms. One batched
    matrix product (may dip slightly below 0 by cancellation)."""
    xa = xt.gather(1, idx[..., None].expand(-1, -1, xt.shape[2]))
    return xn2[:, None, :] - 2 * (xa @ xt.transpose(1, 2)) + xn2.gather(1, idx)[..., None]


class ConsistencyLoss(nn.Module):
    def __init__(self, delta_v: float = 0.5, threshold: float = 0.9, max_anchors: int = 20,
                 stop_fraction: float = 0.05, ignore_label: Optional[int] = 0):
        super().__init__()
        self.delta_v, self.threshold, self.ignore_label = delta_v, threshold, ignore_label
        self.max_anchors, self.stop_fraction = max_anchors, stop_fraction

    @torch.no_grad()
    def _anchors(self, ft: Tensor, gt: Tensor, fn2: Tensor, gn2: Tensor, region: Tensor,
                 generator) -> Tuple[Tensor, Tensor]:
        """Anchor pixels of each item (ft, gt: (B,N,E); region: (B,N)), drawn one after
        the other: each uniformly among the item's region pixels that no earlier anchor
        covers (within delta_v of it in both spaces), until max_anchors or until less
        than stop_fraction of the item's pixels is left uncovered.

        Returns (B,A) pixel indices and (B,A) bool, whether each was drawn (an item's
        drawn anchors come first). Uniform draws come from one random ranking of each
        item's pixels (the best-ranked uncovered pixel is a uniform draw among the
        uncovered ones), all items advance together and the stopping rule is carried as
        a flag: on a GPU, a host sync or a kernel launch per anchor and item would cost
        far more than the anchor's arithmetic.
        """
        b, n = region.shape
        rank = torch.stack([_randperm(n, generator, region.device) for _ in range(b)]) + 1
        pixel = torch.arange(n, device=region.device)
        r2 = self.delta_v ** 2
        remaining, alive = region.clone(), region.any(1)
        picks, drawn = [], []
        for _ in range(self.max_anchors):
            p = (rank * remaining).argmax(1)  # (B,)
            take = alive & remaining.gather(1, p[:, None]).squeeze(1)
            df2 = _sq_dist_to_pixels(ft, fn2, p[:, None])[:, 0]
            dg2 = _sq_dist_to_pixels(gt, gn2, p[:, None])[:, 0]
            # p itself always counts as covered: progress even if the two spaces disagree at p
            covered = ((df2 < r2) & (dg2 < r2)) | (pixel == p[:, None])
            remaining &= ~(covered & take[:, None])
            alive = take & (remaining.sum(1) >= self.stop_fraction * n)
            picks.append(p)
            drawn.append(take)
            if not region.is_cuda and not alive.any():  # no device to wait for: stop early
                break
        picks, drawn = torch.stack(picks, 1), torch.stack(drawn, 1)
        used = int(drawn.sum(1).max())  # one sync: drop the columns no item drew
        return picks[:, :used], drawn[:, :used]

    def forward(self, f_embeddings: Tensor, g_embeddings: Tensor, labels: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
        if f_embeddings.shape != g_embeddings.shape:
            raise SpocoInputError(f"f {tuple(f_embeddings.shape)} and g {tuple(g_embeddings.shape)} differ")
        f, lab = _flat(f_embeddings, labels)
        g = g_embeddings.detach().reshape(f.shape)  # g is the target: never gets gradient
        # full supervision: every pixel is a region pixel
        region = torch.ones_like(lab, dtype=torch.bool) if self.ignore_label is None else lab == self.ignore_label
        # Pixel-major copies and squared norms: all anchors' masks are then one batched
        # matrix product; reducing (E, N) over E directly is ~20x slower on CPU.
        ft, gt = f.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()
        fn2, gn2 = (ft * ft).sum(2), (gt * gt).sum(2)
        anchors, drawn = self._anchors(ft.detach(), gt, fn2.detach(), gn2, region, generator)
        zero = f_embeddings.sum() * 0
        if anchors.shape[1] == 0:
            return zero

        def masks(xt, xn2):  # (B,A,N) soft masks around the anchors
            return _soft_mask(_sq_dist_to_pixels(xt, xn2, anchors).clamp(min=0), self.delta_v, self.threshold)

        dice = _dice(masks(ft, fn2), masks(gt, gn2))  # (B,A)
        # each item: the mean over its drawn anchors; an item without any contributes 0
        per_item = (dice * drawn).sum(1) / drawn.sum(1).clamp(min=1)
        return per_item.mean() + zero


def masked_mode(x: Tensor, mask: Tensor, radius: float, steps: int = 10) -> Tensor:
    """The densest point of each item's embeddings x (B,E,N) over its pixels in mask
    (B,N), as (B,E): their median, then mean-shift steps over the points within
    ``radius``, so a minority cluster cannot pull it off. An empty mask gives NaN.

    All items at once, as mat-vecs, without copies or host syncs (an empty
    neighbourhood keeps the centre): on a GPU the launches are the cost.
    """
    center = torch.where(mask[:, None], x, float("nan")).nanmedian(dim=2).values
    sq = (x * x).sum(1)
    inside = mask.to(x.dtype)
    for _ in range(steps):
        d2 = sq - 2 * (center[:, None, :] @ x).squeeze(1) + (center * center).sum(1, keepdim=True)
        near = (d2 < radius ** 2).to(x.dtype) * inside
        count = near.sum(1, keepdim=True)
        center = torch.where(count > 0, (x @ near[..., None]).squeeze(2) / count.clamp(min=1), center)
    return center


def embedding_mode(x: Tensor, radius: float, steps: int = 10) -> Tensor:
    """The densest point of (N,E) embeddings (see masked_mode)."""
    return masked_mode(x.t()[None], torch.ones(1, len(x), dtype=torch.bool, device=x.device), radius, steps)[0]


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

    def pseudo_masks(self, g: Tensor, u: Tensor) -> Tensor:
        """(B,N) bool: unlabeled pixels (u, (B,N)) whose g embedding (B,E,N) is at the
        background mode of their item."""
        g = g.float()
        center = masked_mode(g, u, self.radius)
        return u & (((g - center[..., None]) ** 2).sum(1) < self.radius ** 2)

    def pseudo_mask(self, g: Tensor, u: Tensor) -> Tensor:
        """pseudo_masks of one item: g (E,N), u (N,)."""
        return self.pseudo_masks(g[None], u[None])[0]

    def forward(self, f_embeddings: Tensor, g_embeddings: Tensor, labels: Tensor,
                items: Optional[list] = None) -> Tensor:
        """``items``: item_objects(f_embeddings, labels, self.ignore_label), if already computed."""
        if f_embeddings.shape != g_embeddings.shape:
            raise SpocoInputError(f"f {tuple(f_embeddings.shape)} and g {tuple(g_embeddings.shape)} differ")
        f, lab = _flat(f_embeddings, labels)
        g = g_embeddings.detach().reshape(f.shape)
        zero = f_embeddings.sum() * 0
        u = lab == self.ignore_label
        bg = self.pseudo_masks(g, u)
        # items with too few unlabeled or background pixels contribute 0
        valid = (u.sum(1) >= self.min_pixels) & (bg.sum(1) >= self.min_pixels)
        w = (bg & valid[:, None]).to(f.dtype)
        n_bg = w.sum(1).clamp(min=1)
        mu = (f @ w[..., None]).squeeze(2) / n_bg[:, None]  # (B,E) the pseudo-object's mean
        # clamp before the root: its gradient at 0 would be inf (times the hinge's 0: NaN)
        d = ((f - mu[..., None]) ** 2).sum(1).clamp(min=1e-12).sqrt()
        pull = (((d - self.delta_v).clamp(min=0) ** 2) * w).sum(1) / n_bg
        push = []
        items = item_objects(f_embeddings, labels, self.ignore_label) if items is None else items
        for b, (_, _, obj) in enumerate(items):
            if not len(obj.counts):
                push.append(zero)
                continue
            dist = (obj.mu - mu[b]).norm(dim=1)
            push.append(((2 * self.delta_d - dist).clamp(min=0) ** 2).mean())
        return ((pull + torch.stack(push)) * valid).mean() + zero


class SpocoLoss(nn.Module):
    def __init__(self, mode: str = "sparse", delta_v: float = 0.5, delta_d: float = 2.0, threshold: float = 0.9,
                 pull_weight: float = 1.0, push_weight: float = 1.0, reg_weight: float = 0.001,
                 instance_weight: float = 1.0, unlabeled_weight: float = 1.0, consistency_weight: float = 1.0,
                 anchor: str = "mean", background_weight: float = 0.0, background_radius: Optional[float] = None):
        super().__init__()
        if mode not in ("sparse", "full"):
            raise ValueError(f"mode must be 'sparse' or 'full', got {mode!r}")
        self.mode = mode
        ignore = 0 if mode == "sparse" else None
        self.weights = dict(pull=pull_weight, push=push_weight, reg=reg_weight, instance=instance_weight,
                            unlabeled=unlabeled_weight if mode == "sparse" else 0.0, consistency=consistency_weight,
                            background=background_weight if mode == "sparse" else 0.0)
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
        # the object statistics of each item, shared by the terms that use them
        items = item_objects(f_embeddings, labels, self.pull.ignore_label)
        compute = dict(
            pull=lambda: self.pull(f_embeddings, labels, items),
            push=lambda: self.push(f_embeddings, labels, items),
            reg=lambda: self.reg(f_embeddings, labels, items),
            instance=lambda: self.instance(f_embeddings, labels, generator, items),
            unlabeled=lambda: self.unlabeled(f_embeddings, labels, items),
            consistency=lambda: self.consistency(f_embeddings, g_embeddings, labels, generator),
            # sparse mode only: the same ignore label (0) as the other terms
            background=lambda: self.background(f_embeddings, g_embeddings, labels, items),
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


class PositiveUnlabeledLoss(nn.Module):
    """Non-negative PU risk (Kiryo et al., NeurIPS 2017) of per-pixel object logits, with
    the sigmoid loss, object and background weighted equally.

    Annotated pixels (label > 0) are positives. Unlabeled pixels (label 0) are a mixture:
    a share ``prior`` of them belongs to unannotated objects. The background risk is
    estimated from the unlabeled pixels minus that share of the positives. The estimate
    can fall below 0 once the network memorises the few annotated objects; nnPU then
    ascends it instead (the returned value is its negation), which stops the
    memorisation.
    """

    def __init__(self, prior: float):
        super().__init__()
        if not 0.0 <= prior < 1.0:
            raise SpocoInputError(f"the object share of the unlabeled pixels must be in [0, 1), got {prior}")
        self.prior = float(prior)

    def risks(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(object risk, background risk estimate); logits and labels of one shape."""
        z, lab = logits.float().reshape(-1), labels.reshape(-1)
        pos, unl = lab > 0, lab == 0
        zero = z.sum() * 0
        # sigmoid loss: l(z, +1) = sigmoid(-z), l(z, -1) = sigmoid(z)
        pos_as_obj = torch.sigmoid(-z[pos]).mean() if pos.any() else zero
        pos_as_bg = torch.sigmoid(z[pos]).mean() if pos.any() else zero
        unl_as_bg = torch.sigmoid(z[unl]).mean() if unl.any() else zero
        return pos_as_obj, (unl_as_bg - self.prior * pos_as_bg) / (1 - self.prior)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.shape != labels.shape:
            raise SpocoInputError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
        obj, bg = self.risks(logits, labels)
        return obj + bg if bool(bg >= 0) else -bg


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
    # one fused update over all parameters (a launch per tensor is what costs on a GPU)
    g_params = list(gp.values())
    torch._foreach_mul_(g_params, momentum)
    torch._foreach_add_(g_params, [fp[name].detach() for name in gp], alpha=1.0 - momentum)
    for name, buf in gb.items():  # running statistics follow f directly
        buf.copy_(fb[name])


TEACHERS = ("momentum", "shared", "dropout", "separate")


class ConsistencyTeacher:
    """Where the consistency term's target embeddings g come from: the variants of the
    paper's ablation.

    - ``momentum`` (the default): g is a copy of f that follows it by an exponential
      moving average and receives no gradient;
    - ``shared``: g is f itself (shared weights), on the g branch's augmented input,
      without gradient;
    - ``dropout``: as ``shared``, with f built with dropout (spoco_vol.model.UNet
      ``dropout``), which stays active in the g pass, so g is f with other units dropped;
    - ``separate``: g is a second network of f's architecture, initialised
      independently and trained on the same batches with the same loss minus the
      consistency term, by its own optimizer; f is pulled towards it.
    ``embeddings(x)`` gives g's embeddings (no gradient), ``after_step`` updates g.
    """

    def __init__(self, variant: str, f: nn.Module, momentum: float = 0.999, build=None, optimizer=None,
                 loss: Optional[nn.Module] = None, ramp: bool = False):
        if variant not in TEACHERS:
            raise SpocoInputError(f"--consistency-network must be one of {', '.join(TEACHERS)}, got {variant!r}")
        self.variant, self.f, self.momentum, self.ramp = variant, f, momentum, ramp
        self.g = None
        if variant == "momentum":
            self.g = make_momentum_network(f)
        elif variant == "separate":
            if build is None or optimizer is None or loss is None:
                raise ValueError("a separately trained g needs a network builder, an optimizer factory and a loss")
            self.g = build()
            self.optimizer = optimizer(self.g)
            self.loss = loss

    @property
    def keeps_a_network(self) -> bool:
        """Whether g has weights of its own (to save, resume and use for clustering)."""
        return self.g is not None

    def network(self) -> nn.Module:
        return self.g if self.g is not None else self.f

    def embeddings(self, forward, x: Tensor) -> Tensor:
        """g's embeddings of ``x``; ``forward(net, x)`` runs a network (device, precision)."""
        with torch.no_grad():
            return forward(self.network(), x).float()

    def momentum_at(self, step: int) -> float:
        """g's momentum after f's ``step``-th update (1-based): m, or with the ramp
        min(m, 1 - 1/(step + 1)), which makes g the plain mean of f's iterates
        f_0..f_step until m takes over (Tarvainen & Valpola, mean teacher): a constant m
        leaves m^step of f's initial weights in g."""
        return min(self.momentum, 1.0 - 1.0 / (step + 1)) if self.ramp else self.momentum

    def after_step(self, forward=None, x: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None, step: int = 0) -> Optional[float]:
        """Update g after f's ``step``-th update: the moving average, or (separate) one
        step of g's own training on the batch ``x``/``labels``; returns that step's loss."""
        if self.variant == "momentum":
            update_momentum_network(self.f, self.g, self.momentum_at(step))
        elif self.variant == "separate":
            total, _ = self.loss(forward(self.g, x).float(), labels, generator=generator)
            self.optimizer.step(total)
            return float(total.detach())
        return None
