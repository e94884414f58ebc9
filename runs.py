"""A finished run read back: what defined it, its trained model, and the saved state it predicts with.

Evaluation (the tables), the test-time sweep and prediction all go through load_run, so a run is
always replayed with its own state: the tabular preprocessing with its imputation (Sec. 3.3), the
hippocampus boxes, the image shape and the brain-age target scale, all stored in its checkpoint, and for AD
the temperature it was calibrated with (calibration.json).
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from data import CLASS_NAMES, HippocampusCrops
from models import AgeTarget
from safeio import UserError
from tabular import TabularPreprocessor
from runconfig import RunConfig
from training import load_checkpoint, load_weights


CALIBRATION_FILE = "calibration.json"   # an AD run's temperature and its validation calibration (calibration.py)


def finished(run_dir):
    """A run is finished when its metrics.json exists (written last, atomically, by the training scripts)."""
    return os.path.isfile(os.path.join(run_dir, "metrics.json"))


@dataclass
class FinishedRun:
    """One trained run: its folder, its best.pt, the RunConfig and data facts (`inputs`) stored there."""
    dir: str
    checkpoint_path: str
    checkpoint: dict
    run: RunConfig
    inputs: dict

    @property
    def config(self):
        """Run options and data facts in one flat dict, for comparing runs before they are ensembled."""
        return {**dataclasses.asdict(self.run), **self.inputs}

    @property
    def class_names(self):
        return list(self.inputs.get("class_names") or CLASS_NAMES[:self.run.classes or 3])

    @property
    def tabular(self):
        """AD: the TabularPreprocessor fitted on the run's training rows; brain age: None."""
        state = self.checkpoint.get("tabular")
        return TabularPreprocessor(state=state) if state is not None else None

    @property
    def crops(self):
        """AD image models: the hippocampus boxes the run was trained with; otherwise None."""
        boxes = self.inputs.get("crops")
        return HippocampusCrops(**boxes) if boxes else None

    @property
    def target(self):
        """Brain age: the AgeTarget that turns the network's output into years; AD: None."""
        t = self.checkpoint.get("target")
        return AgeTarget(**t) if t is not None else None

    def model(self, device="cpu"):
        """The trained network, in eval mode on `device`."""
        model = self.run.build_model(self.inputs)
        load_weights(model, self.checkpoint["model"], self.checkpoint_path, f"{self.run.model} model")
        return model.to(device).eval()

    def read_metrics(self):
        return self.read_json("metrics.json")

    def read_json(self, name):
        """A JSON file of the run's folder; unreadable is one error naming it."""
        path = os.path.join(self.dir, name)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None

    @property
    def temperature(self):
        """AD: the run's temperature (calibration.json, fitted on its validation set), or None before calibration."""
        path = os.path.join(self.dir, CALIBRATION_FILE)
        if not os.path.isfile(path):
            return None
        t = self.read_json(CALIBRATION_FILE).get("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise UserError(f"{path}: temperature {t!r} is not a positive number")
        return float(t)

    def read_predictions(self):
        """predictions.npz: the test subjects and the run's soft predictions (AD) or ages (brain age)."""
        path = os.path.join(self.dir, "predictions.npz")
        try:
            with np.load(path, allow_pickle=False) as npz:
                pred = {k: npz[k] for k in npz.files}
        except Exception as exc:  # missing, truncated, not a zip, pickled objects
            raise UserError(f"{path}: missing or unreadable test predictions ({type(exc).__name__})") from None
        if "subjects" not in pred or not ({"probs", "labels"} <= set(pred) or {"pred", "age", "sex"} <= set(pred)):
            raise UserError(f"{path}: not the test predictions of a training run (arrays: {', '.join(pred)})")
        return pred


def load_run(path, expected=None):
    """A run folder, or a checkpoint file in one, -> FinishedRun (best.pt unless a file is named).
    `expected` ({key: value}, see training.identity) refuses a run that is not the one asked for."""
    path = os.fspath(path)
    checkpoint_path = path if os.path.isfile(path) else os.path.join(path, "best.pt")
    ckpt = load_checkpoint(checkpoint_path, expected)
    try:
        run = RunConfig(**ckpt["run"])
    except TypeError as exc:
        raise UserError(f"{checkpoint_path}: not a run description this code knows ({exc})") from None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    return FinishedRun(folder, checkpoint_path, ckpt, run, dict(ckpt["inputs"]))
