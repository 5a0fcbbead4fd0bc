"""volara 1.0.5's blockwise Mutex Watershed on an affinity array, timed; runs in volara's
own environment (benchmarks/peers/README.md), called by compare_volara.py.

Four daisy runs, as volara's own examples chain them: ExtractFrags (mwatershed per block
with context), AffAgglom (mean affinities between touching fragments, direct and
long-range offsets grouped), GraphMWS (one Mutex Watershed over the whole fragment graph,
score = mean direct affinity - 0.5), Relabel. Prints one JSON line: seconds per stage,
the wall time, and the peak RSS of this process and of its largest worker.

    python volara_run.py AFFS.zarr OUT_DIR --block Z,Y,X --context Z,Y,X --bias B,... --workers N
"""
import multiprocessing as mp

mp.set_start_method("fork", force=True)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import zarr  # noqa: E402
from funlib.geometry import Coordinate  # noqa: E402

from volara.blockwise import AffAgglom, ExtractFrags, GraphMWS, Relabel  # noqa: E402
from volara.datasets import Affs, Labels  # noqa: E402
from volara.dbs import SQLite  # noqa: E402
from volara.lut import LUT  # noqa: E402


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def ints(text):
    return [int(v) for v in text.split(",")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("affs")
    p.add_argument("out")
    p.add_argument("--block", type=ints, required=True)
    p.add_argument("--context", type=ints, required=True)
    p.add_argument("--bias", type=lambda t: [float(v) for v in t.split(",")], required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--strides", type=ints, default=None, help="on the long-range offsets (the direct ones: 1)")
    a = p.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    offsets = zarr.open_array(a.affs, mode="r").attrs["neighborhood"]
    ndim = len(offsets[0])
    affs = Affs(store=Path(a.affs), neighborhood=[Coordinate(o) for o in offsets], writable=False,
                axis_names=["c^", "z", "y", "x"][-(ndim + 1):], voxel_size=Coordinate((1,) * ndim),
                offset=Coordinate((0,) * ndim))
    direct = [Coordinate(o) for o in offsets if sum(abs(v) for v in o) == 1]
    longer = [Coordinate(o) for o in offsets if sum(abs(v) for v in o) != 1]
    db = SQLite(path=out / "fragments.db", edge_attrs={"direct": "float", "long": "float"})
    frags, seg = Labels(store=out / "fragments"), Labels(store=out / "segments")
    lut = LUT(path=str(out / "lut.npz"))  # a Path without .npz is saved as lut.npz but looked for as lut
    block, context = Coordinate(a.block), Coordinate(a.context)
    stages = [
        ("fragments", ExtractFrags(db=db, affs_data=affs, frags_data=frags, block_size=block, context=context,
                                   bias=a.bias, num_workers=a.workers,
                                   strides=None if a.strides is None else
                                   [Coordinate((1,) * ndim) if sum(abs(v) for v in o) == 1 else Coordinate(a.strides)
                                    for o in offsets])),
        ("agglomerate", AffAgglom(db=db, affs_data=affs, frags_data=frags, block_size=block, context=context,
                                  scores={"direct": direct, "long": longer}, num_workers=a.workers)),
        ("graph mws", GraphMWS(db=db, lut=lut, weights={"direct": (1.0, -0.5)},
                               roi=((0,) * ndim, zarr.open_array(a.affs, mode="r").shape[1:]))),
        ("relabel", Relabel(frags_data=frags, seg_data=seg, lut=lut, block_size=block, num_workers=a.workers)),
    ]
    seconds = {}
    t0 = time.perf_counter()
    for name, task in stages:
        t = time.perf_counter()
        task.run_blockwise(multiprocessing=True)
        seconds[name] = round(time.perf_counter() - t, 2)
    wall = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "wall": round(wall, 2), "labels": str(out / "segments"),
                      # VmHWM: ru_maxrss of a process started by exec also holds its parent's peak
                      "client_rss_mib": vm_hwm_mib(),
                      "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
