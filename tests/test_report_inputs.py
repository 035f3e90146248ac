"""What `mfm report` reads and where it writes, against a run folder or registry entry written by
someone else (issue 26, items 3 and 8): links, FIFOs and devices in the run folder, a picture
listed under one name and read under another, lineage pointing out of the store (a local path,
an internal http endpoint), a manifest choosing where the page is written, nesting and shapes
that used to end in a traceback. Each runs `mfm report` in a subprocess with a time and memory
limit: a hang or an exhausted memory fails the test instead of the test run."""

from __future__ import annotations

import base64
import http.server
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "kube-token-5ecr3t"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def report(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`mfm report ARGS`; a report that hangs or eats memory is a failed test, not a stuck run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "report", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            preexec_fn=_limits,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mfm report {' '.join(args)} hung for {timeout}s")


def _png(marker: int) -> bytes:
    """A distinct valid-looking PNG (the report checks the signature, not the image)."""
    return PNG + bytes([marker]) * 16


def make_run(root: Path, config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(json.dumps(config or {"model": {"name": "vit"}}))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 4)))
    return root


@pytest.fixture
def secrets(tmp_path) -> Path:
    """Files of the person running the report that the run's author wants: outside the store."""
    home = tmp_path / "victim-home"
    (home / ".kube").mkdir(parents=True)
    (home / ".kube" / "config").write_text(f"users: [{{token: {SECRET}}}]\n")
    (home / "metrics.json").write_text(json.dumps({"top1": SECRET}))
    (home / "private.png").write_bytes(_png(7))
    return home


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "metrics.json", "evaluation/metrics.json"])
def test_files_linked_out_of_the_run_are_not_read(tmp_path, secrets, name):
    run = make_run(tmp_path / "store" / "runs" / "attacker")
    target = run / name
    target.parent.mkdir(exist_ok=True)
    target.unlink(missing_ok=True)
    os.symlink(secrets / ".kube" / "config" if name == "config.yaml" else secrets / "metrics.json", target)
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    page = (run / "report.html").read_text()
    assert SECRET not in page
    assert "left out" in done.stderr and "symbolic link" in done.stderr


def test_a_folder_linked_out_of_the_run_is_not_read(tmp_path, secrets):
    run = make_run(tmp_path / "store" / "runs" / "attacker")
    (secrets / "evaluation").mkdir()
    (secrets / "evaluation" / "metrics.json").write_text(json.dumps({"top1": SECRET}))
    os.symlink(secrets / "evaluation", run / "evaluation")
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    assert SECRET not in (run / "report.html").read_text()


def test_the_picture_read_is_the_one_listed(tmp_path, secrets):
    run = make_run(tmp_path / "store" / "runs" / "attacker")
    (run / "pictures").mkdir()
    (run / "pictures" / "step-007.png").write_bytes(_png(1))
    os.symlink(secrets / "private.png", run / "pictures" / "step-7.png")  # not listed: a link
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    page = (run / "report.html").read_text()
    assert base64.b64encode(_png(7)).decode() not in page
    assert base64.b64encode(_png(1)).decode() in page


@pytest.mark.parametrize("special", ["fifo", "zero", "big"])
def test_special_files_neither_hang_nor_exhaust_memory(tmp_path, special):
    run = make_run(tmp_path / "store" / "runs" / "attacker")
    (run / "metrics.jsonl").unlink()
    if special == "fifo":
        os.mkfifo(run / "metrics.jsonl")
    elif special == "zero":
        os.symlink("/dev/zero", run / "metrics.jsonl")
    else:
        with open(run / "metrics.jsonl", "wb") as f:
            f.truncate(8 << 30)  # sparse: 8 GB that the report must not read
    done = report(str(run), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no metrics.jsonl rows" in (run / "report.html").read_text()


def test_lineage_to_a_local_path_outside_the_store_is_not_followed(tmp_path, secrets):
    victim = make_run(tmp_path / "private" / "victim", {"model": {"name": "vit"}, "note": SECRET})
    (victim / "pictures").mkdir()
    (victim / "pictures" / "step-5.png").write_bytes(_png(9))
    run = make_run(tmp_path / "store" / "runs" / "attacker", {"finetune": {"init": f"{victim}/export"}})
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    page = (run / "report.html").read_text()
    assert SECRET not in page and base64.b64encode(_png(9)).decode() not in page
    assert "outside" in done.stderr and "chain stops" in done.stderr


def test_lineage_inside_the_store_is_followed(tmp_path):
    parent = make_run(tmp_path / "store" / "runs" / "pretrain", {"model": {"name": "vit"}, "note": "parent-run"})
    run = make_run(tmp_path / "store" / "runs" / "finetune", {"finetune": {"init": f"{parent}/export"}})
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    page = (run / "report.html").read_text()
    assert "parent-run" in page and page.count("<h2>pretraining: ") == 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        body = json.dumps({"lineage": {"run_url": "/"}, "token": SECRET}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def internal_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()


def test_lineage_registry_over_http_is_not_fetched(tmp_path, internal_endpoint):
    url, seen = internal_endpoint
    config = {"finetune": {"init": "tiny@production", "registry": f"{url}/creds?x="}}
    run = make_run(tmp_path / "store" / "runs" / "attacker", config)
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    assert seen == [] and SECRET not in (run / "report.html").read_text()


def test_lineage_init_over_http_is_not_fetched(tmp_path, internal_endpoint):
    url, seen = internal_endpoint
    run = make_run(tmp_path / "store" / "runs" / "attacker", {"finetune": {"init": f"{url}/creds?x=/export"}})
    done = report(str(run))
    assert done.returncode == 0, done.stderr
    assert seen == [] and SECRET not in (run / "report.html").read_text()


# --- registry refs: the manifest is untrusted --------------------------------------------------


def _registered(tmp_path, edit) -> str:
    """A registry in <tmp>/store/registry with tiny@v1, its manifest then edited by `edit`."""
    from test_registry import small_export

    from pipeline.registry import Registry

    reg_url = str(tmp_path / "store" / "registry")
    export = small_export(str(tmp_path / "store" / "runs" / "r1" / "export"), 1, {"top1": 0.25})
    make_run(tmp_path / "store" / "runs" / "r1")
    Registry(reg_url).register("tiny", export, run_config_url=str(tmp_path / "store" / "runs" / "r1" / "config.yaml"))
    path = Path(reg_url) / "tiny" / "v1" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest).replace('"INF"', "1e400"))
    return reg_url


def test_a_ref_whose_run_url_leaves_the_store_writes_nothing_there(tmp_path, secrets):
    elsewhere = tmp_path / "www"
    elsewhere.mkdir()
    reg = _registered(tmp_path, lambda m: m["lineage"].update(run_url=str(elsewhere)))
    done = report("tiny@v1", "--registry", reg)
    assert done.returncode == 1 and "pass --out" in done.stderr
    assert not (elsewhere / "report.html").exists()
    out = tmp_path / "mine.html"
    done = report("tiny@v1", "--registry", reg, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "tiny@v1" in out.read_text() and not (elsewhere / "report.html").exists()


def test_a_ref_reports_beside_its_run_in_the_store(tmp_path):
    reg = _registered(tmp_path, lambda m: None)
    done = report("tiny@v1", "--registry", reg)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "store" / "runs" / "r1" / "report.html")


# --- 8: shapes that used to end in a traceback ----------------------------------------------------


def test_a_registry_manifest_of_odd_shapes_is_rendered(tmp_path):
    def edit(m):
        m["lineage"].update(data_manifest="s3://bucket/x/manifest.json", code=7)
        m["metrics"] = {"huge": 10**40, "inf": "INF"}

    reg = _registered(tmp_path, edit)
    out = tmp_path / "r.html"
    done = report("tiny@v1", "--registry", reg, "--out", str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "registered model and lineage" in out.read_text()


@pytest.mark.parametrize("name", ["metrics.json", "evaluation/metrics.json", "config.yaml", "metrics.jsonl"])
def test_deeply_nested_inputs_are_left_out_not_a_traceback(tmp_path, name):
    run = make_run(tmp_path / "run")
    (run / "evaluation").mkdir()
    depth = 100_000
    nested = '{"a":' * depth + "1" + "}" * depth
    if name == "config.yaml":
        nested = "a: " + "[" * depth + "]" * depth
    (run / name).write_text(nested + "\n")
    (run / "metrics.json").write_text(nested if name == "metrics.json" else json.dumps(_deep(200)))
    done = report(str(run))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (run / "report.html").exists()


def _deep(n: int) -> dict:
    d: dict = {"top1": 0.5}
    for _ in range(n):
        d = {"a": d}
    return d


def test_storage_read_inside_refuses_escapes(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "secret").write_text(SECRET)
    for rel in ("../secret", "/etc/passwd", ""):
        with pytest.raises(OSError):
            storage.read_inside(str(tmp_path / "run"), rel, max_bytes=100)


def test_lineage_stays_in_the_bucket(store_url, tmp_path, caplog):
    """Same store: followed (locally and on S3); a local path from a bucket's run, or another
    bucket, is not; a file over its size cap is left out, not read."""
    from pipeline.report import MAX_CONFIG, collect

    def run(url: str, config: dict) -> str:
        storage.write_bytes(storage.join(url, "config.yaml"), json.dumps(config).encode())
        storage.write_bytes(storage.join(url, "metrics.jsonl"), b'{"step": 1, "loss": 0.5}\n')
        return url

    parent = run(storage.join(store_url, "runs", "pretrain"), {"model": {"name": "vit"}})
    child = run(storage.join(store_url, "runs", "ft"), {"finetune": {"init": f"{parent}/export"}})
    assert [r.url for r in collect(child).runs] == [child, parent if "://" in parent else os.path.realpath(parent)]
    local = make_run(tmp_path / "local-run")
    outside = "s3://other-bucket/runs/x" if storage.is_local(store_url) else str(local)
    stray = run(storage.join(store_url, "runs", "stray"), {"finetune": {"init": f"{outside}/export"}})
    assert [r.url for r in collect(stray).runs] == [stray] and "outside" in caplog.text
    storage.write_bytes(storage.join(parent, "config.yaml"), b"#" * (MAX_CONFIG + 1))
    assert collect(parent).runs[0].config == {} and "allowed; left out" in caplog.text
