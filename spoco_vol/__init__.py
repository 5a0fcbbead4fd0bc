"""spoco-vol: instance segmentation of large microscopy volumes from sparse annotations.

The SPOCO method (Wolny et al., CVPR 2022): a U-Net learns pixel embeddings from a few
annotated objects; affinities between embeddings are partitioned by the Mutex Watershed.

Python API (the CLI is a thin layer over these; each has a docstring):
    spoco_vol.fine_tune(raw, labels, out)     fine-tune a bundled model on a few annotated objects (the
                                              recipe of `spoco-vol fine-tune`; keyword overrides)
    spoco_vol.train(TrainConfig(...))         train, fine-tune or resume a model from zarr volumes
    spoco_vol.calibrate(model, raw, labels, out)  re-measure a model's background rule on held-out data
    spoco_vol.segment(input, output, model, client=... | cluster="slurm" | workers=N, ...)
                                              segment a zarr volume blockwise into OME-Zarr labels;
                                              resumes an interrupted run
    spoco_vol.segment_affinities(affinities, output, offsets=..., bias=...)
                                              the same blockwise Mutex Watershed on given affinities
    spoco_vol.evaluate(pred_path, gt_path)    AP, mAP, ARand, VOI, SBD of two zarr label volumes, block by block
    spoco_vol.evaluate_segmentation(pred, gt) the same for two in-memory arrays
    spoco_vol.run_workflow("workflows/x.yaml", {"volume": ...})  a recipe's steps, resumable
    spoco_vol.load_cluster_config(name), spoco_vol.open_cluster(config)
                                              cluster configs (cluster_configs/*.yaml) and a
                                              context manager yielding a distributed Client
    spoco_vol.run_demo()                      the bundled sample, segmented and scored
"""
__version__ = "0.1.0"
__all__ = ["TrainConfig", "calibrate", "evaluate", "evaluate_segmentation", "fine_tune", "load_cluster_config", "open_cluster",
           "run_demo", "run_workflow", "segment", "segment_affinities", "train", "__version__"]

from .evaluation import evaluate_segmentation  # noqa: E402
from .evaluation_blockwise import evaluate_zarr as evaluate  # noqa: E402
from .blockwise import segment_blockwise as segment  # noqa: E402
from .blockwise import segment_affinities_blockwise as segment_affinities  # noqa: E402
from .cluster import load_cluster_config, open_cluster  # noqa: E402
from .demo import run_demo  # noqa: E402
from .calibration import recalibrate_checkpoint as calibrate  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .training import train  # noqa: E402


def fine_tune(raw, labels, out, model=None, **overrides) -> dict:
    """`spoco-vol fine-tune` from Python: ``raw``/``labels`` a path or a list of paths;
    ``model``: a bundled model's name or a checkpoint [default: the bundled default];
    ``dense=True``: every object annotated, label 0 is background (`--dense`);
    ``overrides``: any TrainConfig field. Returns the training summary."""
    from .config import fine_tune_config
    as_list = (lambda v: [v] if isinstance(v, str) else list(v))
    from .bundled import DEFAULT
    return train(fine_tune_config(as_list(raw), as_list(labels), out, model or DEFAULT, **overrides))
from .workflow import run_workflow  # noqa: E402
