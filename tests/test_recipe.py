"""The fine-tuning recipe's pieces on a real timm backbone: layer-wise learning-rate decay through timm's own param
groups, warm-up then cosine by fractional epoch, stochastic depth that loads the same weights."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from fmtransfer.backbone import describe_backbone
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, LinearProbeHead
from fmtransfer.heads.module import backbone_groups, lr_factor


@pytest.fixture(scope="module")
def lite0():
    return describe_backbone("tf_efficientnet_lite0", "auto", None)


def test_layer_decay_gives_each_timm_layer_its_scaled_rate_and_covers_every_trainable_parameter(lite0):
    model, _ = lite0.create()
    model.requires_grad_(True)
    model.conv_stem.requires_grad_(False)  # frozen parameters never reach the optimiser
    groups = backbone_groups(model, 1e-3, 0.01, 0.7)
    reference = param_groups_layer_decay(model, weight_decay=0.01, layer_decay=0.7)
    params = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(params) == sorted(trainable), "every trainable parameter in exactly one group"
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    for ref in reference:
        for p in ref["params"]:
            if p.requires_grad:
                assert lrs[id(p)] == pytest.approx(1e-3 * ref["lr_scale"])
    head_lr = lrs[id(model.conv_head.weight)]
    first_block = lrs[id(model.blocks[0][0].conv_dw.weight)]
    # timm counts the classifier as the last layer (rate 1): the last feature layer is one step below it.
    assert head_lr == pytest.approx(1e-3 * 0.7) and first_block < head_lr * 0.7**10
    assert backbone_groups(model, 1e-3, 0.01, None) == [
        {"params": list(filter(lambda p: p.requires_grad, model.parameters())), "lr": 1e-3}
    ]
    assert backbone_groups(nn.Linear(2, 2), 1e-3, 0.01, 0.7)[0]["lr"] == 1e-3, "no timm model: one group"


def test_warmup_then_cosine_by_fractional_epoch():
    # 2 warm-up epochs then a cosine to 0 at epoch 10, at 4 and at 7 steps per epoch: the same value at each epoch.
    for spe in (4, 7):
        f = [lr_factor(s, spe, 2.0, 10) for s in range(10 * spe + 1)]
        assert f[0] == pytest.approx(1 / (2 * spe)) and max(f[: 2 * spe]) <= 1.0
        assert all(a < b for a, b in itertools.pairwise(f[: 2 * spe])), "warm-up rises"
        assert f[2 * spe] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 10)))
        assert f[5 * spe] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
        assert f[10 * spe] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(3, 4, 0.0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75 / 10)))


def test_the_optimizer_is_timm_s_by_name_with_each_group_s_rate():
    """regime.optimizer=momentum: SGD with classical momentum 0.9 (LP-FT's paper), the head at lr and the backbone at
    backbone_lr; the default is AdamW; a name timm does not know is refused, naming the setting."""

    def build(name):
        features = nn.Linear(4, 4)
        module = HeadClassifier(
            LinearProbeHead({"x": 4}, 2),
            2,
            lr=1e-2,
            backbone_lr=1e-3,
            weight_decay=0.0,
            features=features,
            optimizer=name,
        )
        return module.configure_optimizers()["optimizer"]

    sgd = build("momentum")
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and not sgd.defaults["nesterov"]
    assert [g["lr"] for g in sgd.param_groups] == [1e-2, 1e-3]
    assert type(build("adamw")) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="optimizer='rmsprop_typo' is not in timm's optimizer registry"):
        build("rmsprop_typo")


def test_drop_path_loads_the_same_weights_and_is_off_in_eval(lite0):
    plain, _ = lite0.create()
    dropped, _ = lite0.create(drop_path_rate=0.2)
    rates = [m.drop_prob for m in dropped.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.02)
    for (k, a), (_, b) in zip(plain.state_dict().items(), dropped.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), dropped.eval()(x), atol=1e-5)


@pytest.mark.parametrize("classes", [2, 4])
def test_the_lp_ft_probe_is_scikit_learns_regularised_logistic_regression(classes):
    """The probe LP-FT starts from is scikit-learn's L2-regularised logistic regression at one of the searched
    strengths: the head's probabilities are scikit-learn's (binary: one logit difference split over two logits;
    multinomial), and its training loss is their log loss."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from fmtransfer.heads import LinearProbeHead, fit_regularised_probe
    from fmtransfer.heads.fit import PROBE_CS

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:10] for c in range(classes)])
    x = torch.from_numpy(d.data[keep].astype(np.float32))
    y = torch.from_numpy(d.target[keep].astype(np.int64))
    head = LinearProbeHead({"pixels": 64}, classes)
    loss = fit_regularised_probe(head, {"pixels": x}, y)
    with torch.no_grad():
        z = head.normalizer({"pixels": x}).double().numpy()
        probs = head({"pixels": x}).softmax(-1).double().numpy()
    # Refit scikit-learn at each candidate strength: the head's probabilities are one of them.
    gaps = [
        np.abs(LogisticRegression(C=c, max_iter=2000).fit(z, y.numpy()).predict_proba(z) - probs).max()
        for c in PROBE_CS
    ]
    assert min(gaps) < 1e-3
    expected = log_loss(y.numpy(), probs.clip(1e-15, 1), labels=list(range(classes)))
    assert loss == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_the_same_probe_is_fitted_once_per_process(monkeypatch):
    """partial and finetune of one seed start from the same probe: the second asks scikit-learn nothing and gets
    the same head; other labels (or another seed) fit anew."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegressionCV

    from fmtransfer.heads import LinearProbeHead, fit_regularised_probe

    monkeypatch.setattr("fmtransfer.heads.fit._PROBES", OrderedDict())  # whatever other tests fitted
    fits = []
    original = LogisticRegressionCV.fit
    monkeypatch.setattr(LogisticRegressionCV, "fit", lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    d = load_digits()
    keep = np.flatnonzero(d.target < 3)[:60]
    x = {"pixels": torch.from_numpy(d.data[keep].astype(np.float32))}
    y = torch.from_numpy(d.target[keep].astype(np.int64))
    first, second = LinearProbeHead({"pixels": 64}, 3), LinearProbeHead({"pixels": 64}, 3)
    assert fit_regularised_probe(first, x, y, seed=7) == fit_regularised_probe(second, x, y, seed=7)
    assert len(fits) == 1
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    fit_regularised_probe(LinearProbeHead({"pixels": 64}, 3), x, y, seed=8)
    fit_regularised_probe(LinearProbeHead({"pixels": 64}, 3), x, y.flip(0), seed=7)
    assert len(fits) == 3
