"""The paper's weight-decay split (spec section 5): none on 1-D params, biases, pos_embed, cls_token."""

import pytest

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.training.optim import build_optimizer, scaled_lrs


@pytest.mark.parametrize(
    "overrides", [[], ["model.name=resnet18", "model.timm_kwargs={}", "model.img_size=64", "corruption.radius=8"]]
)
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


@pytest.mark.parametrize(
    "max_steps, expected",
    [
        # (steps, schedule, warmup, source) with 4 epochs x 10 steps, warmup 1 epoch
        (None, (40, 40, 10, "optim.epochs")),
        (25, (25, 40, 10, "train.max_steps")),  # shorter: stops inside the epochs' schedule
        (200, (200, 200, 50, "train.max_steps")),  # longer: N steps outright, schedule stretched
    ],
)
def test_step_budget_explicit_max_steps_wins(max_steps, expected):
    from pipeline.training.optim import step_budget

    optim = load_config(None, ["optim.epochs=4", "optim.warmup_epochs=1"]).optim
    b = step_budget(optim, max_steps, steps_per_epoch=10)
    assert (b.steps, b.schedule, b.warmup, b.source) == expected


def test_stretched_schedule_warms_up_then_decays_to_the_end():
    import torch

    from pipeline.training.optim import build_scheduler, step_budget

    cfg = load_config(None, ["optim.epochs=1", "optim.warmup_epochs=0.1", "optim.lr_base_batch=64"])
    lrs = scaled_lrs(cfg.optim, 64)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lrs.lr)
    sched = build_scheduler(opt, cfg.optim, lrs, 5, step_budget(cfg.optim, 100, 5))
    lr = []
    for step in range(1, 101):
        sched.step_update(step)
        lr.append(opt.param_groups[0]["lr"])
    # warmup: 10 of the 100 steps (the cosine, which spans all 100, is 2.5% down by then)
    assert max(lr) == pytest.approx(lrs.lr, rel=0.03) and lr.index(max(lr)) == 9
    assert lr[-1] == pytest.approx(lrs.min_lr, rel=1e-2) and lr[50] < lr[20]
