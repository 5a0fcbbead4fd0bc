"""spoco-vol beside volara 1.0.5 on IDENTICAL affinities, the same block grid and 2
workers (benchmarks/peers/README.md sets up volara's environment).

Data:
- synthetic: touching objects filling the volume (the Voronoi cells of one random point
  per 40^3 voxels, numpy seed 0), affinities sigmoid(+-2 + N(0, 1)) for same/different
  object on the direct offsets and at 3 and 9 voxels per axis (9 channels, float32; the
  noise is drawn in logit space so that no two affinities tie), made slab by slab;
- crop: its first 32 x 512 x 512 voxels, small enough for a single-block run of each
  tool, which the blockwise runs are held against (the seams);
- vnc: the bundled model's affinities of the VNC test stack (`segment --save-affinities`:
  8 channels on the model grid, 7 x 512 x 512), scored inside the model's foreground,
  against the single-block run and against the ground truth's objects (both tools'
  labels set to 0 outside it alike).
Both tools get the same array, bias 0 on direct and -1 on long-range offsets (the split
spoco-vol uses; mwatershed's convention), no size filter, context = halo = the longest
offset, and no strides or (``--strides``) the same regular strides on the long-range
offsets (each tool places its grid by its own rule). Wall times include starting the workers; peak RSS is the client's
and the largest worker's (for volara: its largest child process).

    python benchmarks/peers/compare_volara.py --volara-python VENV/bin/python [--work DIR]
        [--shape 128,1024,1024] [--block 32,256,256] [--only synthetic,crop,vnc] [--strides 2,2,2]
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
import zarr

HERE = os.path.dirname(os.path.abspath(__file__))
CELL = 40  # voxels per side of a synthetic object, on average


def offsets_3d():
    from spoco_vol.affinities import default_offsets
    return default_offsets(3, distances=(3, 9))


def make_synthetic(path, shape, seed=0, slab=16):
    """Affinities (9, *shape) and ground truth, written slab by slab."""
    from scipy.spatial import cKDTree
    from spoco_vol.affinities import pair_slices
    offsets = offsets_3d()
    rng = np.random.default_rng(seed)
    n = max(2, int(np.prod(shape) / CELL ** 3))
    tree = cKDTree(rng.uniform(0, 1, (n, 3)) * np.asarray(shape))
    reach = max(abs(v) for o in offsets for v in o)
    aff = zarr.create_array(path + "/affinities", shape=(len(offsets), *shape), dtype="float32",
                            chunks=(len(offsets), 32, 256, 256), zarr_format=2, overwrite=True)
    gt = zarr.create_array(path + "/gt", shape=shape, dtype="uint32", chunks=(32, 256, 256), zarr_format=2,
                           overwrite=True)
    for z0 in range(0, shape[0], slab):
        z1 = min(z0 + slab, shape[0])
        lo = max(0, z0 - reach)  # the planes the offsets look back to
        grid = np.stack(np.meshgrid(np.arange(lo, z1), np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1)
        labels = (tree.query(grid.reshape(-1, 3).astype(np.float32), workers=-1)[1] + 1).reshape(grid.shape[:3])
        del grid
        out = np.zeros((len(offsets), z1 - lo, *shape[1:]), np.float32)
        noise = np.random.default_rng([seed, z0])
        for c, o in enumerate(offsets):
            tgt, src = pair_slices(labels.shape, o)
            same = labels[tgt] == labels[src]
            logit = np.where(same, 2.0, -2.0) + noise.normal(0, 1.0, same.shape)
            out[(c, *tgt)] = 1 / (1 + np.exp(-logit))
        aff[:, z0:z1] = out[:, z0 - lo:]
        gt[z0:z1] = labels[z0 - lo:].astype(np.uint32)
    attrs = {"offsets": offsets, "neighborhood": offsets, "voxel_size": [8.0, 8.0, 8.0]}
    aff.attrs.update(attrs)
    return path + "/affinities", path + "/gt"


def crop(src_affs, src_gt, path, shape):
    a = zarr.open_array(src_affs, mode="r")
    from spoco_vol.affinities import pair_slices
    sl = tuple(slice(0, s) for s in shape)
    data = np.asarray(a[(slice(None), *sl)])
    for c, o in enumerate(a.attrs["offsets"]):  # pairs that now leave the array carry 0
        tgt, _ = pair_slices(shape, o)
        keep = np.zeros(shape, bool)
        keep[tgt] = True
        data[c][~keep] = 0
    out = zarr.create_array(path + "/affinities", shape=data.shape, dtype="float32", chunks=a.chunks,
                            zarr_format=2, overwrite=True)
    out[...] = data
    out.attrs.update(a.attrs.asdict())
    g = zarr.create_array(path + "/gt", shape=shape, dtype="uint32", chunks=(32, 256, 256), zarr_format=2,
                          overwrite=True)
    g[...] = zarr.open_array(src_gt, mode="r")[sl]
    return path + "/affinities", path + "/gt"


def vnc_affinities(test, path):
    """The bundled model's affinities of the VNC test stack, as float32 with their offsets,
    its foreground, and the ground truth on the model grid."""
    from spoco_vol import io
    from spoco_vol.blockwise import segment_blockwise
    seg = path + "/seg.zarr"
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(seg):
        segment_blockwise(test + "/raw", seg, None, workers=2, device="cpu", save_affinities="float16")
    src = zarr.open_array(seg + "/affinities", mode="r")
    out = zarr.create_array(path + "/affinities", shape=src.shape, dtype="float32",
                            chunks=(src.shape[0], 7, 256, 256), zarr_format=2, overwrite=True)
    out[...] = np.asarray(src[...], np.float32)
    out.attrs.update({"offsets": src.attrs["offsets"], "neighborhood": src.attrs["offsets"]})
    gt = np.asarray(io.open_volume(test + "/labels")[...])[:, ::2, ::2]
    fg = np.asarray(zarr.open_array(seg + "/foreground", mode="r")[...]) > 0
    return path + "/affinities", gt, fg


def run_spoco(affs, out, block, halo, workers, strides=None):
    """`spoco-vol segment-affinities` in a process of its own, as volara runs in its own."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spoco_vol.cli", "segment-affinities", "--affinities", affs, "--output", out,
                    "--block-shape", ",".join(map(str, block)), "--halo", ",".join(map(str, halo)),
                    "--workers", str(workers), "--overwrite", "--quiet",
                    *(["--strides", ",".join(map(str, strides))] if strides else [])], check=True, capture_output=True)
    wall = time.perf_counter() - t
    r = zarr.open_group(out, mode="r").attrs["spoco_vol"]
    return {"wall": wall, "worker_rss_mib": r["peak_rss_mib"]["worker"], "client_rss_mib": r["peak_rss_mib"]["client"],
            "objects": r["objects"], "labels": out}


def run_volara(python, affs, out, block, context, workers, strides=None):
    from spoco_vol.segmentation import default_bias
    bias = default_bias(zarr.open_array(affs, mode="r").attrs["offsets"])
    shutil.rmtree(out, ignore_errors=True)
    cwd = tempfile.mkdtemp(prefix="volara-")  # its logs and done markers: fresh for every run
    try:
        res = subprocess.run([python, os.path.join(HERE, "volara_run.py"), os.path.abspath(affs), os.path.abspath(out),
                              "--block", ",".join(map(str, block)), "--context", ",".join(map(str, context)),
                              "--bias", ",".join(map(str, bias)), "--workers", str(workers),
                              *(["--strides", ",".join(map(str, strides))] if strides else [])],
                             cwd=cwd, capture_output=True, text=True)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"volara failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"labels": out + "/segments"}


def read_labels(path):
    return np.asarray(zarr.open_array(path, mode="r")[...])


def scores(labels, reference, inside=None):
    from spoco_vol.evaluation import adapted_rand_error, variation_of_information
    if inside is not None:
        labels, reference = np.where(inside, labels, 0), np.where(inside, reference, 0)
    voi = variation_of_information(labels, reference)
    return {"arand": adapted_rand_error(labels, reference)["arand"], "voi_split": voi["voi_split"],
            "voi_merge": voi["voi_merge"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--volara-python", required=True)
    p.add_argument("--work", default="/tmp/peers/work")
    p.add_argument("--shape", default="128,1024,1024")
    p.add_argument("--block", default="32,256,256")
    p.add_argument("--crop", default="32,512,512")
    p.add_argument("--vnc", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="synthetic,crop,vnc")
    p.add_argument("--strides", default=None, help="regular strides of the long-range edges, both tools")
    a = p.parse_args()
    strides = [int(v) for v in a.strides.split(",")] if a.strides else None
    tag = "" if strides is None else "_strides" + "x".join(map(str, strides))
    shape, block, crop_shape = ([int(v) for v in s.split(",")] for s in (a.shape, a.block, a.crop))
    os.makedirs(a.work, exist_ok=True)
    rows = []
    results_path = os.path.join(a.work, f"results{tag}.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def record(name, tool, run, **metrics):
        results[f"{name}:{tool}"] = {**{k: v for k, v in run.items() if k != "labels"}, **metrics}
        json.dump(results, open(results_path, "w"), indent=1)
        rows.append((name, tool, results[f"{name}:{tool}"]))
        print(name, tool, json.dumps(results[f"{name}:{tool}"]), flush=True)

    only = a.only.split(",")
    synth = os.path.join(a.work, "synthetic.zarr")
    if ("synthetic" in only or "crop" in only) and not os.path.exists(synth + "/gt"):
        t = time.perf_counter()
        make_synthetic(synth, shape)
        print(f"synthetic {shape} made in {time.perf_counter() - t:.0f} s", flush=True)
    context = [9, 9, 9]
    if "synthetic" in only:
        gt = read_labels(synth + "/gt")
        for tool in ("spoco-vol", "volara"):
            out = os.path.join(a.work, f"synthetic_{tool}{tag}")
            run = (run_spoco(synth + "/affinities", out + ".zarr", block, context, a.workers, strides)
                   if tool == "spoco-vol" else
                   run_volara(a.volara_python, synth + "/affinities", out, block, context, a.workers, strides))
            record("synthetic", tool, run, vs_gt=scores(read_labels(run["labels"] + ("/0" if tool == "spoco-vol"
                                                                                     else "")), gt))
        del gt
    if "crop" in only:
        cropped = os.path.join(a.work, "crop.zarr")
        if not os.path.exists(cropped + "/gt"):
            crop(synth + "/affinities", synth + "/gt", cropped, crop_shape)
        affs, gt_path = cropped + "/affinities", cropped + "/gt"
        gt = read_labels(gt_path)
        for tool in ("spoco-vol", "volara"):
            runs = {}
            for kind, b, workers in (("blockwise", block, a.workers), ("single", crop_shape, 1)):
                out = os.path.join(a.work, f"crop_{tool}_{kind}{tag}")
                runs[kind] = (run_spoco(affs, out + ".zarr", b, context, workers, strides) if tool == "spoco-vol"
                              else run_volara(a.volara_python, affs, out, b, context, workers, strides))
                runs[kind]["array"] = read_labels(runs[kind]["labels"] + ("/0" if tool == "spoco-vol" else ""))
            record("crop", tool, {k: v for k, v in runs["blockwise"].items() if k != "array"},
                   single_wall=runs["single"]["wall"], single_worker_rss_mib=runs["single"]["worker_rss_mib"],
                   vs_single=scores(runs["blockwise"]["array"], runs["single"]["array"]),
                   vs_gt=scores(runs["blockwise"]["array"], gt), single_vs_gt=scores(runs["single"]["array"], gt))
    if "vnc" in only:
        affs, gt, fg = vnc_affinities(a.vnc, os.path.join(a.work, "vnc"))
        vnc_block, vnc_context = [7, 256, 256], [0, 27, 27]
        vnc_strides = None if strides is None else [1, *strides[1:]]  # no offset crosses sections
        for tool in ("spoco-vol", "volara"):
            runs = {}
            for kind, b, workers in (("blockwise", vnc_block, a.workers), ("single", list(gt.shape), 1)):
                out = os.path.join(a.work, f"vnc_{tool}_{kind}{tag}")
                runs[kind] = (run_spoco(affs, out + ".zarr", b, vnc_context, workers, vnc_strides)
                              if tool == "spoco-vol" else
                              run_volara(a.volara_python, affs, out, b, vnc_context, workers, vnc_strides))
                runs[kind]["array"] = read_labels(runs[kind]["labels"] + ("/0" if tool == "spoco-vol" else ""))
            # inside the model's foreground: the background is one region of near-equal
            # affinities whose partition into segments means nothing
            record("vnc", tool, {k: v for k, v in runs["blockwise"].items() if k != "array"},
                   single_wall=runs["single"]["wall"],
                   vs_single=scores(runs["blockwise"]["array"], runs["single"]["array"], fg),
                   vs_gt_in_foreground=scores(runs["blockwise"]["array"], gt, fg))
    print(f"\n{'data':<10}{'tool':<11}{'wall s':>8}{'worker MiB':>11}{'client MiB':>11}"
          f"{'ARand vs 1 block':>17}{'ARand vs GT':>12}{'VOI split/merge vs GT':>23}")
    for key, r in results.items():
        name, tool = key.split(":")
        gt_scores = r.get("vs_gt") or r.get("vs_gt_in_foreground") or {}
        seam = r.get("vs_single", {}).get("arand")
        print(f"{name:<10}{tool:<11}{r['wall']:>8.1f}{r['worker_rss_mib']:>11.0f}{r['client_rss_mib']:>11.0f}"
              f"{'-' if seam is None else f'{seam:.4f}':>17}{gt_scores.get('arand', float('nan')):>12.4f}"
              f"{gt_scores.get('voi_split', float('nan')):>12.3f}/{gt_scores.get('voi_merge', float('nan')):.3f}")


if __name__ == "__main__":
    main()
