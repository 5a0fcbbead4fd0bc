"""Tiled embedding prediction equals untiled prediction (the U-Net is local and aligned)."""
import numpy as np
import torch

from spoco_vol import inference
from spoco_vol.inference import predict_embeddings, resolve_device
from spoco_vol.model import UNet


def test_tiles_agree_exactly_with_one_tile():
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8, 16), norm="batch").eval()
    img = np.random.default_rng(0).normal(size=(100, 90)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[104, 96])
    tiled = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[24, 32])
    # equal up to float rounding: oneDNN picks its convolution blocking per tile shape
    np.testing.assert_allclose(whole, tiled, rtol=0, atol=1e-5)
    assert whole.shape == (16, 100, 90)


def test_group_norm_is_not_local():
    """Why BatchNorm is the default: GroupNorm statistics depend on the tile."""
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8, 16), norm="group").eval()
    img = np.random.default_rng(0).normal(size=(96, 96)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[96, 96])
    tiled = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[32, 32])
    assert np.abs(whole - tiled).max() > 1e-3


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_cpu_mixed_precision_only_with_native_bf16(monkeypatch):
    """bf16 autocast on a CPU without native bf16 runs reference kernels (46x slower than
    fp32, benchmarks/RESULTS.md): the default then stays in fp32."""
    cpu = torch.device("cpu")
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.ones(1, 1, 8, 8)
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    assert inference.autocast_dtype(cpu) is None
    with inference.autocast_context(cpu, True):
        assert conv(x).dtype == torch.float32
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    assert inference.autocast_dtype(cpu) == torch.bfloat16
    with inference.autocast_context(cpu, True):
        assert conv(x).dtype == torch.bfloat16
    with inference.autocast_context(cpu, False):
        assert conv(x).dtype == torch.float32


def test_test_time_augmentation_is_the_mean_of_the_eight_views():
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8), norm="batch").eval()
    img = np.random.default_rng(1).normal(size=(40, 56)).astype(np.float32)
    cpu = torch.device("cpu")
    plain = predict_embeddings(net, img, device=cpu, amp=False)
    tta = predict_embeddings(net, img, device=cpu, amp=False, tta=True)
    views = []
    for k in range(4):  # all 4 rotations of the image and of its mirror, predicted and turned back
        for mirror in (False, True):
            v = np.rot90(img[:, ::-1] if mirror else img, k)
            e = np.rot90(predict_embeddings(net, np.ascontiguousarray(v), device=cpu, amp=False), -k, axes=(1, 2))
            views.append(e[:, :, ::-1] if mirror else e)
    np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3  # an untrained net is not rotation-invariant
    # averaged over the whole group, the prediction turns with the image
    turned = predict_embeddings(net, np.ascontiguousarray(np.rot90(img)), device=cpu, amp=False, tta=True)
    np.testing.assert_allclose(np.rot90(turned, -1, axes=(1, 2)), tta, atol=1e-5)


def test_test_time_augmentation_3d_turns_in_plane():
    torch.manual_seed(0)
    net = UNet(dims=3, features=(4, 8), norm="batch", pool_factors=[[1, 2, 2]]).eval()
    img = np.random.default_rng(2).normal(size=(4, 24, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    tta = predict_embeddings(net, img, device=cpu, amp=False, tta=True)
    flipped = predict_embeddings(net, np.ascontiguousarray(img[:, :, ::-1]), device=cpu, amp=False, tta=True)
    assert tta.shape == (16, 4, 24, 32)
    np.testing.assert_allclose(flipped[..., ::-1], tta, atol=1e-5)


def test_channels_last_inference_gives_the_same_objects_on_real_em():
    """for_inference lays the bundled U-Net out channels-last (faster oneDNN kernels,
    another summation order): embeddings within a few hundredths (the pull margin is
    0.5), the same objects on the real VNC sample, and a layout-aware tiler that still
    agrees across tile shapes."""
    import os
    from spoco_vol import checkpoint, transforms
    from spoco_vol.evaluation import adapted_rand_error
    from spoco_vol.pipeline import BUNDLED_MODEL, segment_array
    ckpt = checkpoint.load(BUNDLED_MODEL)
    sample = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    raw, vs = sample["raw"][:2], [float(v) for v in sample["voxel_size_nm"]]
    cpu = torch.device("cpu")
    image = transforms.normalize(raw[0, ::2, ::2].astype(np.float32), ckpt.normalization)
    plain = predict_embeddings(ckpt.network(), image, device=cpu)
    fast_net = inference.for_inference(ckpt.network())
    fast = predict_embeddings(fast_net, image, device=cpu)
    assert np.abs(plain - fast).max() < 0.05
    tiled = predict_embeddings(fast_net, image, device=cpu, tile_shape=[96, 128])
    assert np.abs(tiled - fast).max() < 0.05
    a = segment_array(raw, ckpt, input_voxel_size=vs, device="cpu", net=ckpt.network())
    b = segment_array(raw, ckpt, input_voxel_size=vs, device="cpu")  # for_inference inside
    assert a.max() > 10 and adapted_rand_error(b, a)["arand"] <= 0.01
