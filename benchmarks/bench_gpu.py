"""GPU inference: throughput of the bundled U-Net in fp32, bf16 and fp16 against the CPU
of the same machine, and whether CUDA gives the CPU's embeddings and segmentation.

Needs a CUDA device (run by benchmarks/gpu_run.sh on a lent GPU machine).

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_gpu.py [--test /tmp/vnc/vnc_test.zarr]

Prints three tables:
- the raw U-Net on a batch of 512x512 model-grid tiles (the ceiling), per precision, with
  the largest and mean |difference| from the CPU fp32 embeddings of the same tiles;
- the product path (`pipeline.segment_array`, default bf16 autocast, with and without
  test-time augmentation) on the VNC test sections 13-19 on CPU and CUDA: seconds, input
  Mvoxel/s, AP@0.5 against the ground truth, and the CUDA labels scored against the CPU
  labels (AP@0.5 = 1 and ARand = 0 when both partition the same);
- one training iteration (batch 4 x 256^2, momentum network, full-label loss and the
  sparse recipe's loss with all terms).
"""
import argparse
import resource
import time

import numpy as np
import torch

from spoco_vol import checkpoint, data, io, losses, transforms
from spoco_vol.evaluation import evaluate_segmentation
from spoco_vol.inference import autocast_context
from spoco_vol.pipeline import BUNDLED_MODEL, segment_array


def best_time(fn, repeat=3, sync=False):
    """Best wall time of `repeat` calls after one warm-up; CUDA work is waited for."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def unet_table(ck, raw, dev, sync, batch):
    """The U-Net alone on normalised 512^2 tiles of the test stack (model grid)."""
    tiles = transforms.normalize(raw[:, ::2, ::2].astype(np.float32), ck.normalization)
    x = torch.from_numpy(np.ascontiguousarray(np.resize(tiles, (batch, *tiles.shape[1:]))[:, None]))
    net_cpu = ck.network()
    with torch.no_grad():
        t_ref, ref = best_time(lambda: net_cpu(x[:4]), repeat=1)
    ref = ref.numpy()
    net_gpu = ck.network().to(dev)
    xg = x.to(dev)
    mvox = x.numel() / 1e6
    print(f"\nU-Net on {batch} x 512^2 tiles{'':<10}{'sec':>8}{'Mvox/s':>9}{'x CPU':>7}{'max|d|':>8}{'mean|d|':>9}")
    cpu_rate = 4 * x[0].numel() / 1e6 / t_ref
    print(f"{'CPU fp32 (4 tiles)':<38}{t_ref:>8.3f}{cpu_rate:>9.1f}{1:>7.1f}{0:>8.3f}{0:>9.4f}")
    for name, dtype in (("CUDA fp32", None), ("CUDA bf16 autocast", torch.bfloat16),
                        ("CUDA fp16 autocast", torch.float16)):
        def run():
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return net_gpu(xg).float()
        t, out = best_time(run, sync=sync)
        d = np.abs(out[:4].cpu().numpy() - ref)
        print(f"{name:<38}{t:>8.3f}{mvox / t:>9.1f}{mvox / t / cpu_rate:>7.1f}{d.max():>8.3f}{d.mean():>9.4f}")


def segment_table(ck, raw, gt, vs, dev):
    """The product path on the test stack, CPU vs the device (bf16 autocast on both)."""
    cpu = torch.device("cpu")
    print(f"\nsegment_array, VNC 13-19 {'':<9}{'sec':>8}{'Mvox/s':>9}{'AP@0.5':>8}{'vs CPU AP':>10}{'vs CPU ARand':>13}")
    for tta in (False, True):
        labels = {}
        for d in (cpu, dev):
            t, labels[d] = best_time(lambda: segment_array(raw, ck, input_voxel_size=vs, device=d.type, tta=tta),
                                     repeat=1)
            m = evaluate_segmentation(labels[d], gt, per_section=True)
            agree = evaluate_segmentation(labels[d], labels[cpu], per_section=True)
            print(f"{d.type + (' TTA' if tta else ''):<34}{t:>8.2f}{raw.size / 1e6 / t:>9.2f}{m['ap@0.5']:>8.3f}"
                  f"{agree['ap@0.5']:>10.3f}{agree['arand']:>13.4f}")


def training_table(ck, train, dev, sync):
    """One training iteration, with the full-label loss and with the sparse recipe's loss
    (all terms, pseudo-background included; label 0 is then the unlabeled region)."""
    cpu = torch.device("cpu")
    vol = data.open_training_volume(train + "/raw", train + "/labels")
    sampler = data.PatchSampler([vol], (256, 256), 2, (1, 2, 2), rng=np.random.default_rng(0))
    batch = [sampler.batch(4) for _ in range(4)]  # sampled once: this times the step, not the reads
    print(f"\ntraining iteration (4 x 256^2){'':<14}{'sec':>8}{'it/s':>9}")
    for mode, kwargs in (("full", {}), ("sparse", {"background_weight": 1.0, "background_radius": 3.0})):
        loss = losses.SpocoLoss(mode=mode, **kwargs)
        for d in (cpu, dev):
            f = ck.network().to(d).train()
            g = losses.make_momentum_network(f)
            opt = torch.optim.Adam(f.parameters(), lr=1e-5)
            gen = torch.Generator().manual_seed(0)

            def step(i=[0]):
                raws, labs = batch[i[0] % 4]
                i[0] += 1
                xb = torch.from_numpy(transforms.normalize(raws, ck.normalization)[:, None]).to(d)
                with autocast_context(d):
                    e = f(xb)
                with torch.no_grad(), autocast_context(d):
                    ge = g(xb).float()
                total, _ = loss(e.float(), torch.from_numpy(labs).to(d), g_embeddings=ge, generator=gen)
                opt.zero_grad()
                total.backward()
                opt.step()
                losses.update_momentum_network(f, g)
                return float(total.detach())
            t, _ = best_time(step, repeat=5, sync=sync and d == dev)
            print(f"{mode + ' loss, ' + d.type:<44}{t:>8.3f}{1 / t:>9.1f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--train", default="/tmp/vnc/vnc_train.zarr")
    p.add_argument("--batch", type=int, default=16, help="tiles per U-Net call in the first table")
    p.add_argument("--tables", default="1,2,3", help="which tables to measure, e.g. 3")
    p.add_argument("--device", default="cuda", help="the device under test (cpu: a smoke test of this script)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device")
    dev = torch.device(a.device)
    sync = dev.type == "cuda"
    if sync:
        print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
              f"bf16 supported {torch.cuda.is_bf16_supported()}")
    ck = checkpoint.load(a.model)
    raw = np.asarray(io.open_volume(a.test + "/raw")[...])
    tables = {int(t) for t in a.tables.split(",")}
    if 1 in tables:
        unet_table(ck, raw, dev, sync, a.batch)
    if 2 in tables:
        segment_table(ck, raw, np.asarray(io.open_volume(a.test + "/labels")[...]),
                      io.read_voxel_size(a.test + "/raw"), dev)
    if 3 in tables:
        training_table(ck, a.train, dev, sync)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB" if sync else ""))


if __name__ == "__main__":
    main()
