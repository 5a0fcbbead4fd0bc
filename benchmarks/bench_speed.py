"""Speed of the stages on this machine: U-Net inference fp32 vs bf16 autocast (and their
difference) and the precision the default (`--amp`, spoco_vol.inference.autocast_dtype)
picks here, affinities, Mutex Watershed, and one training iteration, plus peak RSS.

    python benchmarks/bench_speed.py [--model spoco_vol/data/vnc_mito_2d.pt] [--size 512]
"""
import argparse
import resource
import time

import numpy as np
import torch

from spoco_vol import checkpoint, data, losses, transforms
from spoco_vol.affinities import default_offsets, embedding_affinities
from spoco_vol.inference import autocast_context, autocast_dtype, cpu_has_fast_bf16, predict_embeddings
from spoco_vol.pipeline import BUNDLED_MODEL
from spoco_vol.segmentation import mutex_watershed


def timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--train-raw", default="/tmp/vnc/vnc_train.zarr/raw")
    p.add_argument("--train-labels", default="/tmp/vnc/vnc_train.zarr/labels")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ck = checkpoint.load(a.model)
    net = ck.network()
    cpu = torch.device("cpu")
    img = np.random.default_rng(0).normal(size=(a.size, a.size)).astype(np.float32)
    mvox = img.size / 1e6
    rows = []
    t32, e32 = timed(lambda: predict_embeddings(net, img, device=cpu, amp=False))
    fast = cpu_has_fast_bf16()

    def bf16():  # forced, whatever the default would pick
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return predict_embeddings(net, img, device=cpu, amp=False)
    t16, e16 = timed(bf16, repeat=3 if fast else 1)  # without native bf16 one run takes minutes
    rows.append(("U-Net fp32", t32, mvox / t32, ""))
    rows.append(("U-Net bf16 autocast", t16, mvox / t16, f"{t32 / t16:.3g}x fp32; max |diff| "
                 f"{np.abs(e32 - e16).max():.3f}; native bf16 on this CPU: {'yes' if fast else 'no'}"))
    picked = autocast_dtype(cpu)
    t_default = t16 if picked else t32
    rows.append(("U-Net, the default (--amp)", t_default, mvox / t_default,
                 f"picks {'bf16' if picked else 'fp32'} here"))
    offsets = default_offsets(2)
    ta, affs = timed(lambda: embedding_affinities(e32, offsets, ck.delta_d))
    rows.append(("affinities (8 offsets)", ta, mvox / ta, ""))
    for strides in ([1, 1], [2, 2]):
        tm, _ = timed(lambda: mutex_watershed(affs, offsets, strides))
        rows.append((f"mutex watershed strides {strides}", tm, mvox / tm, ""))
    # one training step at the bundled model's settings (batch 4, 256^2, consistency on)
    vol = data.open_training_volume(a.train_raw, a.train_labels)
    sampler = data.PatchSampler([vol], (256, 256), 2, (1, 2, 2), rng=np.random.default_rng(0))
    f = ck.network().train()
    g = losses.make_momentum_network(f)
    loss = losses.SpocoLoss(mode="full")
    opt = torch.optim.Adam(f.parameters(), lr=1e-5)

    def step():
        raws, labs = sampler.batch(4)
        x = torch.from_numpy(transforms.normalize(raws, ck.normalization)[:, None])
        with autocast_context(cpu):
            e = f(x)
        with torch.no_grad(), autocast_context(cpu):
            ge = g(x).float()
        total, _ = loss(e.float(), torch.from_numpy(labs), g_embeddings=ge)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.update_momentum_network(f, g)
    ts, _ = timed(step)
    rows.append(("training iteration (4 x 256^2)", ts, 4 * 256 * 256 / 1e6 / ts, f"{1 / ts:.2f} it/s"))
    print(f"{'stage':<34}{'seconds':>9}{'Mvox/s':>9}  note")
    for name, t, rate, note in rows:
        print(f"{name:<34}{t:>9.3f}{rate:>9.2f}  {note}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"threads {torch.get_num_threads()}, image {a.size}x{a.size}")


if __name__ == "__main__":
    main()
