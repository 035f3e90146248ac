"""`mfm report RUN_DIR_OR_REF`: one self-contained HTML page about a model or a training run.

The page holds the config, loss / val_loss / lr curves, the reconstruction pictures over time
(input, corrupted input, reconstruction and their spectra), the evaluation tables and the
lineage, every image inlined as base64 PNG: it opens from a laptop, a bucket or an e-mail with
nothing else. From a registry ref (NAME@ALIAS, NAME@vN) it reports the registered model and
the runs behind it (fine-tuning, then the pretraining its `finetune.init` names); from a run
folder, that run and the runs behind it. Written to `<run_dir>/report.html` unless --out.

Everything read here may come from shared storage, written by someone else: files are read only
as regular files inside their run folder, no link followed, up to a size; picture names must be
`step-N.png` and the file listed is the file read; the lineage (finetune.init, finetune.registry,
the registry's lineage.run_url) is followed only inside the store of the target (the same bucket;
locally, the folder holding the run or the registry), never to http or from a bucket to a local
path. A ref's page goes beside its run only when that run was followed; else --out is needed. A
missing, refused or unreadable piece is reported as missing, never fatal.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

import yaml

from pipeline import storage
from pipeline.config import StorageConfig

log = logging.getLogger(__name__)

_PICTURE = re.compile(r"^step-(\d{1,9})\.png$")
MAX_PICTURES = 8  # spread over the run, the last always among them
MAX_CHAIN = 4  # runs followed through finetune.init


@dataclass
class Run:
    url: str
    config: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    pictures: list[tuple[int, bytes]] = field(default_factory=list)
    metrics: dict | None = None  # fine-tuning's <run_dir>/metrics.json
    evaluation: dict | None = None  # <run_dir>/evaluation/metrics.json

    @property
    def kind(self) -> str:
        finetune = self.config.get("finetune")
        return "fine-tuning" if isinstance(finetune, dict) and finetune.get("init") else "pretraining"


@dataclass
class Report:
    title: str
    runs: list[Run]  # the reported run first, then the runs it started from
    model: dict | None = None  # the registry manifest of a registered version


# ---------------------------------------------------------------------------- reading

# Everything below `collect`'s target is untrusted: files are read only as regular files inside
# their run folder (no link followed, O_NONBLOCK so a FIFO cannot hang the report), up to a size
# (storage.read_inside); a lineage step is followed only inside the store the target is in.
MAX_CONFIG = 1 << 20
MAX_JSON = 16 << 20
MAX_METRICS_ROWS = 64 << 20  # a 300-epoch run logs tens of MB
MAX_PICTURE = 16 << 20
MAX_DEPTH = 8  # nesting of a metrics table shown


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _read(root: str, rel: str, cfg: StorageConfig | None, max_bytes: int) -> bytes | None:
    try:
        return storage.read_inside(root, rel, cfg, max_bytes=max_bytes)
    except storage.UnsafeFile as e:  # a link, a FIFO, a device, too large: left out, and said so
        log.warning("report: %s; left out", e)
    except (OSError, ValueError) as e:  # absent or unreadable: shown as missing
        log.debug("report: %s/%s unreadable: %s", root, rel, e)
    return None


def _json(root: str, rel: str, cfg: StorageConfig | None) -> dict | None:
    raw = _read(root, rel, cfg, MAX_JSON)
    try:
        value = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        log.warning("report: %s is not JSON (or nested too deeply); left out", storage.join(root, rel))
        return None
    return value if isinstance(value, dict) else None


def _pictures(run_dir: str, cfg: StorageConfig | None) -> list[tuple[int, bytes]]:
    fs, path = storage.filesystem(storage.join(run_dir, "pictures"), cfg)
    try:
        entries = fs.ls(path, detail=True)
    except (OSError, ValueError):
        return []
    listed = {}  # step -> the name listed: that file and no other is read (step-007.png is not step-7.png)
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and not e.get("islink") and (m := _PICTURE.match(name)):
            listed.setdefault(int(m.group(1)), name)
    steps = sorted(listed)
    if len(steps) > MAX_PICTURES:
        stride = (len(steps) - 1) / (MAX_PICTURES - 1)
        steps = [steps[round(i * stride)] for i in range(MAX_PICTURES)]
    out = []
    for step in steps:
        data = _read(run_dir, f"pictures/{listed[step]}", cfg, MAX_PICTURE)
        if data and data.startswith(b"\x89PNG\r\n\x1a\n"):
            out.append((step, data))
    return out


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None  # a line cut by a crash
    step = row.get("step") if isinstance(row, dict) else None
    return row if type(step) is int and 0 <= step < 1 << 53 else None


def read_run(run_dir: str, cfg: StorageConfig | None = None) -> Run:
    run = Run(run_dir.rstrip("/"))
    raw = _read(run_dir, "config.yaml", cfg, MAX_CONFIG)
    try:
        loaded = yaml.safe_load(raw) if raw else None
    except (yaml.YAMLError, RecursionError):
        loaded = None
    run.config = _dict(loaded)
    raw = _read(run_dir, "metrics.jsonl", cfg, MAX_METRICS_ROWS) or b""
    run.rows = [row for line in raw.decode("utf-8", "replace").splitlines() if (row := _row(line))]
    run.pictures = _pictures(run_dir, cfg)
    run.metrics = _json(run_dir, "metrics.json", cfg)
    run.evaluation = _json(run_dir, "evaluation/metrics.json", cfg)
    return run


def store_of(url: str) -> tuple[str, str]:
    """(scheme, store) of a trusted URL: the bucket of a remote one; for a local path, the folder
    that holds it (a run's sibling runs, a registry's `runs/` beside it)."""
    if storage.is_local(url):
        return "file", os.path.dirname(os.path.realpath(url.removeprefix("file://").rstrip("/")))
    scheme, _, rest = url.partition("://")
    return scheme.lower(), rest.split("/", 1)[0]


def in_store(url: object, store: tuple[str, str]) -> str | None:
    """A URL read from untrusted data if it stays in the store (same scheme and bucket, or for a
    local store a path inside its folder, links resolved), else None: never http(s), never a
    local path from a remote store."""
    if not isinstance(url, str) or not url or any(ord(c) < 32 for c in url):
        return None
    scheme, where = store
    if storage.is_local(url):
        path = os.path.realpath(url.removeprefix("file://"))
        inside = scheme == "file" and path != where and os.path.commonpath([path, where]) == where
        return path if inside else None
    their_scheme, _, rest = url.partition("://")
    parts = rest.split("/")
    return url if their_scheme.lower() == scheme and parts[0] == where and ".." not in parts else None


def _parent_run(run: Run, registry: str | None, cfg: StorageConfig | None, store: tuple[str, str]) -> str | None:
    """The run folder a fine-tuning run started from (`<run>/export`, or a registry ref's run),
    if it is in the store; else None, and the chain stops there with a warning."""
    finetune = _dict(run.config.get("finetune"))
    init = finetune.get("init")
    if not isinstance(init, str):
        return None
    if "@" in init and "://" not in init:
        from pipeline.registry import Registry, RegistryError, default_registry

        reg_url = finetune.get("registry")
        if reg_url is not None and not in_store(reg_url, store):
            log.warning("report: %s: finetune.registry %r is outside %s; the chain stops here", run.url, reg_url, store)
            return None
        reg_url = reg_url or registry or default_registry()
        try:
            parent = _dict(_dict(Registry(reg_url, cfg).manifest(init)).get("lineage")).get("run_url")
        except (RegistryError, OSError, KeyError, ValueError) as e:
            log.warning("report: %s in %s not readable (%s); the chain stops there", init, reg_url, e)
            return None
    else:
        init = init.rstrip("/")
        parent = init.rsplit("/", 1)[0] if init.endswith("/export") else None
    if parent is None:
        return None
    inside = in_store(parent, store)
    if inside is None:
        log.warning("report: %s: its parent run %r is outside %s; the chain stops here", run.url, parent, store)
    return inside


def is_ref(target: str) -> bool:
    return "@" in target and "://" not in target and "/" not in target


def collect(target: str, *, registry: str | None = None, cfg: StorageConfig | None = None) -> Report:
    """Read everything the page shows: a registry ref's model and runs, or a run folder's."""
    model, title = None, target
    if is_ref(target):
        from pipeline.registry import Registry, compare_with_production, default_registry

        reg = Registry(registry or default_registry(), cfg)
        store = store_of(reg.url)
        ref = reg.resolve(target)
        model = dict(reg.manifest(ref))
        model["ref"], model["registry"] = str(ref), reg.url
        model["evaluation"] = _json(reg.version_url(ref.name, ref.version), "metrics.json", cfg)
        model["comparison"] = compare_with_production(reg, ref)  # beside production, with the gate's decision
        title = f"{ref} ({target})" if str(ref) != target else str(ref)
        run_url = _dict(model.get("lineage")).get("run_url")
        run_dir = in_store(run_url, store)
        if run_url is not None and run_dir is None:
            log.warning("report: %s: lineage.run_url %r is outside the registry's store; not read", ref, run_url)
    else:
        run_dir = target.rstrip("/")
        store = store_of(run_dir)
    runs: list[Run] = []
    if run_dir and not is_ref(target) and not storage.exists(storage.join(run_dir, "config.yaml"), cfg):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    while run_dir and len(runs) < MAX_CHAIN and all(r.url != run_dir.rstrip("/") for r in runs):
        runs.append(read_run(run_dir, cfg))
        run_dir = _parent_run(runs[-1], registry, cfg, store)
    return Report(title, runs, model)


# ---------------------------------------------------------------------------- rendering (pure)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def curves_png(rows: list[dict]) -> bytes | None:
    """loss and val_loss against step, and lr: one PNG, or None without logged steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = sorted((r["step"], float(r[key])) for r in rows if _finite(r.get(key)))
        return [p[0] for p in pts], [p[1] for p in pts]

    loss, val, lr = series("loss"), series("val_loss"), series("lr")
    if not loss[0] and not val[0]:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.plot(*loss, label="loss (train batches)", lw=1)
    if val[0]:
        a.plot(*val, "o-", label="val_loss (fixed val batch)", lw=1.5)
    a.set_xlabel("step")
    a.set_title("loss")
    a.legend(fontsize=8)
    b.plot(*lr, color="tab:green", lw=1)
    b.set_xlabel("step")
    b.set_title("learning rate")
    fig.tight_layout()
    return _png(fig)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _finite(v: object) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _flat(metrics: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, object]]:
    out = []
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if depth < MAX_DEPTH:
                out += _flat(v, f"{key}.", depth + 1)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10**30:  # str() of a huge int is slow and says nothing
        return f"{v:.4g}" if _finite(v) else "(too large)"
    return html.escape(str(v)[:1000])


def _table(pairs: list[tuple[str, object]], head: tuple[str, str] = ("key", "value")) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in pairs)
    top = f"<tr><th>{head[0]}</th><th>{head[1]}</th></tr>" if any(head) else ""
    return f"<table>{top}{rows}</table>"


def _accuracy_pairs(metrics: dict) -> list[tuple[str, object]]:
    keep = ("top1", "top5", "num_samples", "mean_top1", "k", "epochs", "classifier")
    return [(k, v) for k, v in _flat(metrics) if k.rsplit(".", 1)[-1] in keep or "corruptions." in k]


def _run_section(run: Run, index: int) -> str:
    parts = [f'<section id="run-{index}"><h2>{run.kind}: <code>{html.escape(run.url)}</code></h2>']
    last = max((r["step"] for r in run.rows if "loss" in r), default=None)
    vals = [r for r in run.rows if isinstance(r.get("val_loss"), (int, float))]
    facts = [("steps logged", last)]
    if vals:
        facts += [
            ("val_loss at start", vals[0]["val_loss"]),
            (f"val_loss at step {vals[-1]['step']}", vals[-1]["val_loss"]),
        ]
    parts.append(_table(facts, ("", "")))
    curves = curves_png(run.rows)
    parts.append(_img(curves, "loss and lr curves") if curves else "<p>no metrics.jsonl rows</p>")
    if run.pictures:
        parts.append(
            "<h3>reconstructions over time</h3><p>rows: samples; columns: input, corrupted input, "
            "the reconstruction (MFM: the given frequencies plus the predicted masked ones; other "
            "pretexts: the prediction), then the three spectra (log |F|)</p>"
        )
        parts += [
            f"<figure>{_img(png, f'step {s}')}<figcaption>step {s}</figcaption></figure>" for s, png in run.pictures
        ]
    for name, m in (("fine-tuning result (val split)", run.metrics), ("evaluation", run.evaluation)):
        if m:
            parts.append(f"<h3>{name}</h3>" + _table(_accuracy_pairs(m)))
    if run.config:
        cfg = yaml.safe_dump(run.config, sort_keys=False)
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(cfg)}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _model_section(model: dict) -> str:
    lineage = _dict(model.get("lineage"))
    data = _dict(lineage.get("data_manifest"))
    code = _dict(lineage.get("code"))
    facts = [
        ("ref", model.get("ref")),
        ("registry", model.get("registry")),
        ("created", model.get("created")),
        ("architecture", _dict(model.get("model")).get("architecture")),
        ("export", lineage.get("export_url")),
        ("run", lineage.get("run_url")),
        ("run config", lineage.get("run_config_url")),
        ("data manifest", f"{data.get('url')} (sha256 {data.get('sha256')}, {data.get('num_samples')} samples)"),
        ("parent", lineage.get("parent")),
        ("code", f"{code.get('package')} {code.get('version')}, commit {code.get('git_commit')}"),
    ]
    parts = ["<section id='model'><h2>registered model and lineage</h2>", _table(facts, ("", ""))]
    if model.get("comparison"):
        parts.append(_comparison_html(model["comparison"]))
    if model.get("evaluation"):
        parts.append("<h3>evaluation (registered with the model)</h3>" + _table(_accuracy_pairs(model["evaluation"])))
    elif _dict(model.get("metrics")):
        parts.append("<h3>metrics</h3>" + _table(sorted(_flat(model["metrics"]), key=lambda kv: kv[0])))
    parts.append("</section>")
    return "\n".join(parts)


def _comparison_html(c) -> str:
    """A `pipeline.registry.comparison.Comparison`: this version's figures, production's, the difference."""

    def cell(v):
        return "n/a" if v is None else _fmt(v)

    rows = "".join(
        f"<tr><td>{html.escape(r.label)}</td><td>{cell(r.value)}</td><td>{cell(r.production)}</td>"
        f"<td>{'n/a' if r.difference is None else f'{r.difference:+.4g}'}"
        f"{'' if r.better is None else (' (better)' if r.better else ' (worse)')}</td></tr>"
        for r in c.rows
    )
    gate = {True: "would move it here", False: "would refuse", None: "nothing to decide"}[c.gate_allowed]
    return (
        f"<h3 id='comparison'>compared with {html.escape(c.alias)}</h3><p>{html.escape(c.summary)}</p>"
        f"<table><tr><th>metric</th><th>{html.escape(c.ref)}</th><th>{html.escape(c.production or 'none')}</th>"
        f"<th>difference</th></tr>{rows}</table>"
        f"<p>promotion gate ({html.escape(c.alias)}): {gate}: {html.escape(c.gate_reason)}</p>"
    )


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
img{max-width:100%;display:block}figure{margin:1em 0}figcaption{color:#666}
pre{background:#f6f6f6;padding:.5em;overflow:auto}code{font-size:90%}"""


def render(report: Report) -> str:
    """The page: headline numbers, then the model's lineage, then each run (pure)."""
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    first = next((r for r in report.runs if r.pictures), None)
    lead = ""
    if first:
        step, png = first.pictures[-1]
        lead = f"<h2>latest reconstructions ({html.escape(first.kind)}, step {step})</h2>{_img(png, 'latest')}"
    body = [lead]
    if report.model:
        body.append(_model_section(report.model))
    body += [_run_section(run, i) for i, run in enumerate(report.runs)]
    if not report.runs:
        body.append("<p>no run folder found</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>MFM report: {html.escape(report.title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>MFM report: {html.escape(report.title)}</h1><p>written {when} by <code>mfm report</code></p>"
        + "\n".join(body)
        + "</body></html>\n"
    )


# ---------------------------------------------------------------------------- writing


def default_out(report: Report) -> str | None:
    """Beside the run reported on: for a registry ref, the run folder of its lineage, which
    `collect` followed only inside the registry's store, and only a real one (a config.yaml read)."""
    if not report.runs or (report.model is not None and not report.runs[0].config):
        return None
    return storage.join(report.runs[0].url, "report.html")


def write_report(
    target: str, out: str | None = None, *, registry: str | None = None, cfg: StorageConfig | None = None
) -> str:
    """Collect, render and write the page (beside the reported run unless `out`); returns its URL."""
    report = collect(target, registry=registry, cfg=cfg)
    out = out or default_out(report)
    if out is None:
        raise FileNotFoundError(f"{target}: no run folder (in the registry's store) to write the report to; pass --out")
    storage.write_bytes(out, render(report).encode(), cfg)  # storage writes whole files: never half a page
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm report", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run folder (path or s3:// URL) or a registry ref NAME@ALIAS / NAME@vN")
    p.add_argument("--out", help="HTML file to write (default: report.html in the reported run's folder)")
    p.add_argument("--registry", help="registry URL for refs (default: $MFM_REGISTRY)")
    args = p.parse_args(argv)
    try:
        url = write_report(args.target, args.out, registry=args.registry)
    except Exception as e:  # a clear line naming the target, not a traceback
        from pipeline.registry import RegistryError

        if not isinstance(e, (RegistryError, FileNotFoundError, ValueError)):
            raise
        print(f"mfm report: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0
