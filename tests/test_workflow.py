"""Recipes (spoco_vol.workflow, `spoco-vol run`): the shipped EM recipe end to end on the
bundled real sample, skipping of complete steps, variables and errors."""
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from spoco_vol import io
from spoco_vol.cli import cli
from spoco_vol.errors import SpocoInputError
from spoco_vol.evaluation import evaluate_segmentation
from spoco_vol.workflow import load_workflow

AP_FLOOR = 0.45  # 0.570 measured (58 objects of the sample), less a margin for other CPU kernels
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


def _sample_volume(tmp_path):
    """The bundled VNC sample with dense labels and a sparse copy (every 5th object)."""
    from spoco_vol.demo import write_sample
    raw, labels = write_sample(str(tmp_path / "vol.zarr"))
    lab = np.asarray(io.open_volume(labels)[...])
    sparse = np.where(np.isin(lab, np.unique(lab[lab > 0])[::5]), lab, 0)
    io.create_array(str(tmp_path / "vol.zarr" / "sparse"), sparse, chunks=(1, 512, 512),
                    attrs={"voxel_size": io.read_voxel_size(raw)})
    return str(tmp_path / "vol.zarr")


def test_em_recipe_end_to_end_then_skips_what_is_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vol = _sample_volume(tmp_path)
    recipe = os.path.join(RECIPES, "em_mito_finetune.yaml")
    args = ["run", recipe, "--set", f"volume={vol}", "--set", "iterations=3", "--set", "foreground_iterations=2",
            "--set", "runs=out"]
    r = CliRunner().invoke(cli, args + ["--set", "cluster=local"])
    assert r.exit_code == 0, r.output
    assert os.path.exists("out/model/best.pt") and os.path.exists("out/labels.zarr/0")
    metrics = json.load(open("out/metrics.json"))
    assert metrics["prediction_run_hash"]
    # the evaluate step scored the segment step's labels against the volume's
    again_scored = evaluate_segmentation(np.asarray(io.open_volume("out/labels.zarr")[...]),
                                         np.asarray(io.open_volume(f"{vol}/labels")[...]), per_section=True)
    assert metrics["ap@0.5"] == pytest.approx(again_scored["ap@0.5"]) and metrics["n_gt"] == again_scored["n_gt"]
    assert metrics["ap@0.5"] >= AP_FLOOR, metrics  # a few steps from the bundled model keep most of its accuracy
    again = CliRunner().invoke(cli, args + ["--set", "cluster=local"])
    assert again.exit_code == 0 and again.output.count("skipped") == 3, again.output
    os.remove("out/metrics.json")
    third = CliRunner().invoke(cli, args + ["--set", "cluster=local"])
    assert third.output.count("skipped") == 2 and os.path.exists("out/metrics.json")


def test_a_training_step_stopped_before_its_first_checkpoint_is_started_over(blob_volume, tmp_path):
    """The recipe's rerun after a stop before the first validation (log rows, no
    latest.pt) trains the step again instead of refusing its directory; a recipe value
    the command line would have refused (YAML's 2.5 iterations) is one error line."""
    from spoco_vol.workflow import run_workflow
    raw, labels = blob_volume
    out = tmp_path / "run"
    recipe = tmp_path / "train.yaml"
    recipe.write_text("vars: {iterations: 2}\nsteps:\n  - train:\n" + "".join(f"      {line}\n" for line in (
        f"raw: {raw}", f"labels: {labels}", f"out: {out}", "iterations: ${iterations}", "patch_shape: [32, 32]",
        "batch_size: 2", "features: [4, 8]", "val_every: 3", "amp: false")))
    assert run_workflow(str(recipe), log=lambda line: None)[0].startswith("trained 2 iterations")
    for name in ("latest.pt", "summary.json"):
        os.remove(out / name)
    assert run_workflow(str(recipe), log=lambda line: None)[0].startswith("trained 2 iterations")
    assert (out / "latest.pt").exists()
    with pytest.raises(SpocoInputError, match="--iterations must be a whole number >= 1, got 2.5"):
        run_workflow(str(recipe), {"iterations": 2.5}, log=lambda line: None)  # as `--set iterations=2.5` gives it


def test_recipe_variables_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("vars: {a: 3, b: null}\nsteps:\n  - evaluate: {pred: 'x${a}.zarr', gt: '${b}', out: null}\n")
    steps = load_workflow(str(path), {"b": "g.zarr"})["steps"]
    assert steps == [("evaluate", {"pred": "x3.zarr", "gt": "g.zarr"})]  # null options take the default
    with pytest.raises(SpocoInputError, match="not set"):
        path.write_text("vars: {b: null}\nsteps:\n  - evaluate: {pred: '${b}/x', gt: g}\n")
        load_workflow(str(path))
    with pytest.raises(SpocoInputError, match="not defined"):
        path.write_text("steps:\n  - evaluate: {pred: '${nope}', gt: g}\n")
        load_workflow(str(path))
    with pytest.raises(SpocoInputError, match="must be one of"):
        path.write_text("steps:\n  - paint: {}\n")
        load_workflow(str(path))
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output
    from spoco_vol.workflow import run_workflow
    (tmp_path / "notes.json").write_text("my notes")
    for step, says in (("segment: {input: v.zarr, blockshape: [1, 64, 64]}", "unknown option(s) blockshape"),
                       ("segment: {output: o.zarr}", "segment step is missing the option(s) input"),
                       ("fine_tune: {raw: v.zarr/raw, labels: v.zarr/sparse}", "missing the option(s) out"),
                       ("evaluate: {pred: p.zarr, gt: g.zarr, per-section: true}", "unknown option(s) per-section"),
                       (f"evaluate: {{pred: p.zarr, gt: g.zarr, out: {tmp_path / 'notes.json'}}}",
                        "holds no metrics of a recipe")):
        path.write_text(f"steps:\n  - {step}\n")
        with pytest.raises(SpocoInputError, match=re.escape(says)):
            run_workflow(str(path), log=lambda line: None)
    assert (tmp_path / "notes.json").read_text() == "my notes"
    for name in ("em_mito_finetune.yaml", "segment_slurm.yaml"):  # the shipped recipes parse
        load_workflow(os.path.join(RECIPES, name), {"volume": "v.zarr"})
