"""The ``spoco-vol`` command line: thin click wrappers around the Python API."""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex

import click

from . import bundled
from .config import FINE_TUNE_RECIPE, FOREGROUND_ITERATIONS, TrainConfig
from .errors import SpocoInputError, SpocoRunError
from .stitching import LINK_OVERLAP

_D = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # defaults live in the config class


def _csv(values) -> str:
    """A sequence default as the command line writes it (256,256)."""
    return ",".join(map(str, values))


class InputError(click.ClickException):
    """One error line, exit code 2 (the contract for bad input)."""
    exit_code = 2


def _numbers(kind):
    class Numbers(click.ParamType):
        name = "N,N[,N]"

        def convert(self, value, param, ctx):
            if isinstance(value, (list, tuple)):
                return [kind(v) for v in value]
            try:
                return [kind(v) for v in str(value).replace("x", ",").replace(" ", ",").split(",") if v]
            except ValueError:
                self.fail(f"{value!r} is not a list of numbers like 256,256", param, ctx)
    return Numbers()


INTS, FLOATS = _numbers(int), _numbers(float)


class _Offsets(click.ParamType):
    name = "Z,Y,X;Z,Y,X;..."

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [list(map(int, o)) for o in value]
        try:
            return [[int(v) for v in part.split(",")] for part in str(value).split(";") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a list of offsets like '-1,0,0;0,-1,0;0,0,-1;-9,0,0'", param, ctx)


OFFSETS = _Offsets()


def _command_line() -> str:
    """The running command, rebuilt from its parsed options (canonical, defaults left out)."""
    ctx = click.get_current_context()
    words = ["spoco-vol", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or value == () or value == param.get_default(ctx):
            continue
        if isinstance(param.get_default(ctx), str) and isinstance(value, list) \
                and value == param.type.convert(param.get_default(ctx), param, ctx):
            continue
        if param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        for v in (value if param.multiple else [value]):
            words += [param.opts[0], ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return " ".join(shlex.quote(w) for w in words)


def _assignments(items, option: str, parse: bool = True) -> dict:
    """NAME=VALUE strings -> {NAME: value}; with ``parse`` values are read as YAML
    (numbers, null, lists), else kept as strings for the receiver to type."""
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"{option} takes NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        try:
            out[name.strip()] = (yaml.safe_load(value) if parse else value) if value else None
        except yaml.YAMLError:
            out[name.strip()] = value
    return out


class RunStopped(click.ClickException):
    """A run that stopped partway: one error line, exit code 1 (130 / 143 after SIGINT /
    SIGTERM); its finished work is kept and the same command resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SpocoInputError as exc:
        raise InputError(str(exc)) from None
    except SpocoRunError as exc:
        # zarr's reads abandoned with the failed blocks are collected at exit, where asyncio
        # would log "Task was destroyed but it is pending!" after the one error line
        logging.getLogger("asyncio").disabled = True
        raise RunStopped(str(exc), exc.exit_code) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spoco-vol")
def cli():
    """Instance segmentation of microscopy volumes from sparse annotations (SPOCO).

    Start with `spoco-vol demo`: it segments a bundled EM sample with the bundled model.
    """


@cli.command()
@click.option("--raw", "raw", multiple=True, required=True,
              help="Raw zarr array (vol.zarr or vol.zarr/raw). Repeat for several volumes.")
@click.option("--labels", "labels", multiple=True, required=True,
              help="Label zarr array (integers, 0 = unlabeled), one per --raw.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (checkpoints, log.csv, loss.png).")
@click.option("--dims", type=click.IntRange(2, 3), default=None,
              help="2: a 2D model trained on sections; 3: a 3D model [default: --init's, else 2].")
@click.option("--patch-shape", type=INTS, default=None,
              help="Patch size in model pixels (after --downsample), e.g. 256,256 or 32,128,128 [default: --init's, "
                   "else 256,256 for a 2D model; a 3D model trained from scratch needs it].")
@click.option("--loss-margin", type=INTS, default=None,
              help="Model pixels at each patch side left out of the loss (one number, or one per axis): their "
                   "embeddings depend on the network's zero padding, which inference never sees. On the 3D nuclei "
                   "crops it made the model fit its training crop better but not the other crop "
                   "(benchmarks/RESULTS.md, 3D), so it is off by default [default: --init's, else 0].")
@click.option("--batch-size", type=click.IntRange(1), default=_D["batch_size"], show_default=True)
@click.option("--iterations", type=click.IntRange(1), default=_D["iterations"], show_default=True)
@click.option("--object-fraction", type=float, default=_D["object_fraction"], show_default=True,
              help="Keep a seeded random fraction P of the annotated objects (SPOCO@P). "
                   "1 = use labels as they are; below 1 trains in the sparse (positive-unlabeled) mode.")
@click.option("--mode", type=click.Choice(["auto", "sparse", "full"]), default=_D["mode"], show_default=True,
              help="full: background (0) is an object; sparse: 0 is unlabeled. auto: full iff P = 1.")
@click.option("--init", default=None,
              help="Fine-tune from this checkpoint, a path or a bundled model's name (`spoco-vol models`); lr 2e-5 by "
                   "default, the data are resampled to its voxel size unless --downsample is given, its "
                   "dimensionality, patch shape, loss margin and offsets are kept unless given, and with "
                   "held-out data the start model is the first candidate for best.pt.")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 1e-3 with full labels, 2e-4 with sparse ones, 2e-5 with --init].")
@click.option("--schedule", type=click.Choice(["cosine", "plateau"]), default=_D["schedule"], show_default=True)
@click.option("--features", type=INTS, default=_csv(_D["features"]), show_default=True,
              help="U-Net features per level.")
@click.option("--norm", type=click.Choice(["group", "batch"]), default=_D["norm"], show_default=True,
              help="batch: at inference a fixed per-channel map, so a voxel's embedding does not depend on "
                   "the block around it (blockwise = whole volume); group: statistics of each tile.")
@click.option("--pool-factors", type=INTS, default=None,
              help="Per-level pooling factors, flattened, e.g. 1,2,2,1,2,2,2,2,2 for 3 poolings in 3D "
                   "[default: 2 on every axis].")
@click.option("--embedding-dim", type=int, default=_D["embedding_dim"], show_default=True)
@click.option("--delta-v", type=float, default=_D["delta_v"], show_default=True, help="Pull margin (embedding units).")
@click.option("--delta-d", type=float, default=_D["delta_d"], show_default=True, help="Push margin (embedding units).")
@click.option("--threshold", type=float, default=_D["threshold"], show_default=True,
              help="Soft-mask kernel threshold t.")
@click.option("--loss", type=click.Choice(["spoco", "discriminative"]), default=_D["loss"], show_default=True,
              help="spoco: every term below; discriminative: the baseline of De Brabandere et al. (pull, push and "
                   "regulariser only), for ablations.")
@click.option("--consistency-network", type=click.Choice(["momentum", "shared", "dropout", "separate"]),
              default=_D["consistency_network"], show_default=True,
              help="The consistency term's g: a momentum (EMA) copy of f, f itself (shared weights), f with dropout, "
                   "or a separately trained network.")
@click.option("--dropout", type=float, default=None,
              help="Channel dropout in the U-Net during training [default: 0.1 with --consistency-network dropout, "
                   "else none].")
@click.option("--consistency-weight", type=float, default=_D["consistency_weight"], show_default=True,
              help="Weight of the embedding-consistency term (0 disables the momentum network).")
@click.option("--unlabeled-weight", type=float, default=_D["unlabeled_weight"], show_default=True,
              help="Weight of the unlabeled push.")
@click.option("--instance-weight", type=float, default=_D["instance_weight"], show_default=True,
              help="Weight of the instance (soft-mask Dice) term.")
@click.option("--background-weight", type=float, default=_D["background_weight"], show_default=True,
              help="Sparse mode: weight of the pseudo-background term (the unlabeled pixels at the mode "
                   "of the momentum network's embeddings are pulled into one cluster).")
@click.option("--no-background", is_flag=True,
              help="Every voxel belongs to an object (dense tissue, e.g. cells with stained boundaries): label 0 "
                   "is unlabeled, never background, and the model segments without a background rule.")
@click.option("--background-select-radius", type=click.FloatRange(0, min_open=True), default=None,
              help="Pseudo-background term: unlabeled pixels whose momentum embedding lies within this "
                   "distance of the background mode count as background [default: --delta-d].")
@click.option("--background-warmup", type=click.IntRange(0), default=_D["background_warmup"], show_default=True,
              help="Iterations before the pseudo-background term starts.")
@click.option("--momentum", type=float, default=_D["momentum"], show_default=True, help="EMA momentum m of network g.")
@click.option("--momentum-ramp", is_flag=True,
              help="Ramp g's momentum up as min(m, 1 - 1/(t + 1)) at step t (the mean teacher's ramp): g is the "
                   "running mean of f's iterates until m takes over, so f's initial weights leave g; with the "
                   "constant m, 0.999^t of them stay (14% after 2000 steps).")
@click.option("--adversarial-weight", type=float, default=_D["adversarial_weight"], show_default=True,
              help="beta of the adversarial instance term: a WGAN-GP critic tells ground-truth instance masks from "
                   "the embeddings' soft masks (paper, appendix A.1); 0: off.")
@click.option("--offset-distances", type=INTS, default=None,
              help="Long-range affinity offsets of inference, in model pixels along each axis [default: with --init, "
                   "the model's; else 3,9,27]; shorter ones suit small objects and need a smaller blockwise halo.")
@click.option("--downsample", type=FLOATS, default=None,
              help="Input voxels per model pixel (z,y,x), e.g. 1,2,2 to train at half XY resolution "
                   "[default: with --init, what brings the data's voxel size to the model's; else 1,1,1].")
@click.option("--voxel-size", type=FLOATS, default=None,
              help="Voxel size of the raw data in nm (z,y,x) [default: from the zarr metadata].")
@click.option("--val-raw", multiple=True, help="Validation raw volume(s).")
@click.option("--val-labels", multiple=True, help="Validation labels, one per --val-raw.")
@click.option("--val-sections", type=click.IntRange(0), default=None,
              help="Without --val-raw: hold out the last N z-sections of each volume, fully labeled "
                   "[default with full labels: 1 for a 2D model, one patch deep for a 3D one, at most a third of the "
                   "volume's sections; with sparse labels "
                   "objects are held out, --val-objects]. A 2D model is scored on each section's first 1024 x 1024 "
                   "model pixels, up to 8 Mpx in all.")
@click.option("--val-objects", type=float, default=_D["val_objects"], show_default=True,
              help="Sparse labels without --val-raw/--val-sections: the seeded share of the annotated objects "
                   "held out from training to choose the checkpoint and calibrate the background.")
@click.option("--val-every", type=click.IntRange(1), default=_D["val_every"], show_default=True,
              help="Iterations between validations/checkpoints.")
@click.option("--elastic/--no-elastic", default=_D["elastic"], show_default=True,
              help="Elastic deformation augmentation.")
@click.option("--intensity-jitter", type=float, default=_D["intensity_jitter"], show_default=True,
              help="Intensity augmentation per patch: contrast times 1 +- J and brightness +- J (in units of the "
                   "data's std), uniform; larger for data whose brightness varies between specimens.")
@click.option("--colour-jitter", type=float, default=_D["colour_jitter"], show_default=True,
              help="Photometric augmentation drawn anew for each network's input, as the reference code trains "
                   "on CVPPP: with probability 1/2 brightness, contrast and saturation times 1 +- S and a hue "
                   "turn of up to S/4 (three channels), grey with probability 0.2 (several channels), blur with "
                   "probability 1/2. 0: off; the reference uses 0.4.")
@click.option("--seed", type=int, default=_D["seed"], show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_D["device"], show_default=True)
@click.option("--amp/--no-amp", default=_D["amp"], show_default=True,
              help="Mixed precision where the hardware runs it natively: bf16 (fp16 with loss scaling on GPUs "
                   "without bf16); fp32 on CPUs without native bf16.")
@click.option("--tta/--no-tta", default=_D["tta"], show_default=True,
              help="Validate and calibrate with test-time augmentation (8 rotated/flipped predictions "
                   "averaged, 8x the prediction time) and without it; the model keeps it, and then segments "
                   "with it by default, unless the held-out score without it is higher by more than 0.05. "
                   "Recommended for sparse labels.")
@click.option("--foreground-iterations", type=click.IntRange(0), default=_D["foreground_iterations"],
              show_default=True,
              help="Then train a foreground classifier this many iterations (positive-unlabeled with sparse labels, "
                   "supervised with full ones; its pixels called background are background at inference). Kept "
                   "in best.pt if it raises the held-out score. 600 suits the VNC recipe.")
@click.option("--foreground-prior", type=float, default=None,
              help="Share of the unlabeled pixels that belong to (unannotated) objects, for the foreground "
                   "classifier [default: estimated from --object-fraction and the annotated area].")
@click.option("--intensity-range", type=FLOATS, default=None, metavar="LO,HI",
              help="The raw values that map to the model's intensity range [default: by dtype, as segment].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for training [default: all cores].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--stop-after", type=click.IntRange(1), default=None,
              help="Stop after N iterations of this run, saving a resumable latest.pt (walltime-limited jobs).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty --out.")
@click.option("--progress/--quiet", default=True, help="Show a progress bar.")
def train(**settings):
    """Train (or fine-tune) a SPOCO embedding model from sparse or full annotations."""
    from .training import train as train_fn
    settings.update(raw=list(settings["raw"]), labels=list(settings["labels"]), val_raw=list(settings["val_raw"]),
                    val_labels=list(settings["val_labels"]))
    summary = _run(lambda: train_fn(TrainConfig(**settings, command=_command_line())))
    click.echo(json.dumps(summary, indent=2))


@cli.command("fine-tune")
@click.option("--raw", "raw", multiple=True, required=True,
              help="Raw zarr array of your volume (vol.zarr or vol.zarr/raw). Repeat for several volumes.")
@click.option("--labels", "labels", multiple=True, required=True,
              help="Your annotations, one per --raw: integer ids of the objects you annotated, 0 = not annotated "
                   "(background and unannotated objects alike; with --dense, background).")
@click.option("--out", required=True, type=click.Path(), help="Output directory (best.pt, log.csv, loss.png).")
@click.option("--model", default=bundled.DEFAULT, show_default=True,
              help="The model to start from: a bundled model's name (`spoco-vol models`) or a checkpoint path.")
@click.option("--iterations", type=click.IntRange(1), default=FINE_TUNE_RECIPE["iterations"], show_default=True,
              help="Training iterations (the recipe's: config.FINE_TUNE_RECIPE).")
@click.option("--voxel-size", type=FLOATS, default=None,
              help="Voxel size of the raw data in nm (z,y,x) [default: from the zarr metadata]; the data are "
                   "resampled to the model's voxel size.")
@click.option("--val-objects", type=float, default=_D["val_objects"], show_default=True,
              help="Share of your annotated objects held out to choose the checkpoint and calibrate the background.")
@click.option("--no-background", is_flag=True,
              help="Every voxel belongs to an object (dense tissue, e.g. cells with stained boundaries): the "
                   "recipe then has no pseudo-background term, no foreground classifier and no background rule.")
@click.option("--dense", is_flag=True,
              help="You annotated every object of the volume, so label 0 is background (crop the raw and labels to "
                   "the annotated region): trained as full labels, the last sections held out (one of a 2D stack; "
                   "a third of a 3D one, up to one patch deep), the foreground classifier trained on your background.")
@click.option("--seed", type=int, default=_D["seed"], show_default=True)
@click.option("--intensity-range", type=FLOATS, default=None, metavar="LO,HI",
              help="The raw values that map to the model's intensity range [default: by dtype, as segment].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_D["device"], show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty --out.")
@click.option("--progress/--quiet", default=True, help="Show progress bars.")
def fine_tune(raw, labels, out, model, **settings):
    """Fine-tune a model on the few objects you annotated in your volume (the recommended start).

    Runs the sparse-annotation recipe (benchmarks/RESULTS.md, "Transfer to Lucchi"): your
    annotations are sparse (0 = unlabeled), the data are resampled to the model's voxel
    size, a share of your objects is held out to choose the checkpoint and calibrate the
    background, with a pseudo-background term, test-time augmentation and a foreground
    classifier. With --dense (every object annotated) the labels are full instead.
    Then: spoco-vol segment --input VOL --model OUT/best.pt"""
    from .config import fine_tune_config
    from .training import train as train_fn
    cfg = _run(fine_tune_config, list(raw), list(labels), out, model, **settings, command=_command_line())
    summary = _run(train_fn, cfg)
    click.echo(json.dumps(summary, indent=2))


@cli.command()
def models():
    """List the bundled models: name, voxel size, modality, held-out scores, model card."""
    from .bundled import list_models
    for m in _run(list_models):
        from .io import format_voxel_size
        vs = format_voxel_size(m["voxel_size_nm"])
        click.echo(f"{m['name']}\n  {m['dims']}D, {vs}; {m['modality']}\n  held out: {m['held_out']}\n"
                   f"  card: {m['card']}\n  file: {m['path']}")


@cli.command()
@click.option("--input", "input_path", required=True, help="Zarr array to segment (vol.zarr or vol.zarr/path).")
@click.option("--output", default=None,
              help="OME-Zarr labels to write [default: an OME-Zarr image's own labels group, image.zarr/labels/"
                   "spoco; else <store>_<array>_labels.zarr beside the input].")
@click.option("--model", default=None,
              help="Checkpoint: a path or a bundled model's name (`spoco-vol models`) [default: vnc-mito-2d].")
@click.option("--block-shape", type=INTS, default=None,
              help="Block (write ROI) shape in input voxels, z,y,x [default for 2D models: 8 sections of 768 x 768 "
                   "model pixels, e.g. 8,1536,1536 at half the model's voxel size, about 1.2 GiB per worker; "
                   "64,256,256 for 3D models]. Smaller blocks use less memory and predict more halo.")
@click.option("--halo", type=INTS, default=None,
              help="Context per side in input voxels [default: the model's field of view plus the longest offset].")
@click.option("--mask", default=None,
              help="Zarr foreground mask of the input's shape: voxels outside it are background, blocks without "
                   "foreground are skipped (e.g. a tissue mask, or a ground-truth foreground).")
@click.option("--mask-is-foreground", is_flag=True,
              help="Every voxel inside --mask belongs to some object (a ground-truth or semantic foreground): the "
                   "mask alone decides the background, the model's own background rules (its foreground "
                   "classifier, its background embedding) are not applied [default: the mask only adds "
                   "background, as a tissue mask].")
@click.option("--no-foreground-classifier", is_flag=True,
              help="Leave out the model's foreground classifier (`spoco-vol info` shows whether it has one): the "
                   "embeddings' own background rule decides the background, as for a model without one.")
@click.option("--min-size", type=click.IntRange(0), default=None,
              help="Objects smaller than this many voxels of the model's grid become background [default: the "
                   "model's floor, chosen on its validation data; `spoco-vol info` shows it].")
@click.option("--voxel-size", type=FLOATS, default=None,
              help="Input voxel size in nm (z,y,x) [default: from the zarr metadata].")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Dask workers: processes on this machine (0: run in this process) [default: one per core], or with "
                   "--cluster the number of workers / SLURM jobs [default: the config's].")
@click.option("--cluster", "cluster", default=None,
              help="Cluster config: a name from cluster_configs/ (local, slurm, gateway; see `spoco-vol "
                   "clusters`) or a YAML path [default: a LocalCluster of --workers processes].")
@click.option("--cluster-set", "cluster_set", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of the --cluster file (repeatable), e.g. --cluster-set walltime=12:00:00 "
                   "--cluster-set queue=gpu.")
@click.option("--stitch/--no-stitch", default=True, show_default=True, help="Merge objects across block faces.")
@click.option("--seams", type=click.Choice(["auto", "faces", "graph"]), default="auto", show_default=True,
              help="How objects are joined across blocks: faces (each face by its two blocks; exact where objects "
                   "are kept apart by background, e.g. mitochondria, nuclei), graph (one Mutex Watershed over all "
                   "blocks' fragments: the whole volume's result also for touching cells; keeps the core "
                   "affinities, 4 bytes per voxel and offset, until the run ends), auto: graph for a model with "
                   "the input's axes (at its voxel size or an integer downsampling of it) on up to 1e9 voxels, "
                   "faces for a 2D model's sections and larger volumes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--roi", default=None,
              help="Segment only this region, z0:z1,y0:y1,x0:x1 in input voxels (stop exclusive; an empty "
                   "bound is the edge, e.g. ':,0:1024,:'); the output keeps the input's shape, 0 outside.")
@click.option("--save-embeddings", is_flag=True,
              help="Also keep the embeddings (float16, model grid) as the output's 'embeddings' array. "
                   "Large: 32 bytes per model voxel with E=16.")
@click.option("--save-affinities", type=click.Choice(["float16", "uint8"]), is_flag=False, flag_value="float16",
              default=None,
              help="Also keep the Mutex Watershed's affinities (model grid, channels first, offsets in the attributes; "
                   "uint8 holds round(255 w)) as the output's 'affinities' array, and the pixels that take part "
                   "in it as 'foreground': what `spoco-vol segment-affinities` and other tools take. "
                   "2 bytes (float16) per model voxel and offset.")
@click.option("--link-sections", is_flag=True,
              help="2D model on a 3D volume: join per-section objects across sections by overlap.")
@click.option("--link-overlap", type=float, default=LINK_OVERLAP, show_default=True,
              help="With --link-sections: the fraction of the smaller object two objects of consecutive "
                   "sections must share to be joined.")
@click.option("--tta/--no-tta", default=None,
              help="Test-time augmentation: average 8 rotated/flipped predictions (8x the prediction time) "
                   "[default: as the model was calibrated].")
@click.option("--intensity-range", type=FLOATS, default=None, metavar="LO,HI",
              help="The input values that map to the model's darkest and brightest (its training range) "
                   "[default: by the input's dtype: uint8 as is, other integers by their bit depth, floats in "
                   "[0, 1] as 0..1; README 'Inputs as they come'].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and discard an interrupted run "
                                                 "with other settings).")
@click.option("--clustering", type=click.Choice(["mws", "hdbscan", "meanshift", "consistency"]), default="mws",
              show_default=True,
              help="How embeddings become objects: the Mutex Watershed on their affinities (blockwise, any size), "
                   "or HDBSCAN, mean-shift, or consistency clustering (mean-shift clusters the momentum network "
                   "agrees with) of the pixels' embeddings, on whole images (sections of a 2D model, the volume of "
                   "a 3D one): small volumes only, minutes per image.")
@click.option("--progress/--quiet", default=True, help="Show progress bars.")
def segment(input_path, output, model, block_shape, halo, mask, mask_is_foreground, no_foreground_classifier,
            min_size, voxel_size, workers, cluster, cluster_set, stitch, seams, device, roi, save_embeddings,
            save_affinities, link_sections, link_overlap, tta, intensity_range, clustering, overwrite, progress):
    """Segment a zarr volume block by block into objects (OME-Zarr labels, 0 = background).

    An interrupted run (killed, pre-empted) leaves <output>.partial; the same command
    again resumes it and gives the labels an uninterrupted run would have given."""
    from .blockwise import format_report, segment_blockwise
    report = _run(segment_blockwise, input_path, output, model, block_shape=block_shape, halo=halo,
                  mask=mask, voxel_size=voxel_size, workers=workers, device=device, overwrite=overwrite,
                  stitch=stitch, roi=roi, save_embeddings=save_embeddings,
                  link_sections=link_sections, link_overlap=link_overlap, cluster=_cluster(cluster, cluster_set),
                  command=_command_line(), progress=progress, tta=tta, intensity_range=intensity_range,
                  clustering=clustering, save_affinities=save_affinities, seams=seams, min_size=min_size,
                  mask_is_foreground=mask_is_foreground, no_foreground_classifier=no_foreground_classifier)
    click.echo(format_report(report))


def _cluster(cluster, cluster_set):
    """--cluster with its --cluster-set overrides applied (a config dict), or as given."""
    if not cluster_set:
        return cluster
    if not cluster:
        raise InputError("--cluster-set needs --cluster")
    from .cluster import load_cluster_config
    return _run(load_cluster_config, cluster, _assignments(cluster_set, "--cluster-set", parse=False))


@cli.command("segment-affinities")
@click.option("--affinities", required=True,
              help="Zarr array of affinities (C, Y, X) or (C, Z, Y, X) in [0, 1] (1 = same object), float or uint8 "
                   "(value / 255): from `segment --save-affinities` (out.zarr/affinities) or another network.")
@click.option("--offsets", type=OFFSETS, default=None,
              help="Per channel, the offset of the voxel its affinity pairs with, z,y,x;z,y,x;... (numpy axis "
                   "order; fewer values per offset leave the leading axes out) [default: the array's 'offsets' "
                   "attribute].")
@click.option("--bias", type=FLOATS, default=None,
              help="Added to the affinities, as in mwatershed and volara: one value per channel, or one for the "
                   "long-range channels; positive merges, negative repels [default: 0 on direct neighbours, -1 on "
                   "long-range offsets: affinity w merges, 1 - w repels].")
@click.option("--strides", type=INTS, default=None,
              help="Keep repulsive edges on this regular grid only (faster) [default: the array's attribute, "
                   "else all edges].")
@click.option("--min-size", type=click.IntRange(0), default=None,
              help="Objects smaller than this (voxels) become background [default: the array's attribute, else 0].")
@click.option("--mask", default=None,
              help="Zarr mask of the affinities' spatial shape: voxels outside it are background (e.g. "
                   "out.zarr/foreground of `segment --save-affinities`).")
@click.option("--output", default=None, help="OME-Zarr labels to write [default: <store>_<array>_labels.zarr].")
@click.option("--voxel-size", type=FLOATS, default=None,
              help="Voxel size of the affinities' grid in nm [default: the array's attribute, else unknown].")
@click.option("--block-shape", type=INTS, default=None,
              help="Block (write ROI) shape in voxels [default: 8,768,768 for offsets within sections, "
                   "64,256,256 for 3D offsets].")
@click.option("--halo", type=INTS, default=None,
              help="Context per side in voxels [default: the longest offset; twice that with graph seams].")
@click.option("--roi", default=None, help="Segment only this region, z0:z1,y0:y1,x0:x1 (as for segment).")
@click.option("--stitch/--no-stitch", default=True, show_default=True, help="Merge objects across block faces.")
@click.option("--seams", type=click.Choice(["auto", "faces", "graph"]), default="auto", show_default=True,
              help="How objects are joined across blocks: faces (each face by its two blocks; exact where objects "
                   "are kept apart by background, e.g. mitochondria, nuclei), graph (one Mutex Watershed over all "
                   "blocks' fragments: the whole volume's result also for touching cells; keeps the core "
                   "affinities, 4 bytes per voxel and offset, until the run ends), auto: graph for offsets along "
                   "every axis on up to 1e9 voxels, faces for offsets within sections and larger volumes.")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Dask workers (as for segment) [default: one per core].")
@click.option("--cluster", "cluster", default=None, help="Cluster config (as for segment).")
@click.option("--cluster-set", "cluster_set", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of the --cluster file (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and discard an interrupted run "
                                                 "with other settings).")
@click.option("--progress/--quiet", default=True, help="Show progress bars.")
def segment_affinities(affinities, offsets, bias, strides, min_size, mask, output, voxel_size, block_shape, halo,
                       roi, stitch, seams, workers, cluster, cluster_set, overwrite, progress):
    """Segment given affinities block by block with the Mutex Watershed (OME-Zarr labels).

    The same blockwise watershed, stitching, relabelling, resume and clusters as
    `segment`, on affinities from any network; an interrupted run resumes with the same
    command."""
    from .blockwise import format_report, segment_affinities_blockwise
    report = _run(segment_affinities_blockwise, affinities, output, offsets=offsets, bias=bias, strides=strides,
                  min_size=min_size, mask=mask, voxel_size=voxel_size, block_shape=block_shape, halo=halo,
                  roi=roi, stitch=stitch, seams=seams, workers=workers, cluster=_cluster(cluster, cluster_set),
                  overwrite=overwrite, command=_command_line(), progress=progress)
    click.echo(format_report(report))


@cli.command("run")
@click.argument("recipe")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Set a recipe variable (repeatable), e.g. --set volume=/data/my.zarr.")
def run_recipe(recipe, assignments):
    """Run a workflow recipe (workflows/*.yaml): its steps in order, skipping steps whose
    outputs are complete and were made with the same settings; an interrupted recipe
    resumes where it stopped."""
    from .workflow import run_workflow
    _run(run_workflow, recipe, _assignments(assignments, "--set"), log=lambda line: click.echo(line, err=True))


@cli.command()
def clusters():
    """List the cluster configs (./cluster_configs and the shipped ones) and validate each."""
    from .cluster import list_cluster_configs
    rows = list_cluster_configs()
    for name, path, status in rows:
        click.echo(f"{name:<12} {status}\n{'':<12} {path}")
    if any(status.startswith("invalid") for _, _, status in rows):
        raise InputError("some cluster configs are invalid (see above)")


@cli.command()
@click.option("--pred", required=True, help="Predicted labels (zarr array or OME-Zarr group).")
@click.option("--gt", required=True, help="Ground-truth labels (zarr), 0 = background.")
@click.option("--per-section", is_flag=True, help="Objects are the 2D objects of each z-section.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(pred, gt, per_section, as_json):
    """Instance metrics against ground truth, block by block (volumes of any size).

    AP@0.5, AP@0.75 and mAP over IoU 0.50:0.05:0.95 (MitoEM/COCO; predicted objects
    ranked by size), AP by object size, precision/recall at IoU 0.5, adapted Rand error,
    variation of information (split and merge parts), Symmetric Best Dice and |DiC|
    (CVPPP)."""
    from .evaluation import format_metrics
    from .evaluation_blockwise import evaluate_zarr
    metrics = _run(evaluate_zarr, pred, gt, per_section)
    click.echo(json.dumps(metrics, indent=2) if as_json else format_metrics(metrics))


@cli.command()
@click.option("--out", default=None, type=click.Path(),
              help="Directory for the sample and its labels [default: a new temporary directory].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace outputs of an earlier demo in --out.")
def demo(out, device, overwrite):
    """Segment the bundled VNC EM sample with the bundled model and score it."""
    from .demo import run_demo
    result = _run(run_demo, out, device=device, overwrite=overwrite)
    click.echo(result["text"])


@cli.command()
@click.option("--model", required=True, help="Checkpoint to calibrate: a bundled model's name or a path.")
@click.option("--raw", required=True, help="Raw zarr array with labeled objects (held out from training).")
@click.option("--labels", required=True, help="Labels of --raw (0 = background).")
@click.option("--out", required=True, type=click.Path(), help="Where to write the calibrated checkpoint.")
@click.option("--z-range", type=INTS, default=None, help="Use sections START,STOP of --raw only.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--tta/--no-tta", default=None,
              help="Calibrate with test-time augmentation (8 rotated/flipped predictions averaged); the "
                   "checkpoint then segments with it by default [default: as the model already does].")
@click.option("--intensity-range", type=FLOATS, default=None, metavar="LO,HI",
              help="The raw values that map to the model's intensity range [default: by dtype, as segment].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def calibrate(model, raw, labels, out, z_range, device, tta, intensity_range, overwrite):
    """Re-measure a model's background embedding and radius on labeled data (AP@0.5),
    then its size floor (F1 of matched objects)."""
    import os
    from .calibration import recalibrate_checkpoint
    if os.path.exists(out) and not overwrite:
        raise InputError(f"{out} exists (use --overwrite to replace it)")
    result = _run(recalibrate_checkpoint, model, raw, labels, out,
                  z_range=tuple(z_range) if z_range else None, device=device, tta=tta,
                  intensity_range=intensity_range)
    click.echo(json.dumps(result, indent=2))


@cli.command("train-foreground")
@click.option("--model", required=True, help="A trained checkpoint, or a bundled model's name.")
@click.option("--raw", "raw", multiple=True, required=True, help="The raw zarr array(s) it was trained on.")
@click.option("--labels", "labels", multiple=True, required=True, help="Their labels, one per --raw (0 = unlabeled).")
@click.option("--out", required=True, type=click.Path(), help="Where to write the checkpoint with the classifier.")
@click.option("--object-fraction", type=float, default=None,
              help="As given to train: the same SPOCO@p subset of the objects (with --seed) [default: as the "
                   "checkpoint records].")
@click.option("--seed", type=int, default=None, help="As given to train [default: as the checkpoint records].")
@click.option("--foreground-prior", type=float, default=None,
              help="Share of the unlabeled pixels that belong to objects [default: from --object-fraction, "
                   "else estimated from the embeddings].")
@click.option("--iterations", type=click.IntRange(1), default=FOREGROUND_ITERATIONS, show_default=True)
@click.option("--val-sections", type=click.IntRange(1), default=None,
              help="Last sections of each volume held out to choose the iteration [default: the objects the "
                   "checkpoint's training held out, else as train holds out dense labels: a 2D model's last "
                   "section, a 3D model's last patch depth, at most a third of the volume's sections].")
@click.option("--val-objects", type=float, default=None,
              help="Share of the annotated objects held out, as given to train [default: as the checkpoint "
                   "records].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all cores].")
@click.option("--intensity-range", type=FLOATS, default=None, metavar="LO,HI",
              help="The raw values that map to the model's intensity range [default: by dtype, as segment].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--progress/--quiet", default=True, help="Show a progress bar.")
def train_foreground(model, raw, labels, out, overwrite, **settings):
    """Add a foreground classifier (positive-unlabeled) to a sparse-label checkpoint."""
    import os
    from .foreground import add_classifier
    if os.path.exists(out) and not overwrite:
        raise InputError(f"{out} exists (use --overwrite to replace it)")
    result = _run(add_classifier, model, list(raw), list(labels), out, **settings)
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.argument("checkpoint", required=False)
def info(checkpoint):
    """Show what a checkpoint holds [default: the bundled model]."""
    from . import checkpoint as checkpoint_mod
    from .bundled import model_path
    ck = _run(lambda: checkpoint_mod.load(model_path(checkpoint)))
    shown = ck.summary()
    shown["parameters"] = int(sum(v.numel() for v in ck.state_dict.values()))
    click.echo(json.dumps(shown, indent=2, default=str))


def _one_line_warnings():
    """SpocoWarning as one ``Warning:`` line on stderr; other warnings as Python shows them."""
    import sys
    import warnings
    from .errors import SpocoWarning
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SpocoWarning):
            print(f"Warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def main():
    _one_line_warnings()
    cli()


if __name__ == "__main__":
    main()
