import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, dump_config, list_presets, load_config


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.model.img_size % cfg.model.stride == 0


def test_paper_recipes():
    b16 = load_config("vit_b16_mfm")
    assert (b16.model.name, b16.model.img_size, b16.corruption.radius) == ("vit_base_patch16_224", 224, 16)
    assert b16.optim.betas == (0.9, 0.95) and b16.optim.epochs == 300 and b16.data.batch_size == 2048
    r50 = load_config("resnet50_mfm")  # extends vit_b16_mfm
    assert r50.corruption.low_pass_prob == 0.3 and r50.model.stride == 32 and r50.optim.warmup_epochs == 20
    assert load_config("resnet50_sr").corruption.kind == "sr"


def test_overrides_are_typed():
    cfg = load_config(
        "tiny_cpu", ["optim.base_lr=1e-3", "optim.betas=[0.8, 0.9]", "train.max_steps=5", "corruption.radius2=10"]
    )
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.max_steps == 5 and cfg.corruption.radius2 == 10


@pytest.mark.parametrize(
    "override, key",
    [
        (["model.imgsize=32"], "model.imgsize: unknown key"),
        (["nosuch.key=1"], "nosuch: unknown key"),
        (["optim.base_lr=fast"], "optim.base_lr"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["data.backend=tf"], "data.backend"),
        (["model.img_size=30"], "model.img_size (30) must be divisible by the encoder stride (8)"),
        (["corruption.radius=17"], "corruption.radius (17) must be at most half of model.img_size (32)"),
        (["corruption.radius2=2"], "corruption.radius2 (2) must be larger than corruption.radius (3)"),
        (["corruption.blur_kernel_sizes=[8]"], "corruption.blur_kernel_sizes"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", override)
    assert key in str(e.value)


def test_bad_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(bad))
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text(f"extends: {cyc}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyc))


def test_user_file_extends_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: vit_s16_mfm\ndata: {batch_size: 256}\n")
    cfg = load_config(str(f))
    assert cfg.model.name == "vit_small_patch16_224" and cfg.data.batch_size == 256 and cfg.optim.epochs == 300


def test_cli_config_show_round_trips(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", "show", "vit_b16_mfm", "--set", "optim.base_lr=1e-3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    f = tmp_path / "resolved.yaml"
    f.write_text(out)
    again = load_config(str(f))
    note = "# steps: optim.epochs=300 x steps per epoch of data.train (train.max_steps unset)\n"
    assert again.optim.base_lr == 1e-3 and dump_config(again) + note == out
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", "show", "tiny_cpu", "--set", "model.foo=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "model.foo: unknown key" in bad.stderr
    assert yaml.safe_load(out)["model"]["name"] == "vit_base_patch16_224"


def test_flow_parameters_become_typed_overrides():
    from pipeline.config import override_strings

    cfg = load_config(
        "tiny_cpu", override_strings({"train.run_dir": "123", "optim.betas": [0.8, 0.9], "train.max_steps": 7})
    )
    assert cfg.train.run_dir == "123" and cfg.optim.betas == (0.8, 0.9) and cfg.train.max_steps == 7


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "# steps: optim.epochs=2 x steps per epoch of data.train (train.max_steps unset)"),
        (["train.max_steps=500"], "# steps: 500, set by train.max_steps (wins over optim.epochs=2"),
    ],
)
def test_config_show_says_what_sets_the_step_count(overrides, expected, capsys):
    from pipeline.cli import main

    args = ["config", "show", "tiny_cpu", "--set", "data.train=/nonexistent/train"]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert expected in out
    yaml.safe_load(out)  # still valid YAML: the note is a comment
