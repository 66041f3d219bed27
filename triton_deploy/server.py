"""Run a repository on the ``tritonserver`` that PyTriton's wheel ships (``ib-triton serve``).

What that binary needs, measured with nvidia-pytriton 0.7.0 (Triton 2.51):
- the Python backend's stub, which the wheel keeps in ``python_backend_stubs/3.X/``, copied into
  the backend directory's ``python/`` beside ``libtriton_python.so`` and
  ``triton_python_backend_utils.py`` (without the latter the backend takes the model for a
  "Python-based backend" and looks for ``model.py`` in its own folder);
- numpy < 2 in the stub's Python (the wheel requires it; with numpy 2 tensors arrive corrupted),
  so the models run in an environment of their own: a venv, created once under
  ``$IB_EDGE_HOME/triton-env/KEY`` (KEY: Python version + the pinned requirements), with the
  caller's versions of torch, transformers, onnxruntime, ... and numpy < 2;
- that venv's ``bin`` first on PATH (the stub's embedded Python finds its prefix, and so the
  venv's site-packages, from ``python3`` on PATH, as PyTriton does; PYTHONPATH is ignored);
  ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` and the base Python's libpython.
The ib-edge code itself is copied per run into a temporary folder that ``model.py`` puts on
``sys.path`` (``IB_EDGE_TRITON_PYTHONPATH``), so the models always run the caller's code.

The server binds 127.0.0.1 only; SIGTERM/SIGINT stop it and every process it started (it runs
in its own process group: its stubs included).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError, InputError
from ib_edge.runtime.pipeline import cache_home

from .repository import read_record

PYTRITON = "nvidia-pytriton==0.7.0"
NUMPY = "numpy>=1.26,<2"  # the stub of nvidia-pytriton 0.7.0 is built against numpy 1.x
# what the runtime needs in the models' environment, pinned to the caller's versions
MIRRORED = ("torch", "transformers", "onnxruntime", "onnx", "tokenizers", "safetensors", "pillow")
ENV_MARKER = "ib-triton-env.json"
HOST = "127.0.0.1"


class ServeError(IbEdgeError):
    pass


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    env: str | None = None            # the models' environment; default: created under $IB_EDGE_HOME
    ready_timeout_s: float = 600.0
    exit_timeout_s: int = 10          # in-flight requests get this long on SIGTERM, then SIGKILL

    def check(self) -> "ServeOptions":
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 1 <= p <= 65535 for p in ports):
            raise InputError("ports must be between 1 and 65535")
        if len(set(ports)) != 3:
            raise InputError("--http-port, --grpc-port and --metrics-port must differ")
        return self


# --- the models' environment ---------------------------------------------------------------
def env_requirements() -> list[str]:
    reqs = [PYTRITON, NUMPY]
    for name in MIRRORED:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise ServeError(f"{name} is not installed here; the Triton models' environment mirrors this one's "
                             "versions", hint="pip install -e '.[triton]'") from None
    return reqs


def python_tag() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def default_env_dir(reqs: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([python_tag(), reqs]).encode()).hexdigest()[:12]
    return cache_home() / "triton-env" / key


@dataclasses.dataclass(frozen=True)
class TritonEnv:
    root: Path

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{python_tag()}" / "site-packages"

    @property
    def dist(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def server(self) -> Path:
        return self.dist / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        return self.root / "triton-backends"


def _build_backends(env: TritonEnv) -> None:
    stub = env.dist / "python_backend_stubs" / python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (env.dist / "python_backend_stubs").iterdir())
        raise ServeError(f"{PYTRITON} has no Python backend stub for Python {python_tag()} (it has {', '.join(have)})",
                         hint="run ib-triton with one of those Python versions")
    shutil.copytree(env.dist / "backends", env.backends)
    shutil.copy2(stub, env.backends / "python" / "triton_python_backend_stub")


def prepare_env(env_dir: str | os.PathLike | None = None, log=lambda m: None) -> TritonEnv:
    """The models' environment: reused when its marker says it is complete, else created (a venv
    of this Python, pip-installed; minutes the first time), in a temporary sibling renamed into place."""
    import venv

    reqs = env_requirements()
    root = Path(env_dir).expanduser().resolve() if env_dir else default_env_dir(reqs)
    env = TritonEnv(root)
    marker = root / ENV_MARKER
    if marker.is_file():
        rec = json.loads(marker.read_text(encoding="utf-8"))
        if rec.get("requirements") != reqs and env_dir is not None:
            log(f"ib-triton: note: {root} was made for {rec.get('requirements')}, this environment has {reqs}")
        return env
    if root.exists():
        raise ServeError(f"{root} exists but is not a complete ib-triton environment (no {ENV_MARKER})",
                         hint="remove it, or pass another --env")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"ib-triton: creating the models' environment in {root} (once; pip install {' '.join(reqs)})")
    t0 = time.perf_counter()
    try:
        venv.EnvBuilder(with_pip=True, symlinks=True).create(tmp)
        cmd = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            tail = "\n".join(res.stdout.strip().splitlines()[-15:])
            raise ServeError(f"pip could not install the models' environment:\n{tail}",
                             hint="fix the package index access, or prepare an environment by hand and pass --env")
        _build_backends(TritonEnv(tmp))
        seconds = time.perf_counter() - t0
        (tmp / ENV_MARKER).write_text(json.dumps({"requirements": reqs, "python": python_tag(),
                                                  "seconds": round(seconds, 1)}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"ib-triton: environment ready in {seconds:.0f} s")
    return env


# --- the ib-edge code the models import ------------------------------------------------------
def copy_code(dest: Path) -> Path:
    """ib_edge/__init__.py, ib_edge.runtime and ib_edge.triton (their .py files) into ``dest``."""
    import ib_edge
    import ib_edge.runtime
    import ib_edge.triton

    pkg = dest / "ib_edge"
    pkg.mkdir(parents=True)
    shutil.copy2(ib_edge.__file__, pkg / "__init__.py")
    for mod, sub in ((ib_edge.runtime, "runtime"), (ib_edge.triton, "triton")):
        (pkg / sub).mkdir()
        for f in Path(mod.__file__).parent.glob("*.py"):
            shutil.copy2(f, pkg / sub / f.name)
    return dest


def _libpython_dir() -> str | None:
    """The base interpreter's libpython (the stub links libpython3.X.so.1.0; the venv's stdlib is
    this interpreter's, so its own libpython goes first)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{python_tag()}.so.1.0"
    return libdir if libdir and (Path(libdir) / name).is_file() else None


def server_command(env: TritonEnv, repo: Path, opts: ServeOptions) -> list[str]:
    return [str(env.server), "--model-repository", str(repo), "--backend-directory", str(env.backends),
            "--http-address", HOST, "--grpc-address", HOST, "--metrics-address", HOST,
            "--http-port", str(opts.http_port), "--grpc-port", str(opts.grpc_port),
            "--metrics-port", str(opts.metrics_port), "--disable-auto-complete-config",
            "--exit-timeout-secs", str(opts.exit_timeout_s), "--log-verbose", "0"]


def server_environ(env: TritonEnv, code_dir: Path) -> dict[str, str]:
    environ = dict(os.environ)
    environ["PATH"] = f"{env.root / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    libs = [p for p in (_libpython_dir(), str(env.libs), environ.get("LD_LIBRARY_PATH")) if p]
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    environ["IB_EDGE_TRITON_PYTHONPATH"] = str(code_dir)
    environ.pop("PYTHONPATH", None)
    environ.pop("PYTHONHOME", None)
    return environ


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # the stubs, if any outlived the server
    proc.wait()


def serve(repo, options: ServeOptions = ServeOptions(), log=lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Run ``repo`` until SIGTERM/SIGINT (returns 0) or until the server fails (ServeError)."""
    opts = options.check()
    repo = Path(repo).expanduser().resolve()
    record = read_record(repo)
    env = prepare_env(opts.env, log)
    code_dir = Path(tempfile.mkdtemp(prefix="ib-triton-code-"))
    copy_code(code_dir)
    stopping: list[int] = []

    proc = subprocess.Popen(server_command(env, repo, opts), env=server_environ(env, code_dir),
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            cwd=code_dir)  # the stub puts its cwd on sys.path: only ib_edge there

    def on_signal(signum, frame):
        stopping.append(signum)
        _signal_group(proc, signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log(f"ib-triton: serving {repo} ({record.get('variant')} variant) with {env.server} (pid {proc.pid})")
        deadline = time.monotonic() + opts.ready_timeout_s
        while not stopping and proc.poll() is None and not _ready(opts.http_port):
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver not ready after {opts.ready_timeout_s:.0f} s (its log is above)")
            time.sleep(0.5)
        if not stopping and proc.poll() is None:
            log(f"ib-triton: ready: http {HOST}:{opts.http_port}, grpc {HOST}:{opts.grpc_port}, "
                f"metrics {HOST}:{opts.metrics_port}; models {', '.join(record.get('models', []))}")
        while proc.poll() is None:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        if not stopping:
            raise ServeError(f"tritonserver exited with code {proc.returncode} (its log is above)",
                             hint="a port in use, or a model that failed to load, is named there")
        log("ib-triton: stopped")
        return 0
    finally:
        stop(proc, opts.exit_timeout_s + 5)
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(code_dir, ignore_errors=True)
