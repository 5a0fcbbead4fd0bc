"""The training loop shared by the embedding network (training.py) and the foreground
classifier (foreground.py): batches to tensors, mixed precision, the optimiser step with
loss scaling, the learning-rate schedule, the iteration range with its checkpoint
iterations, the progress bar and the walltime stop.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch

from .inference import autocast_context, autocast_dtype


def to_batch(raws: np.ndarray, device, channels: int = 1) -> torch.Tensor:
    """Normalised patches (B, *spatial) -> (B, 1, *spatial) on ``device``; with several
    channels they are (B, C, *spatial) already."""
    return torch.from_numpy(np.ascontiguousarray(raws if channels > 1 else raws[:, None])).to(device)


def forward(net, x: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    """The network's output under the device's mixed precision (inference.autocast_dtype)."""
    with autocast_context(device, amp):
        return net(x)


def interior(t: torch.Tensor, margins) -> torch.Tensor:
    """``t`` without ``margins[i]`` pixels at both ends of its last len(margins) axes
    (embeddings (B, E, *spatial) and labels (B, *spatial) alike)."""
    if not any(margins):
        return t
    lead = t.ndim - len(margins)
    return t[(slice(None),) * lead + tuple(slice(m, t.shape[lead + i] - m) for i, m in enumerate(margins))]


class Optimization:
    """Adam, its learning-rate schedule (cosine to ``lr * eta_ratio``, or halving on a
    validation-loss plateau) and, under fp16 autocast (GPUs without bf16), loss scaling:
    fp16 underflows small gradients unless the loss is scaled."""

    def __init__(self, net, *, lr: float, weight_decay: float, schedule: str, iterations: int,
                 device: torch.device, amp: bool, eta_ratio: float = 0.01, eta_min: float | None = None):
        self.schedule = schedule
        self.opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and autocast_dtype(device) == torch.float16)
        if schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.opt, T_max=max(1, iterations), eta_min=lr * eta_ratio if eta_min is None else eta_min)
        else:
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.5, patience=4)

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, update the weights, advance a cosine schedule."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.schedule == "cosine":
            self.sched.step()

    def validated(self, val_loss: float | None) -> None:
        """A plateau schedule follows the validation loss."""
        if self.schedule == "plateau" and val_loss is not None:
            self.sched.step(val_loss)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def run(iterations: int, step: Callable[[int, bool], dict], *, every: int, start: int = 0,
        progress: bool = False, desc: str = "train", stop_after: int | None = None) -> tuple[int, bool]:
    """Iterations ``start + 1 .. iterations``: ``step(it, due)`` trains one, where
    ``due`` marks a checkpoint iteration (every ``every``-th, and the last: validate,
    keep the best), and returns the loss values shown (as running means) beside the
    progress bar. With ``stop_after`` the run stops after that many iterations of this
    call (a walltime-limited job; the caller saves a resumable state). Returns the last
    iteration run and whether it stopped early."""
    from tqdm import tqdm
    bar = tqdm(total=iterations, initial=start, disable=not progress, file=sys.stderr, dynamic_ncols=True, desc=desc)
    running: dict[str, float] = {}
    it = start
    try:
        for it in range(start + 1, iterations + 1):
            values = step(it, it % every == 0 or it == iterations) or {}
            for k, v in values.items():
                running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
            bar.update(1)
            if stop_after is not None and it - start >= stop_after and it < iterations:
                return it, True
    finally:
        bar.close()
    return it, False
