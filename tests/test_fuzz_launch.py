"""Property-based tests (hypothesis) of the parsers of untrusted launch input: hostfiles,
`--set` overrides and flow overrides, preset YAML files, and a step folder's COMPLETE. The
contract: a right answer, or the project's own error (ConfigError / CheckpointError) naming
the file, line or key, never another exception, a hang (the deadline) or a write outside the
folder given. Example counts are small for CI; `--hypothesis-seed` replays a failure."""

from __future__ import annotations

import ipaddress
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import Config, ConfigError, load_config, override_strings, parse_override
from pipeline.training import checkpoint as ckpt
from pipeline.training.launcher import MAX_SLOTS, is_host, parse_hostfile

FUZZ = settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Pieces an attacker reaches for: shell and ssh syntax, separators, unicode look-alikes, digits.
HOSTILE = [
    "-o",
    "ProxyCommand=",
    "${IFS}",
    ";",
    "#",
    ",",
    "$(",
    ")",
    "`",
    "|",
    "&",
    "%",
    "@",
    "\\",
    "'",
    '"',
    "..",
    "/",
]
WORDS = ["node", "gpu-node-0", "10.0.0.1", "fd00::1", "slots=", "slots=1", "slots=8", "slots=0", "slots=²", " ", "\t"]
piece = st.one_of(st.sampled_from(HOSTILE + WORDS), st.text(min_size=1, max_size=6), st.integers(-5, 2000).map(str))
line = st.lists(piece, max_size=6).map("".join)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- hostfiles -----------------------------------------------------------------------------------


@FUZZ
@given(st.lists(line, max_size=6).map("\n".join))
@example("-oProxyCommand=touch${IFS}/tmp/x slots=1")
@example("evil.host,node1 slots=1")
@example("node1 slots=1\r\nnode2 slots=2")
@example("node1\u2028slots=1")
def test_hostfile_parses_to_hosts_or_names_the_line(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "hosts")
        path.write_text(text, errors="surrogatepass") if "\ud800" not in text else path.write_bytes(b"\xff")
        try:
            hosts = parse_hostfile(str(path))
        except ConfigError as e:
            assert str(path) in str(e)
        else:
            assert hosts and all(is_host(h) and not h.startswith("-") for h in hosts)
            assert all(1 <= n <= MAX_SLOTS for n in hosts.values())
            assert all(set(h) <= set(string.ascii_letters + string.digits + "._-:") for h in hosts)
        assert _files(Path(tmp)) == {"hosts"}


host_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
address = st.one_of(st.ip_addresses().map(str), host_name)


@FUZZ
@given(
    st.dictionaries(address, st.integers(1, MAX_SLOTS), min_size=1, max_size=5),
    st.lists(st.sampled_from(["", "# a comment", "   ", "\t# indented"]), max_size=3),
)
def test_any_good_hostfile_round_trips(hosts, noise):
    lines = [*noise, *(f"  {h}\tslots={n}   # {i}" for i, (h, n) in enumerate(hosts.items()))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "hosts")
        path.write_text("\n".join(lines) + "\n")
        assert parse_hostfile(str(path)) == hosts


@FUZZ
@given(st.one_of(line, st.ip_addresses().map(str), st.text(max_size=30)))
def test_is_host_admits_only_names_and_addresses(value):
    if is_host(value):
        assert not value.startswith("-") and value.isascii() and "%" not in value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            assert set(value) <= set(string.ascii_letters + string.digits + "._-")


# --- --set overrides, flow overrides and presets -------------------------------------------------

KEYS = ["train.nprocs", "train.run_dir", "data.batch_size", "optim.base_lr", "model.timm_kwargs", "model", "x.y"]
yaml_value = st.one_of(
    st.sampled_from(["1", "-1", "1e400", ".nan", "[1, 2]", "{a: 1}", "&a [*a]", "!!python/object:os.system x"]),
    st.sampled_from(["'''", "{", "[" * 50, "null", "~", "2020-01-01", "0x10", "*a", "&a 1", "? [a]: b", "\x00"]),
    st.text(max_size=12),
)
override = st.one_of(
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), st.sampled_from(["=", "", "=="]), yaml_value).map("".join),
    st.text(max_size=30),
)


def _config_or_named_error(fn) -> None:
    try:
        cfg = fn()
    except ConfigError as e:
        assert str(e).strip()
        assert len(str(e)) < 20_000  # an error quotes what is wrong, not an expanded structure
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(st.lists(override, max_size=3))
@example(["model.timm_kwargs=" + "[" * 100_000])
@example(["a..b=1"])
@example(["optim.base_lr=" + "9" * 5000, "train.nprocs=" + "9" * 5000])
@example(["train=1", "train.nprocs=2"])
@example(["data.batch_size=&a [*a, *a]"])
def test_set_overrides_build_a_config_or_name_the_override(items):
    _config_or_named_error(lambda: load_config("tiny_cpu", items))


@FUZZ
@given(override)
def test_parse_override_splits_or_names_it(item):
    try:
        keys, _ = parse_override(item)
    except ConfigError as e:
        assert repr(item)[:40] in str(e) or "override" in str(e)
    else:
        assert keys and all(isinstance(k, str) for k in keys)


json_value = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), json_value, max_size=3))
def test_flow_overrides_build_a_config_or_name_the_key(overrides):
    _config_or_named_error(lambda: load_config("tiny_cpu", override_strings(overrides)))


LAUGHS = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
preset_text = st.one_of(
    st.builds(
        lambda d: yaml.safe_dump(d),
        st.dictionaries(st.sampled_from(["model", "train", "data", "extends", "optim", "zzz"]), json_value, max_size=3),
    ),
    st.lists(
        st.sampled_from(["extends: tiny_cpu", "extends: 5", "extends: [a]", "train:", "  nprocs: 2", ": :"]), max_size=4
    ).map("\n".join),
    st.text(max_size=60),
)


@FUZZ
@given(preset_text)
@example(LAUGHS.replace("a:", "model: {timm_kwargs: {k: *i}}\na:", 1))
@example("model: {timm_kwargs: " + "{a: " * 5000 + "1" + "}" * 5001)
@example('extends: "a\\0.yaml"')
@example("extends: ../../../../etc/passwd")
@example("train: {run_dir: !!binary aGk=}")
def test_preset_files_build_a_config_or_name_the_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "preset.yaml")
        path.write_text(text, errors="surrogatepass")
        before = _files(Path(tmp))
        try:
            cfg = load_config(str(path))
        except ConfigError as e:
            assert len(str(e)) < 20_000
        else:
            assert isinstance(cfg, Config)
        assert _files(Path(tmp)) == before


def test_preset_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(str(path))


# --- COMPLETE ------------------------------------------------------------------------------------

hexdigest = st.text("0123456789abcdef", min_size=64, max_size=64)
marker_value = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "sha256": st.one_of(
                st.dictionaries(st.sampled_from(["a.pt", "../a.pt", "/etc/passwd", "", "sub/b.pt"]), hexdigest),
                json_value,
            ),
            "world_size": st.one_of(st.integers(-2, 4), json_value),
            "format_version": json_value,
            "files": json_value,
        },
    ),
    json_value,
)


@FUZZ
@given(st.one_of(marker_value.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)))
@example(b"[" * 100_000)
@example(b'{"sha256": {"a.pt": "' + b"0" * 64 + b'"}, "world_size": true}')
def test_complete_parses_or_refuses_the_checkpoint(raw):
    with tempfile.TemporaryDirectory() as tmp:
        step = Path(tmp, "step-4")
        (step / "sub").mkdir(parents=True)
        (step / "a.pt").write_bytes(b"a")
        (step / "sub" / "b.pt").write_bytes(b"b")
        (step / "COMPLETE").write_bytes(raw)
        before = {p: p.read_bytes() for p in step.rglob("*") if p.is_file()}
        try:
            marker = ckpt.parse_marker(raw, "s3://b/run/step-4")
            ckpt.verify(step, marker, "s3://b/run/step-4")
        except ckpt.CheckpointError as e:
            assert "s3://b/run/step-4" in str(e)
        else:  # accepted: it lists exactly these files with their digests
            assert set(marker["sha256"]) == {"a.pt", "sub/b.pt"}
        assert {p: p.read_bytes() for p in step.rglob("*") if p.is_file()} == before
        assert os.listdir(tmp) == ["step-4"]
