"""`mfm pretrain`: validate the config, then start the training processes (the only module in
the project that launches processes).

One machine: train.nprocs processes of `pipeline.training.trainer`, gloo on CPU and NCCL on
GPUs, OMP_NUM_THREADS = cores / nprocs. Several machines: the DeepSpeed launcher with a
hostfile (`host slots=N` per line; pdsh/ssh to every host; the repo and venv at the same path
everywhere, run_dir on shared storage such as S3):

    mfm pretrain --config vit_b16_mfm --hostfile hosts.txt --master-addr 10.0.0.1 \
        --set train.run_dir=s3://bucket/runs/vitb
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import logs, storage
from pipeline.config import Config, ConfigError, load_config
from pipeline.processes import available_cpus, die_with_parent

TRAINER = "pipeline.training.trainer"
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: str
    checkpoints: list[str]
    latest: str | None
    export: str | None
    pictures: list[str]


# Host names, addresses and arguments reach ssh's command line and, through DeepSpeed's pdsh
# runner, a shell on every node unquoted: only these shapes are let through.
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
_SAFE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")  # what DeepSpeed's runner itself leaves unquoted
_SLOTS = re.compile(r"slots=([0-9]{1,4})")
MAX_SLOTS = 1024
MAX_HOSTFILE_BYTES = 1 << 20
HOST_RULE = "a host name (letters, digits, '.', '-', '_', not starting with '-') or an IP address"


def is_host(value: object) -> bool:
    """A host name or an IP address (no scope id: `%` and what follows reach a shell)."""
    if not isinstance(value, str) or not value.isascii():
        return False
    if _HOST.fullmatch(value):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return "%" not in value


def check_master_addr(value: object) -> str:
    if not is_host(value):
        raise ConfigError(f"--master-addr (flow parameter master_addr) {value!r}: not {HOST_RULE}")
    return value


def parse_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile format: `hostname slots=N` per line, # comments. Errors name the
    line but do not echo it: a flow's `hostfile` may name any file of the worker."""
    where = f"--hostfile (flow parameter hostfile) {path}"
    try:
        text = storage.read_capped(str(path), max_bytes=MAX_HOSTFILE_BYTES).decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text") from e
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from e
    hosts: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        slots = _SLOTS.fullmatch(parts[-1])
        if len(parts) != 2 or not slots or not 1 <= int(slots.group(1)) <= MAX_SLOTS:
            raise ConfigError(f"{where}:{n}: expected 'hostname slots=N' with 1 <= N <= {MAX_SLOTS}")
        if not is_host(parts[0]):
            raise ConfigError(f"{where}:{n}: the host is not {HOST_RULE}")
        if parts[0] in hosts:
            raise ConfigError(f"{where}:{n}: host listed twice")
        hosts[parts[0]] = int(slots.group(1))
    if not hosts:
        raise ConfigError(f"{where}: no hosts")
    return hosts


def validate(cfg: Config, world_size: int) -> None:
    """Everything that can be known wrong before a process starts."""
    import timm

    from pipeline.training.optim import batch_plan
    from pipeline.training.trainer import import_function, resolve_precision

    batch_plan(cfg, world_size)
    if not timm.is_model(cfg.model.name):
        close = timm.list_models(f"*{cfg.model.name.split('_')[0]}*")[:8]
        raise ConfigError(
            f"model.name={cfg.model.name!r} is not a timm model" + (f"; similar: {', '.join(close)}" if close else "")
        )
    from pipeline.config import train_sources

    for source in train_sources(cfg.data):
        if not storage.exists(storage.join(source.url, "manifest.json"), cfg.storage):
            raise ConfigError(f"data.train={source.url!r}: no manifest.json there (shard the data first: mfm shard)")
    if not cfg.data.val:
        log.warning("data.val is not set: no val_loss for this run")
    elif not storage.exists(storage.join(cfg.data.val, "manifest.json"), cfg.storage):
        log.warning("data.val=%r: no manifest.json there: no val_loss for this run", cfg.data.val)
    import torch

    resolve_precision(cfg.train.precision, torch.cuda.is_available())
    from pipeline.training.speed import resolve_compile

    resolve_compile(cfg.train.compile, torch.cuda.is_available(), cfg.train.zero_stage)
    import_function(cfg.train.loader, "train.loader")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(
    module: str, args: list[str], nprocs: int, *, env: dict | None = None, log_dir: Path | None = None
) -> int:
    """Run `python -m module args` as nprocs ranks of one process group on this machine; if
    one fails, stop the others. Returns the first non-zero exit code, else 0. With `log_dir`,
    each rank's stdout and stderr go to `log_dir/rankR.log` and only the pipeline's own lines
    reach this process's stdout (pipeline.logs)."""
    cores = available_cpus()
    base = {
        **os.environ,
        **(env or {}),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs),
        "OMP_NUM_THREADS": str(max(1, cores // nprocs)),
    }
    procs, files, console_fd = [], [], None
    if log_dir is not None:
        if log_dir.parent == Path(tempfile.gettempdir()):  # a remote run's: a predictable name, kept private
            from pipeline.training.checkpoint import private_dir

            private_dir(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        console_fd = os.dup(1)
        print(f"training processes' full output: {log_dir}/rank*.log (mfm -v shows it here)", flush=True)
    for rank in range(nprocs):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        quiet = {}
        if console_fd is not None:
            files.append(open(log_dir / f"rank{rank}.log", "ab"))
            rank_env[logs.CONSOLE_FD_ENV] = str(console_fd)
            quiet = {"stdout": files[-1], "stderr": subprocess.STDOUT, "pass_fds": (console_fd,)}
        procs.append(
            subprocess.Popen([sys.executable, "-m", module, *args], env=rank_env, preexec_fn=die_with_parent, **quiet)
        )

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Only the main thread may set handlers (a Prefect task may run elsewhere); PDEATHSIG covers that case.
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        code = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                _stop(procs)
                break
            time.sleep(0.2)
        code = code or next((p.returncode for p in procs if p.returncode), 0)
        if code and log_dir is not None:  # the cause is in the files: show their ends here
            for rank, p in enumerate(procs):
                if p.returncode:
                    end = logs.tail(log_dir / f"rank{rank}.log")
                    print(f"--- end of {log_dir}/rank{rank}.log (exit {p.returncode}):\n{end}", file=sys.stderr)
        return code
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for f in files:
            f.close()
        if console_fd is not None:
            os.close(console_fd)


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_result(cfg: Config) -> RunResult:
    from pipeline.training import checkpoint as ckpt

    folder = ckpt.run_folder(cfg.train.run_dir, cfg.storage, create=False)
    steps = sorted(s for s, done in ckpt.list_steps(folder).items() if done)
    export = storage.join(cfg.train.run_dir, "export")
    has_export = storage.exists(storage.join(export, "config.json"), cfg.storage)
    fs, path = folder.fs()
    pics = []
    if fs.exists(f"{path}/pictures"):
        pics = sorted(
            (p for p in fs.ls(f"{path}/pictures", detail=False) if p.endswith(".png")),
            key=lambda p: int(p.rsplit("step-", 1)[-1].removesuffix(".png")),
        )
        pics = [storage.join(cfg.train.run_dir, "pictures", p.rsplit("/", 1)[-1]) for p in pics]
    urls = [folder.step_url(s) for s in steps]
    return RunResult(cfg.train.run_dir, urls, urls[-1] if urls else None, export if has_export else None, pics)


# DeepSpeed's runner writes `export NAME=value;` for these variables, and every line of
# .deepspeed_env, into the pdsh command: logged at INFO and visible in `ps` on every node.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_?KEY|SESSION|(^|_)KEY($|_)", re.I)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_deepspeed_env() -> None:
    """Refuse a .deepspeed_env (the files DeepSpeed's runner reads) holding a secret-looking name
    or a value a shell would expand. Refused, not warned about: by the time a warning is read the
    secret is in the launcher's log and in every node's process list."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in (os.path.expanduser("~"), "."):
        path = Path(folder, name)
        if not path.is_file():
            continue
        try:
            text = storage.read_capped(str(path), max_bytes=MAX_HOSTFILE_BYTES).decode()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({e})") from e
        for n, line in enumerate(text.splitlines(), 1):
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"{path}:{n}: expected NAME=value (DeepSpeed's runner fails on anything else)")
            if SECRET_NAME.search(key):
                raise ConfigError(
                    f"{path}:{n}: {key} looks like a secret; DeepSpeed would put it on the pdsh command line "
                    "(logged, and visible in `ps` on every node). Give each node its credentials instead: "
                    "~/.aws/credentials, an instance role, or the Kubernetes secret (README: Scaling out)"
                )
            if any(c in value for c in '$`\\"'):
                raise ConfigError(f'{path}:{n}: the value of {key} holds $, `, \\ or ": a remote shell expands them')


def _deepspeed_env() -> dict[str, str]:
    """This environment, less the secret-looking variables DeepSpeed's runner would export."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import EXPORT_ENVS

    exported = (*EXPORT_ENVS, *get_accelerator().export_envs())
    env = dict(os.environ)
    for name in sorted(env):
        if name.startswith(exported) and SECRET_NAME.search(name):
            del env[name]
            log.warning(
                "%s is not passed to the other hosts: DeepSpeed would write it into the pdsh command "
                "(logged, visible in `ps`); give each node its own credentials",
                name,
            )
    return env


def _run_deepspeed(hosts: dict[str, int], master_addr: str, master_port: int, args: list[str]) -> int:
    """The DeepSpeed launcher on the checked hosts: it reads a private copy of the hostfile (the
    one the user named may change after the check) and every argument is shell-safe."""
    for arg in (master_addr, *args):
        if not _SAFE_ARG.fullmatch(arg):
            raise ConfigError(f"launch argument {arg[:80]!r} would reach a remote shell unquoted")
    runner = Path(sys.executable).with_name("deepspeed")  # the venv's, even when not activated
    with tempfile.NamedTemporaryFile("w", prefix="mfm-hosts-", suffix=".txt") as f:  # 0600, removed after
        f.write("".join(f"{host} slots={n}\n" for host, n in hosts.items()))
        f.flush()
        cmd = [
            str(runner) if runner.exists() else "deepspeed",
            "--hostfile",
            f.name,
            "--master_addr",
            master_addr,
            "--master_port",
            str(master_port),
            "--module",
            TRAINER,
            *args,
        ]
        return subprocess.call(cmd, env=_deepspeed_env())


class LaunchError(RuntimeError):
    def __init__(self, code: int, message: str):
        self.code = code
        super().__init__(message)


def launch(
    cfg: Config,
    *,
    hostfile: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    task: str | None = None,
) -> RunResult:
    """Validate, run training to the end (or resume it), and say where the results are.
    `task` ("module:function", (cfg) -> trainer.Task) trains something other than the MFM
    pretext, e.g. "pipeline.finetune:task"."""
    from pipeline.training.trainer import EXIT_CHECKPOINT, EXIT_NON_FINITE, encode_config, import_function
    from pipeline.training.warm_start import pin

    hosts = parse_hostfile(hostfile) if hostfile else None
    if hosts:
        if not master_addr:
            raise ConfigError("--hostfile needs --master-addr (an address of the first host that the others reach)")
        check_master_addr(master_addr)
        if master_port is not None and not 0 < master_port < 65536:
            raise ConfigError(f"--master-port {master_port}: not a TCP port")
        check_deepspeed_env()
    world = sum(hosts.values()) if hosts else cfg.train.nprocs
    cfg = pin(cfg)  # NAME@ALIAS -> NAME@vN once, for every rank and the run's config.yaml
    validate(cfg, world)
    args = ["--config-b64", encode_config(cfg)]
    if task:
        import_function(task, "task")
        args += ["--task", task]
    if hosts:
        code = _run_deepspeed(hosts, master_addr, master_port or 29500, args)
    else:
        quiet = None if logs.verbose() else logs.log_dir(cfg.train.run_dir)
        code = spawn_local(TRAINER, args, cfg.train.nprocs, log_dir=quiet)
    if code == EXIT_NON_FINITE:
        raise LaunchError(
            code,
            "training stopped on a non-finite loss (see the log above); the last good "
            f"checkpoint in {cfg.train.run_dir} is kept",
        )
    if code == EXIT_CHECKPOINT:
        raise LaunchError(code, f"the checkpoint to resume from in {cfg.train.run_dir} was refused (see the log above)")
    if code:
        raise LaunchError(
            code,
            f"training failed with exit code {code}; rerun the same command to resume "
            f"from the newest complete checkpoint in {cfg.train.run_dir}",
        )
    return run_result(cfg)


def add_launch_arguments(p: argparse.ArgumentParser, *, config_help: str) -> None:
    """The arguments every launched stage takes (pretrain, finetune)."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for a multi-node run ('host slots=N' lines)")
    p.add_argument("--master-addr", help="address of the first host (multi-node)")
    p.add_argument("--master-port", type=int, help="rendezvous port (multi-node; default 29500)")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_launch_arguments(p, config_help="preset name or YAML file")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        result = launch(cfg, hostfile=args.hostfile, master_addr=args.master_addr, master_port=args.master_port)
    except LaunchError as e:
        print(f"mfm pretrain: {e}", file=sys.stderr)
        return e.code
    print(json.dumps(asdict(result), indent=1))
    return 0
