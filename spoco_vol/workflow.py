"""Recipes: a YAML list of steps (fine_tune, train, segment, evaluate) run in order.

A recipe resumes like a single run does: a step whose output is complete and was made
with the same settings is skipped; an interrupted step picks up where it stopped (a
training run from its ``latest.pt``, a segmentation from ``<output>.partial``).

    name: em-mito-finetune
    vars: {volume: data/my.zarr}           # ${volume} below; `spoco-vol run --set volume=...`
    steps:
      - fine_tune: {raw: "${volume}/raw", labels: "${volume}/sparse", out: runs/ft, model: vnc-mito-2d}
      - segment: {input: "${volume}/raw", output: "${volume}_labels.zarr", model: runs/ft/best.pt}
      - evaluate: {pred: "${volume}_labels.zarr", gt: "${volume}/labels", out: metrics.json}
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

import yaml

from .errors import SpocoInputError

STEP_KINDS = ("fine_tune", "train", "segment", "evaluate")


def load_workflow(path: str, overrides: dict | None = None) -> dict:
    """Read a recipe, substitute ``${var}`` (recipe vars, then ``overrides``), check it."""
    if not os.path.isfile(path):
        raise SpocoInputError(f"workflow {path} not found")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise SpocoInputError(f"cannot read workflow {path}: {exc}".splitlines()[0]) from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("steps"), list) or not recipe["steps"]:
        raise SpocoInputError(f"workflow {path}: needs a non-empty list of steps")
    variables = {**(recipe.get("vars") or {}), **(overrides or {})}

    def substitute(value):
        if isinstance(value, str):
            whole = re.fullmatch(r"\$\{(\w+)\}", value)
            if whole:  # the whole value: keeps the variable's type (null = the step's default)
                _defined(whole.group(1))
                return variables[whole.group(1)]

            def one(m):
                _defined(m.group(1))
                if variables[m.group(1)] is None:
                    raise SpocoInputError(f"workflow {path}: ${{{m.group(1)}}} is not set "
                                          f"(use --set {m.group(1)}=VALUE)")
                return str(variables[m.group(1)])
            return re.sub(r"\$\{(\w+)\}", one, value)
        if isinstance(value, list):
            return [substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: substitute(v) for k, v in value.items()}
        return value

    def _defined(name):
        if name not in variables:
            raise SpocoInputError(f"workflow {path}: ${{{name}}} is not defined (add it under vars:)")
    steps = []
    for i, step in enumerate(recipe["steps"], 1):
        if not (isinstance(step, dict) and len(step) == 1 and next(iter(step)) in STEP_KINDS
                and isinstance(next(iter(step.values())), dict)):
            raise SpocoInputError(f"workflow {path}: step {i} must be one of {', '.join(STEP_KINDS)} "
                                  "with a mapping of options")
        kind, options = next(iter(step.items()))
        options = {k: v for k, v in substitute(options).items() if v is not None}  # null: the default
        steps.append((kind, options))
    return {"name": recipe.get("name", os.path.basename(path)), "steps": steps}


def _check_keys(kind: str, options: dict, required: tuple, allowed=None) -> None:
    """A step's options against what it takes: one line naming a missing or unknown key
    (a typo would otherwise be a traceback, or silently ignored). ``allowed`` None: the
    training steps, whose unknown keys TrainConfig names."""
    missing = [k for k in required if options.get(k) is None]
    if missing:
        raise SpocoInputError(f"{kind} step is missing the option(s) {', '.join(missing)}")
    unknown = sorted(set(options) - set(allowed or options))
    if unknown:
        raise SpocoInputError(f"{kind} step: unknown option(s) {', '.join(unknown)} (it takes "
                              f"{', '.join(sorted(allowed))})")


def _volume_lists(options: dict) -> dict:
    options = dict(options)
    for key in ("raw", "labels", "val_raw", "val_labels"):
        if isinstance(options.get(key), str):
            options[key] = [options[key]]
    return options


def _train_step(options: dict, log) -> str:
    from .config import TrainConfig
    _check_keys("train", options, ("raw", "labels", "out"))
    try:
        cfg = TrainConfig(**_volume_lists(options), progress=False)
    except TypeError as exc:
        raise SpocoInputError(f"train step: {exc}") from None
    return _run_training(cfg)


def _fine_tune_step(options: dict, log) -> str:
    """`spoco-vol fine-tune`'s recipe: raw, labels, out, model, dense, and any TrainConfig field."""
    from . import bundled
    from .config import fine_tune_config
    _check_keys("fine_tune", options, ("raw", "labels", "out"))
    options = _volume_lists(options)
    try:
        cfg = fine_tune_config(options.pop("raw"), options.pop("labels"), options.pop("out"),
                               options.pop("model", bundled.DEFAULT), progress=False, **options)
    except TypeError as exc:
        raise SpocoInputError(f"fine_tune step: {exc}") from None
    return _run_training(cfg)


def _run_training(cfg) -> str:
    from .training import stopped_before_first_checkpoint, train
    summary_path = os.path.join(cfg.out, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            if json.load(f).get("iterations") == cfg.iterations:
                return f"skipped: {cfg.out} holds a finished run of {cfg.iterations} iterations"
    cfg.resume = os.path.exists(os.path.join(cfg.out, "latest.pt")) or stopped_before_first_checkpoint(cfg.out)
    cfg.overwrite = cfg.overwrite or cfg.resume
    summary = train(cfg)
    return f"trained {summary['iterations']} iterations into {cfg.out}" + (" (resumed)" if cfg.resume else "")


def _segment_step(options: dict, log) -> str:
    import inspect
    from .blockwise import segment_blockwise
    _check_keys("segment", options, ("input",),
                set(inspect.signature(segment_blockwise).parameters) - {"input_path", "progress"} | {"input"})
    options = dict(options)
    input_path = options.pop("input")
    report = segment_blockwise(input_path, **options, progress=True)
    if report.get("already_complete"):
        return f"skipped: {report['output']} is complete and was made with these settings"
    return f"segmented {input_path} into {report['output']}: {report['objects']} objects"


def _evaluate_step(options: dict, log) -> str:
    import zarr
    from . import io
    from .evaluation import format_metrics
    from .evaluation_blockwise import evaluate_zarr
    _check_keys("evaluate", options, ("pred", "gt"), ("pred", "gt", "out", "per_section"))
    pred, gt, out = options["pred"], options["gt"], options.get("out")
    run_hash = None
    try:
        run_hash = zarr.open_group(io.store_root(pred), mode="r").attrs.get("spoco_vol_run", {}).get("hash")
    except Exception:
        pass
    if out and os.path.exists(out):
        try:
            with open(out) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or "prediction_run_hash" not in earlier:
            raise SpocoInputError(f"evaluate step: {out} exists and holds no metrics of a recipe; move it or "
                                  "choose another out")
        if run_hash and earlier["prediction_run_hash"] == run_hash:
            return f"skipped: {out} holds the metrics of this prediction"
    metrics = evaluate_zarr(pred, gt, per_section=bool(options.get("per_section", False)))
    log(format_metrics(metrics))
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**metrics, "prediction": pred, "ground_truth": gt, "prediction_run_hash": run_hash}, f, indent=2)
        os.replace(tmp, out)
    return f"evaluated {pred}" + (f" -> {out}" if out else "")


_STEPS: dict[str, Callable] = {"fine_tune": _fine_tune_step, "train": _train_step, "segment": _segment_step,
                               "evaluate": _evaluate_step}


def run_workflow(path: str, overrides: dict | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Run a recipe's steps in order; returns one line per step (what it did or skipped)."""
    recipe = load_workflow(path, overrides)
    done = []
    for i, (kind, options) in enumerate(recipe["steps"], 1):
        log(f"[{recipe['name']}] step {i}/{len(recipe['steps'])}: {kind}")
        line = _STEPS[kind](options, log)
        log(f"[{recipe['name']}] step {i}: {line}")
        done.append(line)
    return done
