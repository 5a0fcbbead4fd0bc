"""The cost of one output voxel on CPU, at the default settings, in one run:

A. the machine: fp32 and bf16 matmul and fp32 3x3-convolution GFLOP/s of one core (one
   thread), the peaks the U-Net is held against;
B. the U-Net: FLOPs per model pixel (torch.utils.flop_counter), seconds per 512 x 512
   tile of the VNC test stack on one core, in fp32 and in bf16 autocast (the default
   where the CPU has native bf16), each with the weights contiguous and channels-last
   (spoco_vol.inference.for_inference); achieved GFLOP/s, the fraction of the matmul
   peak of that precision, and the largest |difference| from fp64 embeddings (the pull
   margin is 0.5);
C. the halo: model pixels the networks predict per model pixel kept, for an interior
   block and a corner block of an 8 x N x N volume, at the default block shape and at
   8 x 512 x 512 (counted by a forward hook on the U-Net while each block is predicted);
   ``--baseline DIR``: the same counted with the code in DIR (an older checkout), in a
   subprocess;
D. end to end: `segment` at the defaults with 2 worker processes on that volume: output
   voxels per second per core, the seconds of each stage summed over blocks, and the
   U-Net alone (B) as input voxels per second per core.

The volume is the VNC test stack (4.6 nm, the bundled model's 9.2 nm halved) mirrored
to 8 x N x N, so the U-Net, the affinities and the watershed do real work.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_voxel_cost.py [--test /tmp/vnc/vnc_test.zarr] [--size 4608] [--baseline DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


def best_of(fn, repeat=3):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine_peak():
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048 ** 3 / best_of(lambda: a @ b) / 1e9
    a16, b16 = a.bfloat16(), b.bfloat16()
    mm16 = 2 * 2048 ** 3 / best_of(lambda: a16 @ b16) / 1e9
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).eval()
    x = torch.randn(1, 32, 512, 512)
    with torch.no_grad():
        cv = 2 * 32 * 32 * 9 * 512 * 512 / best_of(lambda: conv(x)) / 1e9
    return mm, mm16, cv


def unet_rates(peaks, test):
    """The rows of table B; returns the model pixels per second of the product's path."""
    from torch.utils.flop_counter import FlopCounterMode
    from spoco_vol import checkpoint, io, transforms
    from spoco_vol.inference import autocast_context, autocast_dtype, for_inference
    from spoco_vol.pipeline import BUNDLED_MODEL
    torch.set_num_threads(1)
    ckpt = checkpoint.load(BUNDLED_MODEL)
    raw = np.asarray(io.open_volume(test + "/raw")[0, :1024:2, :1024:2]).astype(np.float32)
    x = torch.from_numpy(transforms.normalize(raw, ckpt.normalization))[None, None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ckpt.network()(x)
    flops = counter.get_total_flops()
    with torch.no_grad():
        ref = ckpt.network().double()(x.double()).float()
    cpu = torch.device("cpu")
    default = autocast_dtype(cpu)
    print(f"\nB. the bundled U-Net: {flops / 512 ** 2 / 1e3:.1f} kFLOP per model pixel; one 512 x 512 tile, one core; "
          f"the default here: {'bf16 autocast' if default else 'fp32'}, channels-last")
    print(f"{'variant':<29}{'s/tile':>8}{'GFLOP/s':>9}{'of peak':>9}{'Mpx/s':>7}{'max |d| vs fp64':>17}")
    product = None
    for precision, peak in (("fp32", peaks[0]), ("bf16 autocast", peaks[1])):
        if precision.startswith("bf16") and default is None:
            continue  # no native bf16: 20-50x slower, never the default
        for layout in ("contiguous", "channels-last"):
            net = ckpt.network() if layout == "contiguous" else for_inference(ckpt.network())
            xi = x.contiguous(memory_format=torch.channels_last if layout != "contiguous" else torch.contiguous_format)
            with torch.no_grad(), autocast_context(cpu, precision != "fp32"):
                t = best_of(lambda: net(xi))
                diff = float((net(xi).float() - ref).abs().max())
            g = flops / t / 1e9
            print(f"{precision + ', ' + layout:<29}{t:>8.3f}{g:>9.1f}{100 * g / peak:>8.0f}%{512 ** 2 / t / 1e6:>7.2f}"
                  f"{diff:>17.4f}")
            if layout == "channels-last" and (precision == "fp32") == (default is None):
                product = 512 ** 2 / t
    return product


def mirrored_volume(test, size, path):
    from spoco_vol import io
    raw = np.asarray(io.open_volume(test + "/raw")[...])
    reps = [int(np.ceil(s / n)) for s, n in zip((size, size), raw.shape[1:])]
    tiles = [raw[:, ::1 - 2 * (i % 2)] for i in range(reps[0])]
    col = np.concatenate(tiles, axis=1)
    row = np.concatenate([col[:, :, ::1 - 2 * (j % 2)] for j in range(reps[1])], axis=2)
    vol = np.concatenate([row, row[-1:]], axis=0)[:8, :size, :size]
    io.create_array(path, np.ascontiguousarray(vol), chunks=(1, 512, 512),
                    attrs={"voxel_size": list(io.read_voxel_size(test + "/raw"))})
    return path


def count_halo(path, block_shape):
    """{'interior'|'corner': model pixels predicted / model pixels kept} for one block each."""
    from spoco_vol.blockwise import build_plan
    from spoco_vol.blockwise import passes
    from spoco_vol.model import UNet
    seen = []
    torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(int(np.prod(args[0].shape[2:]))) if isinstance(m, UNet) else None)
    plan = build_plan(path, os.path.join(os.path.dirname(path), "unused.zarr"), None,
                      block_shape=block_shape, device="cpu", overwrite=True)
    grid = plan.grid
    out = {"block": list(plan.block_shape), "halo": list(plan.halo)}
    g = grid.grid_shape
    for name, index in (("interior", (0, g[1] // 2, g[2] // 2)), ("corner", (0, 0, 0))):
        linear = int(np.ravel_multi_index(index, g))
        seen.clear()
        passes.predict_block(linear, plan, 2)
        core = grid.block_at(linear).core
        kept = np.prod([(c.stop - c.start) * s for c, s in zip(core, plan.scale)])
        out[name] = sum(seen) / kept
    return out


def halo_table(path, baseline):
    from spoco_vol.blockwise.plan import default_block_shape
    print(f"\nC. the halo: model pixels predicted per model pixel kept (no test-time augmentation)")
    print(f"{'code':<10}{'block':>16}{'halo':>14}{'interior':>10}{'corner':>8}")
    rows = []
    for code in ([("this", None)] + ([("baseline", baseline)] if baseline else [])):
        for block in (None, [8, 512, 512]):
            if code[1] is None:
                r = count_halo(path, block)
            else:
                env = dict(os.environ, PYTHONPATH=code[1])
                res = subprocess.run([sys.executable, __file__, "--count", path, json.dumps(block)], env=env,
                                     capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((code[0], r))
            print(f"{code[0]:<10}{'x'.join(map(str, r['block'])):>16}{'x'.join(map(str, r['halo'])):>14}"
                  f"{r['interior']:>10.2f}{r['corner']:>8.2f}", flush=True)
    return rows


def end_to_end(path, unet_px_per_s, scale):
    from spoco_vol.blockwise import segment_blockwise
    out = path.replace(".zarr", "_labels.zarr")
    t = time.perf_counter()
    r = segment_blockwise(path, out, None, workers=2, device="cpu")
    wall = time.perf_counter() - t
    vox = float(np.prod(r["shape"]))
    print(f"\nD. end to end: segment at the defaults ({r['blocks']} blocks of {tuple(r['block_shape'])}), "
          f"2 workers on 2 cores")
    print(f"  {vox / 1e6:.0f} Mvox in {wall:.0f} s wall (cluster start included): "
          f"{vox / wall / 2 / 1e6:.3f} Mvox/s per core; peak RSS {r['peak_rss_mib']['worker']:.0f} MiB per worker")
    total = sum(r["seconds"].values())
    print(f"  {'stage':<12}{'s (summed)':>11}{'share':>7}{'Mvox/s/core alone':>19}")
    for stage, s in r["seconds"].items():
        if s > 0:
            print(f"  {stage:<12}{s:>11.1f}{100 * s / total:>6.0f}%{vox / s / 1e6:>19.3f}")
    print(f"  {'all stages':<12}{total:>11.1f}{'':>7}{vox / total / 1e6:>19.3f}")
    per_input = unet_px_per_s / np.prod(scale)  # input voxels per model pixel
    print(f"  the U-Net alone (B, the default precision and layout, no halo): {per_input / 1e6:.3f} Mvox/s per "
          f"core of input")
    shutil.rmtree(out, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--size", type=int, default=4608, help="the volume is 8 x size x size")
    p.add_argument("--baseline", default=None, help="an older checkout whose halo is counted too")
    p.add_argument("--count", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.count:
        print(json.dumps(count_halo(a.count[0], json.loads(a.count[1]))))
        return
    from spoco_vol import io
    work = tempfile.mkdtemp(prefix="spoco-cost-")
    try:
        mm, mm16, cv = machine_peak()
        print(f"A. one core: matmul 2048^3 fp32 {mm:.1f} GFLOP/s, bf16 {mm16:.1f} GFLOP/s; conv 3x3 32->32 on "
              f"512^2 fp32 {cv:.1f} GFLOP/s")
        px = unet_rates((mm, mm16), a.test)
        path = mirrored_volume(a.test, a.size, os.path.join(work, "vol.zarr"))
        halo_table(path, a.baseline)
        vs = io.read_voxel_size(path)
        end_to_end(path, px, [v / m for v, m in zip(vs[1:], (9.2, 9.2))])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
