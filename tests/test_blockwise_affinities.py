"""Affinities in and out of a blockwise run: `segment --save-affinities` keeps the Mutex
Watershed's affinities, and `segment-affinities` segments given affinities (ours or any
other network's) through the same blockwise watershed, stitching, resume and clusters."""
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from spoco_vol import io
from spoco_vol.affinities import default_offsets
from spoco_vol.blockwise import segment_affinities_blockwise, segment_blockwise
from spoco_vol.errors import SpocoInputError, SpocoRunError
from spoco_vol.evaluation import adapted_rand_error
from spoco_vol.pipeline import BUNDLED_MODEL
from spoco_vol.segmentation import segment_affinities
from test_segmentation import noisy_affinities

OFFSETS_3D = default_offsets(3, distances=(3, 9))


def touching_cells(shape=(32, 96, 96), n=24, seed=0):
    """Space-filling objects (the Voronoi cells of ``n`` seeded random points), as
    connectomics volumes are: every voxel belongs to some object."""
    from scipy.spatial import cKDTree
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (n, 3)) * np.asarray(shape)
    grid = np.stack(np.indices(shape), -1).reshape(-1, 3)
    return (cKDTree(points).query(grid)[1] + 1).reshape(shape).astype(np.uint32)


def _affinity_volume(tmp_path, dtype=np.float32, attrs=True, name="affs.zarr"):
    gt = touching_cells()
    aff = noisy_affinities(gt, OFFSETS_3D, noise=1.0)
    if dtype == np.uint8:
        aff = np.round(aff * 255).astype(np.uint8)
    path = str(tmp_path / name)
    io.create_array(path, aff.astype(dtype, copy=False), chunks=(len(OFFSETS_3D), 16, 48, 48),
                    attrs={"offsets": OFFSETS_3D, "voxel_size": [8.0, 8.0, 8.0]} if attrs else {})
    return path, gt


def _labels(path):
    return np.asarray(io.open_volume(path)[...])


def test_saved_affinities_redo_the_segment_run_on_real_em(tmp_path):
    """Real VNC EM with the bundled model: the affinities and foreground saved by one
    segment run, segmented again by segment-affinities, give the same objects (on the
    model grid, XY / 2), in one block and in four stitched ones."""
    from spoco_vol.demo import write_sample
    raw, _ = write_sample(str(tmp_path / "sample.zarr"))
    seg = str(tmp_path / "seg.zarr")
    report = segment_blockwise(raw, seg, BUNDLED_MODEL, block_shape=[7, 512, 512], workers=0, device="cpu",
                               save_affinities="float16")
    assert report["saved_affinities"] == "float16"
    aff = zarr.open_array(seg + "/affinities", mode="r")
    assert aff.dtype == np.float16 and aff.shape == (8, 7, 256, 256)
    assert aff.attrs["offsets"][:2] == [[0, -1, 0], [0, 0, -1]] and aff.attrs["strides"] == [1, 2, 2]
    assert aff.attrs["voxel_size"] == pytest.approx([50, 9.2, 9.2], rel=0.01)
    assert zarr.open_array(seg + "/foreground", mode="r").shape == (7, 256, 256)
    by_model = _labels(seg)[:, ::2, ::2]
    for name, block in (("one", [7, 256, 256]), ("four", [7, 128, 128])):
        out = str(tmp_path / f"{name}.zarr")
        r = segment_affinities_blockwise(seg + "/affinities", out, mask=seg + "/foreground", block_shape=block,
                                         workers=0)
        labels = _labels(out)
        assert r["objects"] > 30 and r["voxel_size"] == aff.attrs["voxel_size"]
        assert adapted_rand_error(labels, by_model)["arand"] <= 0.001, name


def test_blockwise_equals_single_block_and_the_objects(tmp_path):
    """Synthetic touching cells with noisy 3D affinities (no background): 8 stitched
    blocks give the single block's objects, and both recover the cells; uint8
    affinities (value / 255) give the float ones' objects."""
    path, gt = _affinity_volume(tmp_path)
    runs = {}
    for name, block in (("single", [32, 96, 96]), ("blocks", [16, 48, 48])):
        out = str(tmp_path / f"{name}.zarr")
        runs[name] = segment_affinities_blockwise(path, out, block_shape=block, halo=[9, 9, 9], workers=0)
        runs[name]["labels"] = _labels(out)
    assert runs["blocks"]["blocks"] == 8 and runs["blocks"]["merges"] > 0
    single, blocks = runs["single"]["labels"], runs["blocks"]["labels"]
    assert adapted_rand_error(blocks, single)["arand"] <= 0.01
    assert adapted_rand_error(single, gt)["arand"] <= 0.05
    as_uint8, _ = _affinity_volume(tmp_path, np.uint8, name="affs8.zarr")
    out = str(tmp_path / "u8.zarr")
    segment_affinities_blockwise(as_uint8, out, block_shape=[32, 96, 96], workers=0)
    assert adapted_rand_error(_labels(out), single)["arand"] <= 0.01


def test_graph_seams_give_the_whole_volume_where_faces_do_not(tmp_path):
    """Noisier touching cells, where the Mutex Watershed is far from local: with graph
    seams (the default for 3D offsets) 8 blocks give the whole volume's watershed
    exactly; stitching faces does not (a block merges cells that the whole volume keeps
    apart). A crash in the graph's edge pass loses no block: the same call finishes."""
    gt = touching_cells()
    aff = noisy_affinities(gt, OFFSETS_3D, noise=1.35)
    path = str(tmp_path / "noisy.zarr")
    io.create_array(path, aff, chunks=(len(OFFSETS_3D), 16, 48, 48), attrs={"offsets": OFFSETS_3D})
    whole = segment_affinities(aff, OFFSETS_3D)
    out = str(tmp_path / "graph.zarr")
    report = segment_affinities_blockwise(path, out, block_shape=[16, 48, 48], workers=0)
    # the halo: twice the longest offset, within a block
    assert report["blocks"] == 8 and report["seams"] == "graph" and report["halo"] == [16, 18, 18]
    labels = _labels(out)
    pairs = np.unique(np.stack([labels.reshape(-1), whole.reshape(-1)]), axis=1)
    assert len(pairs[0]) == len(np.unique(whole)) == len(np.unique(labels)) > 100  # the same partition
    faces = str(tmp_path / "faces.zarr")
    segment_affinities_blockwise(path, faces, block_shape=[16, 48, 48], halo=[16, 18, 18], seams="faces", workers=0)
    assert adapted_rand_error(_labels(faces), whole)["arand"] > 0.01
    crashed = str(tmp_path / "crashed.zarr")
    args = ["segment-affinities", "--affinities", path, "--block-shape", "16,48,48", "--workers", "0", "--quiet",
            "--output", crashed]
    assert _cli(*args, crash_at="edges").returncode == -9
    assert len(os.listdir(crashed + ".partial/blocks")) == 8
    assert _cli(*args).returncode == 0
    np.testing.assert_array_equal(_labels(crashed), labels)


def test_auto_seams_stitch_faces_on_terabyte_volumes(tmp_path):
    """Graph seams keep affinities and the whole fragment graph: "auto" gives them up to
    1e9 voxels, faces beyond (a dry run reads metadata only)."""
    small, _ = _affinity_volume(tmp_path)
    assert segment_affinities_blockwise(small, dry_run=True)["fingerprint"]["seams"] == "graph"
    large = str(tmp_path / "large.zarr")
    arr = zarr.create_array(large, shape=(len(OFFSETS_3D), 1024, 1024, 1024), chunks=(9, 64, 256, 256),
                            dtype="float32", fill_value=0)
    arr.attrs["offsets"] = OFFSETS_3D
    assert "seams" not in segment_affinities_blockwise(large, dry_run=True)["fingerprint"]  # faces
    assert segment_affinities_blockwise(large, dry_run=True, seams="graph")["fingerprint"]["seams"] == "graph"


def test_same_labels_on_a_local_cluster(tmp_path):
    """On a LocalCluster of 2 worker processes, the in-process run's labels, bit for bit."""
    path, _ = _affinity_volume(tmp_path)
    here, there = str(tmp_path / "here.zarr"), str(tmp_path / "there.zarr")
    segment_affinities_blockwise(path, here, block_shape=[16, 48, 48], workers=0)
    report = segment_affinities_blockwise(path, there, block_shape=[16, 48, 48], workers=2)
    assert report["workers"] == 2
    np.testing.assert_array_equal(_labels(here), _labels(there))


def _cli(*args, crash_at=None):
    env = dict(os.environ)
    env.pop("SPOCO_VOL_CRASH_AT", None)
    if crash_at:
        env["SPOCO_VOL_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", "from spoco_vol.cli import cli; cli()", *args], env=env,
                          capture_output=True, text=True)


def test_cli_resumes_a_killed_run_to_identical_labels(tmp_path):
    """`spoco-vol segment-affinities` SIGKILLed after a block, run again: the labels of
    an uninterrupted run; a third run finds the output complete."""
    path, _ = _affinity_volume(tmp_path, attrs=False)
    offsets = ";".join(",".join(map(str, o)) for o in OFFSETS_3D)
    args = ["segment-affinities", "--affinities", path, "--offsets", offsets, "--block-shape", "16,48,48",
            "--workers", "0", "--quiet"]
    ref = str(tmp_path / "ref.zarr")
    assert _cli(*args, "--output", ref).returncode == 0
    out = str(tmp_path / "out.zarr")
    assert _cli(*args, "--output", out, crash_at="segment:2").returncode == -9
    assert not os.path.exists(out) and len(os.listdir(out + ".partial/blocks")) >= 1
    resumed = _cli(*args, "--output", out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    np.testing.assert_array_equal(_labels(ref), _labels(out))
    report = zarr.open_group(out, mode="r").attrs["spoco_vol"]
    assert report["resumed"] and report["offsets"] == OFFSETS_3D
    again = _cli(*args, "--output", out)
    assert again.returncode == 0 and "already complete" in again.stdout
    other = _cli(*args, "--output", out, "--bias", "-0.8")
    assert other.returncode == 2 and "--overwrite" in other.stderr


def test_input_errors_are_one_line_and_write_nothing(tmp_path):
    path, _ = _affinity_volume(tmp_path, attrs=False)
    out = str(tmp_path / "o.zarr")
    cases = [
        (dict(), "offsets"),
        (dict(offsets=OFFSETS_3D[:4]), "channels"),
        (dict(offsets=OFFSETS_3D, bias=[0.0, -1.0]), "--bias"),
        (dict(offsets=OFFSETS_3D, halo=[2, 2, 2]), "halo 2 along axis 0 is shorter"),
        (dict(offsets=OFFSETS_3D, strides=[0, 2, 2]), "--strides"),
        (dict(offsets=OFFSETS_3D, mask=path), "mask"),
        (dict(offsets=OFFSETS_3D, seams="graph", stitch=False), "--seams graph .* --no-stitch"),
        (dict(offsets=[[0, -1, 0], [0, 0, -1]] + [[0, -d, 0] for d in (2, 3, 4, 5)] + [[0, 0, -d] for d in (3, 6, 9)],
              seams="graph"), "--seams graph needs"),  # per-section offsets
        (dict(offsets=OFFSETS_3D, seams="both"), "--seams takes"),
    ]
    for kwargs, match in cases:
        with pytest.raises(SpocoInputError, match=match):
            segment_affinities_blockwise(path, out, workers=0, **kwargs)
    ints = str(tmp_path / "ints.zarr")
    io.create_array(ints, np.zeros((3, 8, 8, 8), np.int32))
    with pytest.raises(SpocoInputError, match="float"):
        segment_affinities_blockwise(ints, out, offsets=default_offsets(3, distances=()), workers=0)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_bad_values_in_a_block_stop_the_run_and_keep_the_rest(tmp_path):
    """Affinities outside [0, 1] (logits, say) in one block: the run stops naming it, the
    partial run keeps the finished blocks."""
    path, _ = _affinity_volume(tmp_path)
    arr = zarr.open_array(path, mode="r+")
    arr[0, 30, 60, 60] = 3.0  # read by the last block of the 2 x 2 x 2 grid only (halo 9)
    out = str(tmp_path / "o.zarr")
    with pytest.raises(SpocoRunError, match=r"block \(1, 1, 1\).*outside \[0, 1\]"):
        segment_affinities_blockwise(path, out, block_shape=[16, 48, 48], halo=[9, 9, 9], workers=0)
    assert len(os.listdir(out + ".partial/blocks")) == 7
    arr[0, 30, 60, 60] = np.nan
    with pytest.raises(SpocoRunError, match=r"block \(1, 1, 1\).*NaN"):
        segment_affinities_blockwise(path, out, block_shape=[16, 48, 48], halo=[9, 9, 9], workers=0)
    arr[0, 30, 60, 60] = 0.5  # repaired: the same call finishes the run, redoing one block
    report = segment_affinities_blockwise(path, out, block_shape=[16, 48, 48], halo=[9, 9, 9], workers=0)
    assert report["blocks_done_before"] == 7 and not os.path.exists(out + ".partial")
