"""The optional `litellm` scenario: LiteLLM proxy in front of the same fake upstream.

LiteLLM is the Python gateway users compare with, so `scripts/bench --litellm` runs it
on the same machine in the same run: no database, no master key, 2 uvicorn workers,
with the lean settings LiteLLM documents for production (ERROR logging, no spend or
error logs, no admin UI, no telemetry, no remote model-cost map fetch).

It lives in its own virtualenv (default .bench/litellm-venv, git-ignored), created on
first use with `python -m venv` + `pip install 'litellm[proxy]==<PINNED_VERSION>'` and
reused afterwards; a venv with another version is upgraded in place.

The builders here (config, environment, command line, request body) are pure and
unit-tested; `ensure_installed` runs pip.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench_lib.bodies import REQUEST_MODEL

PINNED_VERSION = "1.108.7"
PACKAGE = "litellm[proxy]"
MODEL_NAME = "bench-model"  # what the benchmark's requests ask LiteLLM for
WORKERS = 2
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 300.0  # a cold start imports a lot: about a minute on 2 busy cores
# uvicorn kills a worker that does not answer its supervisor's ping within this many
# seconds (default 5); a worker still importing LiteLLM on a busy machine can miss it
# and is then restarted over and over, so start-up never ends.
WORKER_HEALTHCHECK_TIMEOUT_S = 120
READY_PATH = "/health/liveliness"
# Printed once by each worker when its app has loaded the config (stdout).
WORKER_READY_TEXT = "Proxy initialized"

# Environment LiteLLM documents for a lean proxy (proxy/prod and proxy/debugging docs,
# checked against this version's source).
LEAN_ENV = {
    "LITELLM_LOG": "ERROR",  # no per-request info logs (uvicorn's access log included)
    "LITELLM_MODE": "PRODUCTION",  # no load_dotenv()
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the model cost map from the internet
    "LITELLM_TELEMETRY_DISABLED": "true",
    # This version refuses to start without a master key; the benchmark runs it without
    # one (no auth, like the gateway here), which the proxy allows with this switch.
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
}
# Inherited variables that would change what is measured (a key to require, a database).
_DROPPED_ENV_PREFIXES = ("LITELLM_", "PYTHONPATH", "PYTHONHOME", "DATABASE_URL", "DIRECT_URL", "REDIS_")

# Lines of LiteLLM's stderr that are expected and say nothing about a failure.
NOISE = ("LITELLM_MASTER_KEY is not set",)


class InstallError(Exception):
    """LiteLLM could not be installed; the message says why (pip's last lines)."""


def requirement(version: str = PINNED_VERSION) -> str:
    return f"{PACKAGE}=={version}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def litellm_executable(venv: Path) -> Path:
    return venv / "bin" / "litellm"


def config(upstream_port: int, model_name: str = MODEL_NAME, upstream_model: str = REQUEST_MODEL) -> dict[str, Any]:
    """The proxy config: one deployment, the fake upstream as an OpenAI-compatible API."""
    return {
        "model_list": [
            {
                "model_name": model_name,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "fake",
                },
            }
        ],
        "general_settings": {
            # No database: nothing to write, and these say so explicitly.
            "disable_spend_logs": True,
            "disable_error_logs": True,
            # The fake upstream streams only when asked by `x-bench-mode: sse` (as the
            # gateway forwards it); LiteLLM forwards x- headers only with this.
            "forward_client_headers_to_llm_api": True,
        },
        "litellm_settings": {"set_verbose": False, "json_logs": False, "request_timeout": 600},
    }


def environment(base: Mapping[str, str]) -> dict[str, str]:
    """`base` (the benchmark's environment) less what would change LiteLLM's behaviour, plus LEAN_ENV."""
    env = {k: v for k, v in base.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
    env.update(LEAN_ENV)
    return env


def command(venv: Path, config_path: Path, port: int, workers: int = WORKERS) -> list[str]:
    return [
        str(litellm_executable(venv)),
        "--config", str(config_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--num_workers", str(workers),
        "--timeout_worker_healthcheck", str(WORKER_HEALTHCHECK_TIMEOUT_S),
    ]


def ready_workers(stdout: str) -> int:
    return stdout.count(WORKER_READY_TEXT)


def failure_lines(stderr_tail: str) -> list[str]:
    """LiteLLM's stderr without the lines it always prints."""
    return [line for line in stderr_tail.splitlines() if not any(n in line for n in NOISE)]


# --- install (runs pip) ----------------------------------------------------------------


def installed_version(venv: Path) -> str | None:
    """The litellm version in the venv, or None (no venv, not installed, or its proxy
    dependencies missing, e.g. after an interrupted install)."""
    python = venv_python(venv)
    if not python.exists():
        return None
    check = (
        "import importlib.metadata as m\n"
        "for dep in ('uvicorn', 'fastapi', 'orjson', 'apscheduler'): m.version(dep)\n"
        "print(m.version('litellm'))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _run_logged(argv: list[str], log_file: Any, timeout: float) -> None:
    log_file.write(f"$ {' '.join(argv)}\n")
    log_file.flush()
    try:
        done = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(f"`{' '.join(argv[:4])} ...` did not finish within {timeout:.0f}s") from None
    except OSError as exc:
        raise InstallError(f"could not run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise InstallError(f"`{' '.join(argv[:4])} ...` exited with code {done.returncode}")


def log_summary(text: str, lines: int = 3) -> str:
    """pip's reason for failing, on one line: its ERROR lines, else its last lines."""
    kept = [
        ln.strip() for ln in text.splitlines()
        if ln.strip() and not ln.startswith("$ ") and "is ignored: it is neither a file" not in ln
    ]
    errors = [ln for ln in kept if ln.startswith("ERROR")]
    return " | ".join((errors or kept)[-lines:]) or "(no output)"


def _tail(path: Path) -> str:
    try:
        return log_summary(path.read_text(errors="replace"))
    except OSError:
        return "(no log)"


def pip_freeze(venv: Path) -> list[str]:
    """What the venv holds, for the results file."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(venv_python(venv)), "-m", "pip", "freeze", "--disable-pip-version-check"],
            capture_output=True, text=True, timeout=60,
        )
        return done.stdout.split()
    return []


def ensure_installed(
    venv: Path, log_path: Path, log: Callable[[str], None], version: str = PINNED_VERSION
) -> dict[str, Any]:
    """LiteLLM `version` in `venv`: reused when there, else installed (venv created if
    needed). Returns what was done; raises InstallError with pip's last lines."""
    info: dict[str, Any] = {"venv": str(venv), "requirement": requirement(version), "install_log": str(log_path)}
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f"{venv.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits, then reuses
        found = installed_version(venv)
        info["found_version"] = found
        if found == version:
            info["installed_now"] = False
            info["version"] = found
            info["pip_freeze"] = pip_freeze(venv)
            return info
        started = time.monotonic()
        what = "installing" if found is None else f"replacing {found} with"
        log(f"litellm: {what} {requirement(version)} into {venv} (once; log {log_path})")
        with log_path.open("w") as out:
            try:
                if not venv_python(venv).exists():
                    _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], out, 300)
                _run_logged(
                    [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                     requirement(version)],
                    out, INSTALL_TIMEOUT_S,
                )
            except InstallError as exc:
                out.flush()
                raise InstallError(f"{exc}: {_tail(log_path)}") from None
        info["install_seconds"] = round(time.monotonic() - started, 1)
        found = installed_version(venv)
        if found != version:
            raise InstallError(f"after pip install, the venv has litellm {found!r}, not {version}: {_tail(log_path)}")
        info["installed_now"] = True
        info["version"] = found
        info["pip_freeze"] = pip_freeze(venv)
        log(f"litellm: installed {found} in {info['install_seconds']:.0f}s")
        return info

