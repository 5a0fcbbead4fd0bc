"""spoco-vol: instance segmentation of large microscopy volumes from sparse annotations.

The SPOCO method (Wolny et al., CVPR 2022): a U-Net learns pixel embeddings from a few
annotated objects; affinities between embeddings are partitioned by the Mutex Watershed.

Python API (the CLI is a thin layer over these):
    spoco_vol.train(TrainConfig(...))       train or fine-tune a model from zarr volumes
    spoco_vol.segment(input, ...)           segment a zarr volume blockwise into OME-Zarr labels
    spoco_vol.evaluate_segmentation(p, gt)  AP@0.5, mAP, adapted Rand error, VOI
"""
__version__ = "0.1.0"
__all__ = ["TrainConfig", "evaluate_segmentation", "segment", "train", "__version__"]

from .evaluation import evaluate_segmentation  # noqa: E402
from .blockwise import segment_blockwise as segment  # noqa: E402
from .training import TrainConfig, train  # noqa: E402
