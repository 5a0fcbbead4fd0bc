"""The block grid of a blockwise run: each block's write ROI (its core) and read ROI
(core plus halo, clipped to the volume), daisy-style. Pure geometry, no I/O."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Sequence

import numpy as np

from .errors import SpocoInputError


@dataclasses.dataclass(frozen=True)
class Block:
    index: tuple[int, ...]          # position in the grid
    linear: int                     # C-order number of the block, the base of its id range
    core: tuple[slice, ...]         # write ROI, volume coordinates
    read: tuple[slice, ...]         # read ROI = core + halo, clipped to the volume

    @property
    def core_in_read(self) -> tuple[slice, ...]:
        """Where the core lies inside the read ROI's array."""
        return tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(self.core, self.read))

    @property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(c.stop - c.start for c in self.core)


class BlockGrid:
    """Blocks of ``block_shape`` tiling ``shape``; the last block along an axis may be smaller.
    A read ROI is the core plus at least ``halo`` per side, clipped to the volume."""

    def __init__(self, shape: Sequence[int], block_shape: Sequence[int], halo: Sequence[int],
                 align: Sequence[int] | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.block_shape = tuple(int(b) for b in block_shape)
        self.halo = tuple(int(h) for h in halo)
        # Read ROIs start on multiples of ``align``: a U-Net with total pooling P is only
        # shift-equivariant for shifts by multiples of P, so a block read from an
        # unaligned origin would see different pooled features than the whole volume.
        self.align = tuple(int(a) for a in align) if align is not None else (1,) * len(self.shape)
        if not (len(self.shape) == len(self.block_shape) == len(self.halo)):
            raise SpocoInputError(f"block shape {self.block_shape} and halo {self.halo} need "
                                  f"{len(self.shape)} values for a {len(self.shape)}D volume")
        if any(b < 1 for b in self.block_shape) or any(h < 0 for h in self.halo):
            raise SpocoInputError("block shape must be positive and halo non-negative")
        self.grid_shape = tuple(-(-s // b) for s, b in zip(self.shape, self.block_shape))

    def __len__(self) -> int:
        return int(np.prod(self.grid_shape))

    def block(self, index: Sequence[int]) -> Block:
        index = tuple(int(i) for i in index)
        core = tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, self.block_shape, self.shape))
        read = tuple(slice(max((c.start - h) // a * a, 0), min(c.stop + h, s))
                     for c, h, s, a in zip(core, self.halo, self.shape, self.align))
        linear = int(np.ravel_multi_index(index, self.grid_shape))
        return Block(index, linear, core, read)

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self.block(index)

    def block_at(self, linear: int) -> Block:
        """The block numbered ``linear`` (C order)."""
        return self.block(np.unravel_index(int(linear), self.grid_shape))

    def reading(self, region: Sequence[slice], roi: Sequence[slice] | None = None) -> list[Block]:
        """The blocks (within ``roi``) whose read ROI overlaps ``region``."""
        ranges = []
        for r, b, h, a, g in zip(region, self.block_shape, self.halo, self.align, self.grid_shape):
            lo = max((r.start - h - a) // b, 0)
            hi = min((r.stop + h + a) // b + 1, g)
            ranges.append(range(lo, hi))
        if roi is not None:
            ranges = [range(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(ranges, self.index_ranges(roi))]
        blocks = (self.block(i) for i in itertools.product(*ranges))
        return [blk for blk in blocks if intersect(blk.read, region) is not None]

    def index_ranges(self, roi: Sequence[slice] | None = None) -> list[range]:
        """Per axis, the grid indices of the blocks whose core overlaps ``roi``: a box."""
        if roi is None:
            return [range(g) for g in self.grid_shape]
        return [range(r.start // b, -(-r.stop // b)) for r, b in zip(roi, self.block_shape)]

    def count(self, roi: Sequence[slice] | None = None) -> int:
        return int(np.prod([len(r) for r in self.index_ranges(roi)]))

    def linear_indices(self, roi: Sequence[slice] | None = None) -> Iterator[int]:
        """The numbers of the blocks whose core overlaps ``roi``, in C order, made one at
        a time (a terabyte volume has ~500k blocks: no list of Block objects)."""
        strides = np.cumprod((1,) + self.grid_shape[:0:-1])[::-1]
        for index in itertools.product(*self.index_ranges(roi)):
            yield int(np.dot(index, strides))

    def upper_neighbours(self, linear: int, axes: Sequence[int],
                         roi: Sequence[slice] | None = None) -> list[tuple[int, int]]:
        """(neighbour, axis) of each block after ``linear`` along one of ``axes`` that
        also overlaps ``roi``."""
        index = np.unravel_index(int(linear), self.grid_shape)
        ranges = self.index_ranges(roi)
        out = []
        for a in axes:
            if index[a] + 1 in ranges[a]:
                nxt = list(index)
                nxt[a] += 1
                out.append((int(np.ravel_multi_index(nxt, self.grid_shape)), a))
        return out

    def blocks(self, roi: Sequence[slice] | None = None) -> list[Block]:
        """The blocks whose core overlaps ``roi`` (all blocks without one), in C order."""
        return [self.block_at(b) for b in self.linear_indices(roi)]

    def faces(self, axes: Sequence[int] | None = None,
              roi: Sequence[slice] | None = None) -> Iterator[tuple[Block, Block, int]]:
        """Each pair of face-adjacent blocks (both overlapping ``roi``) once, as (lower, upper, axis)."""
        axes = range(len(self.shape)) if axes is None else axes
        for b in self.linear_indices(roi):
            for up, a in self.upper_neighbours(b, axes, roi):
                yield self.block_at(b), self.block_at(up), a


def intersect(a: Sequence[slice], b: Sequence[slice]) -> tuple[slice, ...] | None:
    """The overlap of two regions, or None when they do not overlap."""
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return out if all(s.start < s.stop for s in out) else None


def parse_roi(text: str, shape: Sequence[int]) -> tuple[slice, ...]:
    """``"z0:z1,y0:y1,x0:x1"`` (input voxels, start inclusive, stop exclusive; an empty
    bound means the volume's edge, so ``":,100:300,:"`` restricts y only) -> slices."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(shape):
        raise SpocoInputError(f"--roi needs {len(shape)} ranges like 0:64 for this {len(shape)}D input, "
                              f"got {text!r}")
    roi = []
    for a, (part, n) in enumerate(zip(parts, shape)):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            start = int(bounds[0]) if bounds[0].strip() else 0
            stop = int(bounds[1]) if bounds[1].strip() else n
        except ValueError:
            raise SpocoInputError(f"--roi: {part!r} is not a range like 0:64") from None
        if not 0 <= start < stop <= n:
            raise SpocoInputError(f"--roi range {start}:{stop} along axis {a} is empty or outside 0:{n}")
        roi.append(slice(start, stop))
    return tuple(roi)
