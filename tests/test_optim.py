"""The paper's weight-decay split (spec section 5): none on 1-D params, biases, pos_embed, cls_token."""

import pytest

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.training.optim import build_optimizer, scaled_lrs


@pytest.mark.parametrize("overrides", [[], ["model.name=resnet18", "model.img_size=64", "corruption.radius=8"]])
def test_weight_decay_groups(overrides):
    cfg = load_config("tiny_cpu", overrides)
    model = build_model(cfg.model, cfg.corruption)
    opt = build_optimizer(model, cfg.optim, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {
        names[id(p)] for g in opt.param_groups if g["weight_decay"] == cfg.optim.weight_decay for p in g["params"]
    }
    exempt = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name, p in model.named_parameters():
        expect_exempt = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        assert (name in exempt) == expect_exempt, name
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_lr_scaling_rule():
    cfg = load_config("vit_b16_mfm")
    lrs = scaled_lrs(cfg.optim, 2048)
    assert (
        lrs.lr == pytest.approx(1.2e-3) and lrs.warmup_lr == pytest.approx(1e-6) and lrs.min_lr == pytest.approx(1e-5)
    )
