"""Clustering embeddings directly (spoco_vol.clustering): HDBSCAN, mean-shift and the
paper's consistency clustering, on embeddings whose answer is known."""
import numpy as np
import pytest

from spoco_vol import clustering
from spoco_vol.clustering import cluster_embeddings, merge_close_clusters
from spoco_vol.errors import SpocoInputError
from spoco_vol.evaluation import adapted_rand_error

DELTA_V, DELTA_D = 0.5, 2.0


def _image(seed=0):
    """Four discs on a background; each disc's pixels embed near its own centre (spread
    0.1), 2*delta_d from every other centre and from the background at 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.uint64)
    for k, (cy, cx) in enumerate([(16, 16), (16, 48), (48, 16), (48, 48)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = k
    centres = np.zeros((5, 4))
    for k in range(1, 5):
        centres[k, k - 1] = 2 * DELTA_D
    emb = centres[labels.astype(int)].transpose(2, 0, 1) + rng.normal(0, 0.1, (4, 64, 64))
    return emb.astype(np.float32), labels


@pytest.mark.parametrize("method", ["hdbscan", "meanshift"])
def test_separated_clusters_are_the_objects(method):
    emb, labels = _image()
    seg = cluster_embeddings(emb, method, delta_v=DELTA_V, delta_d=DELTA_D, min_size=10,
                             background_embedding=[0.0] * 4, background_radius=DELTA_D)
    assert len(np.unique(seg)) == 5 and (seg[labels == 0] == 0).all()
    assert adapted_rand_error(seg, labels)["arand"] == 0.0


def test_clusters_closer_than_delta_d_are_one_object():
    points = np.array([[0.0, 0], [0.1, 0], [1.5, 0], [1.6, 0], [5.0, 0]])
    assignment = np.array([0, 0, 1, 1, 2])
    merged = merge_close_clusters(points, assignment, DELTA_D)
    assert merged[0] == merged[2] and merged[0] != merged[4]
    assert (merge_close_clusters(points, np.array([0, 0, -1, 1, 1]), DELTA_D)[2]) == -1  # noise stays noise


def test_consistency_clustering_drops_what_the_momentum_network_disagrees_with():
    """g agrees with f on three objects and scatters the fourth's pixels: f's four
    clusters are found, the scattered one is dropped."""
    emb, labels = _image()
    g = emb.copy()
    rng = np.random.default_rng(1)
    scattered = labels == 4
    g[:, scattered] = rng.normal(0, 3.0, (4, int(scattered.sum())))
    seg = cluster_embeddings(emb, "consistency", delta_v=DELTA_V, delta_d=DELTA_D, min_size=10,
                             background_embedding=[0.0] * 4, background_radius=DELTA_D, g_embeddings=g)
    assert len(np.unique(seg)) == 4 and not seg[scattered].any()
    assert adapted_rand_error(seg, np.where(scattered, 0, labels))["arand"] == 0.0
    with pytest.raises(SpocoInputError, match="momentum network"):
        cluster_embeddings(emb, "consistency", delta_v=DELTA_V, delta_d=DELTA_D)


def test_a_foreground_above_the_limit_is_refused_at_once(monkeypatch):
    emb, _ = _image()
    monkeypatch.setitem(clustering.MAX_PIXELS, "hdbscan", 1000)
    with pytest.raises(SpocoInputError, match="limited to 1,000"):
        cluster_embeddings(emb, "hdbscan", delta_v=DELTA_V, delta_d=DELTA_D)
    with pytest.raises(SpocoInputError, match="--clustering must be"):
        cluster_embeddings(emb, "kmeans", delta_v=DELTA_V, delta_d=DELTA_D)


def test_segment_clusters_whole_sections_of_real_em(tmp_path):
    """`segment --clustering hdbscan` on two sections of the bundled real EM sample:
    whole sections are the blocks, the labels are those of clustering each section in
    memory, and they find the mitochondria the watershed finds (AP@0.5 against the
    ground truth within 0.15 of it). A block shape that cuts a section is refused."""
    import os
    from spoco_vol import checkpoint, io
    from spoco_vol.blockwise import segment_blockwise
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol.pipeline import BUNDLED_MODEL, segment_array
    d = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    raw, gt = d["raw"][2:4, :384, :384], d["labels"][2:4, :384, :384]
    vs = [float(v) for v in d["voxel_size_nm"]]
    inp = str(tmp_path / "crop.zarr")
    io.create_array(inp, raw, chunks=(1, 192, 192), attrs={"voxel_size": vs})
    out = str(tmp_path / "hdbscan.zarr")
    report = segment_blockwise(inp, out, BUNDLED_MODEL, workers=0, device="cpu", clustering="hdbscan")
    assert report["blocks"] == 1 and report["block_shape"] == [2, 384, 384]
    labels = np.asarray(io.open_volume(out)[...])
    in_memory = segment_array(raw, checkpoint.load(BUNDLED_MODEL), input_voxel_size=vs, device="cpu",
                              clustering="hdbscan")
    assert adapted_rand_error(labels, in_memory)["arand"] == 0.0
    mws = segment_array(raw, checkpoint.load(BUNDLED_MODEL), input_voxel_size=vs, device="cpu")
    ap = evaluate_segmentation(labels, gt, per_section=True)["ap@0.5"]
    assert ap > evaluate_segmentation(mws, gt, per_section=True)["ap@0.5"] - 0.15 and int(labels.max()) >= 5
    with pytest.raises(SpocoInputError, match="whole images"):
        segment_blockwise(inp, str(tmp_path / "x.zarr"), BUNDLED_MODEL, workers=0, clustering="meanshift",
                          block_shape=[1, 192, 384])
    with pytest.raises(SpocoInputError, match="momentum network"):  # the bundled model keeps no g
        segment_blockwise(inp, str(tmp_path / "x.zarr"), BUNDLED_MODEL, workers=0, clustering="consistency")
    hashes = {c: segment_blockwise(inp, str(tmp_path / "x.zarr"), BUNDLED_MODEL, clustering=c, dry_run=True)
              ["run_hash"] for c in ("mws", "hdbscan", "meanshift")}
    assert len(set(hashes.values())) == 3


def test_consistency_clustering_uses_the_checkpoints_momentum_network(tmp_path):
    """A checkpoint that keeps g runs consistency clustering end to end. f maps the
    image to compact embeddings (every pixel within delta_v of one point); with g = f,
    the one cluster is kept, as mean-shift's; with a g that scatters it, it is dropped."""
    import torch
    from spoco_vol.checkpoint import make_checkpoint
    from spoco_vol.model import UNet
    from spoco_vol.pipeline import segment_array
    torch.manual_seed(0)
    f, g = UNet(dims=2, features=(4, 8), embedding_dim=4), UNet(dims=2, features=(4, 8), embedding_dim=4)
    with torch.no_grad():
        f.final.weight.mul_(0.01)  # embeddings within 0.1 of the bias
    raw = np.random.default_rng(0).integers(0, 256, (48, 48)).astype(np.uint8)

    def model(momentum):
        return make_checkpoint(f, delta_v=0.5, delta_d=2.0, normalization={"mean": 100.0, "std": 50.0},
                               voxel_size=None, training_data="", training_command="", momentum=momentum)
    same = segment_array(raw, model(f), device="cpu", clustering="consistency")
    assert same.max() == 1 and (same == 1).all()
    np.testing.assert_array_equal(same, segment_array(raw, model(f), device="cpu", clustering="meanshift"))
    with torch.no_grad():
        g.final.weight.mul_(100.0)  # a g whose embeddings spread far beyond delta_v
    assert not segment_array(raw, model(g), device="cpu", clustering="consistency").any()
