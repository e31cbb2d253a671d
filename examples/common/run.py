"""A run's output folder: written as ``DIR.partial``, renamed to ``DIR`` when it finishes.

    with Run(args, example="gpt") as run:    # works in DIR.partial, run.json: running
        model, initial_epoch = run.restore() or (build(), 0)
        ...
        run.save_metrics({...})              # metrics.json
        run.optional("sample", write_sample) # may fail; the run still finishes
    # finished: DIR.partial renamed to DIR, run.json: finished

So a folder named DIR is always a finished run; a failed run stays in
``DIR.partial`` with ``run.json`` saying ``"status": "failed"`` and the error.
Inside: ``run.json``, ``metrics.json``, ``history.csv`` (every epoch the model has
trained, resumed runs included), ``checkpoints/epoch-NNNN.keras``, ``logs/`` and
``attention/``.
"""

import csv
import datetime
import glob
import json
import os
import re
import shutil
import sys
import time
import traceback

import keras
import numpy as np

CHECKPOINT_PATTERN = "epoch-{epoch:04d}.keras"
HISTORY_FILE = "history.csv"


class RunError(ValueError):
    """A run that cannot start as asked (output folder, devices, precision)."""


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(data), f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def latest_checkpoint(checkpoint_dir):
    """``(path, epoch)`` of the newest ``epoch-NNNN.keras`` in `checkpoint_dir`, or ``(None, 0)``."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, "epoch-*.keras")):
        m = re.search(r"epoch-(\d+)\.keras$", path)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        return None, 0
    epoch, path = max(found)
    return path, epoch


class Run:
    """A run's output folder, written in ``DIR.partial`` and renamed to ``DIR`` at the end.

    Args:
        args: The parsed flags (``output``, ``resume``, ``overwrite`` and ``epochs``
            are used; all are recorded in ``run.json``).
        example: Name of the example, e.g. ``"gpt"``.

    Attributes:
        final_path: ``DIR``, which exists only for finished runs.
        path: ``DIR.partial``, where this run writes.
        checkpoint_dir, log_dir, attention_dir: Sub-folders of `path`.
        history_path: ``history.csv`` in `path` (`keras.callbacks.CSVLogger`).
    """

    def __init__(self, args, example):
        self.args = args
        self.example = example
        self.final_path = os.path.abspath(os.path.expanduser(args.output))
        self.path = self.final_path.rstrip(os.sep) + ".partial"
        self.checkpoint_dir = os.path.join(self.path, "checkpoints")
        self.log_dir = os.path.join(self.path, "logs")
        self.attention_dir = os.path.join(self.path, "attention")
        self.history_path = os.path.join(self.path, HISTORY_FILE)
        self.info = {}
        self.resumed_from = None

    @property
    def resume(self):
        return bool(getattr(self.args, "resume", False))

    def check(self):
        """Raise `RunError` if the folder cannot be used as asked (nothing written yet).

        With ``--resume``, the run to resume must have a checkpoint, and ``--epochs``
        must go past its last epoch.
        """
        overwrite = getattr(self.args, "overwrite", False)
        if os.path.exists(self.final_path) and not os.path.isdir(self.final_path):
            raise RunError(
                f"--output must be a folder. Received: output={self.final_path!r} (a file)"
            )
        if os.path.isdir(self.final_path) and not (self.resume or overwrite):
            raise RunError(
                f"{self.final_path} holds a finished run. Pass --resume to continue "
                f"training it or --overwrite to replace it. Received: output={self.args.output!r}"
            )
        if not self.resume:
            return
        if not (os.path.isdir(self.path) or os.path.isdir(self.final_path)):
            raise RunError(
                f"--resume: no run to resume in {self.final_path} (or {self.path}). "
                f"Received: output={self.args.output!r}"
            )
        # An interrupted run (DIR.partial) is resumed in preference to a finished one.
        source = self.path if os.path.isdir(self.path) else self.final_path
        _, epoch = latest_checkpoint(os.path.join(source, "checkpoints"))
        epochs = getattr(self.args, "epochs", None)
        if epochs is not None and epoch >= epochs:
            raise RunError(
                f"The run in {source} already trained {epoch} epoch(s); pass a larger "
                f"--epochs to continue it. Received: epochs={epochs}"
            )

    def __enter__(self):
        self.check()
        if self.resume and os.path.isdir(self.path):
            pass  # an interrupted run: carry on where it stopped
        elif self.resume:
            shutil.copytree(self.final_path, self.path)
        elif os.path.isdir(self.path):
            shutil.rmtree(self.path)  # a stale, unfinished run that is not resumed
        for d in (self.path, self.checkpoint_dir, self.log_dir, self.attention_dir):
            os.makedirs(d, exist_ok=True)
        self.info = {
            "example": self.example,
            "status": "running",
            "started": _now(),
            "command": " ".join(sys.argv),
            "args": vars(self.args),
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "output": self.final_path,
        }
        self._write_info()
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.info["wall_time_s"] = round(time.perf_counter() - self._started, 2)
        self.info["ended"] = _now()
        if exc_type is not None:
            self.info["status"] = "failed"
            self.info["error"] = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self._write_info()
            return False
        self.info["status"] = "finished"
        self._write_info()
        old = self.final_path.rstrip(os.sep) + ".old"
        if os.path.isdir(self.final_path):
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.rename(self.final_path, old)
        os.rename(self.path, self.final_path)
        if os.path.isdir(old):
            shutil.rmtree(old)
        return False

    def _write_info(self):
        write_json(os.path.join(self.path, "run.json"), self.info)

    def note(self, **items):
        """Record extra facts (devices, parameters, notes) in ``run.json``."""
        self.info.update(items)
        self._write_info()

    def save_metrics(self, metrics):
        """Write ``metrics.json`` (and a copy into ``run.json``)."""
        write_json(os.path.join(self.path, "metrics.json"), metrics)
        self.note(metrics=metrics)

    def optional(self, name, step, *args, **kwargs):
        """Run `step`, an optional part of a run (a sample, pictures), which cannot fail it.

        An exception is printed and recorded in ``run.json`` under ``warnings``
        (``{"step": name, "error": ...}``); the run carries on and still finishes.

        Returns:
            What `step` returns, or None if it failed.
        """
        try:
            return step(*args, **kwargs)
        except Exception as e:
            error = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"warning: {name} failed ({error}); the run goes on", file=sys.stderr)
            self.note(warnings=[*self.info.get("warnings", []), {"step": name, "error": error}])
            return None

    def output_path(self, *parts):
        """Where a file of this run will be once it finishes (for printing)."""
        return os.path.join(self.final_path, *parts)

    def latest_checkpoint(self):
        """``(path, epoch)`` of the newest checkpoint in this run, or ``(None, 0)``."""
        return latest_checkpoint(self.checkpoint_dir)

    def restore(self):
        """With ``--resume``: ``(model, epoch)`` from the latest checkpoint (the
        optimizer state included), else ``None``. Call inside the distribution scope."""
        if not self.resume:
            return None
        path, epoch = self.latest_checkpoint()
        if path is None:
            raise RunError(f"--resume: no checkpoint in {self.checkpoint_dir}")
        self.resumed_from = path
        self.note(resumed_from=path, resumed_epoch=epoch)
        self._trim_history(epoch)
        return keras.models.load_model(path), epoch

    def _trim_history(self, epochs):
        """Keep the first `epochs` rows of ``history.csv``: an interrupted run may
        have logged an epoch after its last checkpoint, which is trained again."""
        rows = self._history_rows()
        if not rows:
            return
        fields = list(rows[0])
        with open(self.history_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["epoch"]) < epochs)

    def _history_rows(self):
        if not os.path.exists(self.history_path):
            return []
        with open(self.history_path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def history(self):
        """``{metric: [value per epoch]}`` of every epoch the model has trained, the
        epochs of the runs it resumed included (from ``history.csv``)."""
        result = {}
        for row in self._history_rows():
            for key, value in row.items():
                if key != "epoch" and value not in ("", "NA", None):  # CSVLogger's blanks
                    result.setdefault(key, []).append(float(value))
        return result
