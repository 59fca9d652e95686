"""Use stage: a finished run as a classifier (``make predict``) and as a deployable model (``make export``)."""

from fmtransfer.deploy.model import MODEL_BUILDERS, ImageClassifier, build_classifier
from fmtransfer.deploy.rundir import FinishedRun, RunDirError, load_run

__all__ = ["MODEL_BUILDERS", "FinishedRun", "ImageClassifier", "RunDirError", "build_classifier", "load_run"]
