"""Fitting a linear probe directly (full batch, no Lightning): a starting point for LP-FT, never a reported result."""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from fmtransfer.heads.heads import LinearProbeHead

Features = dict[str, torch.Tensor]


def fit_probe_in_place(
    head: LinearProbeHead,
    features: Features,
    labels: torch.Tensor,
    validation: tuple[Features, torch.Tensor] | None = None,
    steps: int = 300,
    lr: float = 0.001,
    weight_decay: float = 1e-4,
    check_every: int = 10,
) -> float:
    """Fit ``head`` (normaliser first, then its linear layer) full-batch on training features.

    With ``validation``, the weights of the step with the lowest validation loss are kept (selection on validation
    only; the test split is never seen). Returns that validation loss, or the final training loss without one.
    Used to start fine-tuning from a good linear probe (LP-FT), so that a random head does not distort the
    pretrained features in the first steps.
    """
    head.normalizer.fit(features)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best_loss, best_state = float("inf"), None
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        head.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels)
        loss.backward()
        optimizer.step()
        if validation is not None and step % check_every == 0:
            head.eval()
            with torch.no_grad():
                val_loss = float(F.cross_entropy(head(validation[0]), validation[1]))
            if val_loss < best_loss:
                best_loss, best_state = val_loss, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
        return best_loss
    return float(loss.detach())


PROBE_CS = np.logspace(-4, 2, 7)  # inverse L2 strengths searched by the inner cross-validation (a decade apart)
# Fitted probes of this process by their inputs' digest (weight, bias), the least recently used dropped first.
_PROBES: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_PROBES_KEPT = 16


def fit_regularised_probe(head: LinearProbeHead, features: Features, labels: torch.Tensor, seed: int = 0) -> float:
    """Fit ``head`` as LP-FT's paper does its probe: L2-regularised logistic regression (scikit-learn's
    ``LogisticRegressionCV``, lbfgs) on the standardised features, the strength chosen by stratified inner
    cross-validation on the training features alone (log loss; up to 3 folds; C=1, scikit-learn's default, when a
    class has a single image). A probe left unregularised on a few hundred images separates them with near-zero
    training loss: fine-tuning from it then has nothing left to learn but confidence. Returns the training log loss.
    """
    head.normalizer.fit(features)
    with torch.no_grad():
        x = head.normalizer(features).double().numpy()
    y = labels.numpy()
    key = _probe_key(x, y, seed, head.classifier.out_features)
    if key in _PROBES:  # the regimes that start from one seed's same probe (finetune, bitfit, lora, surgical)
        _PROBES.move_to_end(key)
        return _load_probe(head, *_PROBES[key], features, labels)
    weight, bias = _regularised_probe_weights(x, y, seed, head.classifier.out_features)
    _PROBES[key] = (weight, bias)
    while len(_PROBES) > _PROBES_KEPT:
        _PROBES.popitem(last=False)
    return _load_probe(head, weight, bias, features, labels)


def _probe_key(x: np.ndarray, y: np.ndarray, seed: int, classes: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    digest.update(f"{x.shape}|{seed}|{classes}|{PROBE_CS.tolist()}".encode())
    return digest.hexdigest()


def _regularised_probe_weights(x: np.ndarray, y: np.ndarray, seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``fit_regularised_probe``'s linear layer (weight [classes, features], bias [classes]) on standardised ``x``."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    # With fewer images than features the L2 optimum lies in the span of the images (representer theorem): fit in
    # an orthonormal basis of that span, the same solution at a fraction of the cost, then map it back.
    basis = np.linalg.svd(x, full_matrices=False)[2] if len(x) < x.shape[1] else None
    z = x @ basis.T if basis is not None else x
    present = np.unique(y)
    weight = np.zeros((classes, x.shape[1]))
    bias = np.full(classes, -1e4)  # a class absent from training is never predicted
    if len(present) < 2:  # nothing to separate: the one class seen
        bias[present] = 0.0
        return weight, bias
    folds = min(3, int(np.bincount(y)[present].min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes at the weakest strengths
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            model = LogisticRegressionCV(Cs=PROBE_CS, cv=cv, scoring="neg_log_loss", max_iter=2000)
        else:
            model = LogisticRegression(C=1.0, max_iter=2000)
        model.fit(z, y)
    coef = model.coef_ @ basis if basis is not None else model.coef_
    if len(present) == 2 and model.coef_.shape[0] == 1:  # one logit difference: split it between the two classes
        weight[present[1]], weight[present[0]] = coef[0] / 2, -coef[0] / 2
        bias[present[1]], bias[present[0]] = model.intercept_[0] / 2, -model.intercept_[0] / 2
    else:
        weight[present], bias[present] = coef, model.intercept_
    return weight, bias


def _load_probe(head: LinearProbeHead, weight: np.ndarray, bias: np.ndarray, features: Features, labels) -> float:
    """``head``'s linear layer set to ``weight`` and ``bias``; returns its training log loss."""
    with torch.no_grad():
        head.classifier.weight.copy_(torch.from_numpy(weight))
        head.classifier.bias.copy_(torch.from_numpy(bias))
        return float(F.cross_entropy(head(features), labels))
