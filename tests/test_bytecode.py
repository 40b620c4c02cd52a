"""The bytecode cache for installs without compiled bytecode (mop_ray.bytecode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mop_ray import bytecode


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A real, uncompiled package ``mop_probe_pkg`` on sys.path: -> its directory."""
    root = tmp_path / "site"
    pkg = root / "mop_probe_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(root))
    return pkg


@pytest.fixture
def restore_prefix(monkeypatch):
    """Bytecode written as a plain Python writes it (this machine sets PYTHONDONTWRITEBYTECODE); sys and the
    environment put back after the test. The environment is restored whole: monkeypatch.delenv of an unset
    variable records nothing, so a PYTHONPYCACHEPREFIX that use_bytecode_cache sets would outlive the test, and
    every later Ray worker of the session would compile its imports from source (PYTHONDONTWRITEBYTECODE being
    back) — that doubled the fault tests' times."""
    saved = dict(os.environ)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    for var in ("PYTHONPYCACHEPREFIX", "MOP_RAY_PYCACHE", "PYTHONDONTWRITEBYTECODE"):
        monkeypatch.delenv(var, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def deny_writes_under(monkeypatch, top: Path):
    """os.access as an unprivileged user sees a read-only install under ``top`` (the tests run as root here)."""
    real = os.access

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(top.resolve()):
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(bytecode.os, "access", access)


def import_in_child(package: Path) -> None:
    subprocess.run([sys.executable, "-c", f"import {package.name}"], check=True,
                   env={**os.environ, "PYTHONPATH": str(package.parent)})


def assert_a_child_compiles_into(cache: Path, package: Path) -> None:
    """A process started from here (a local Ray worker) compiles ``package`` into ``cache``, not beside it."""
    import_in_child(package)
    assert not (package / "__pycache__").exists()
    assert list(cache.rglob(f"{package.name}/__init__.*.pyc"))


def test_installed_packages_here_need_no_cache(restore_prefix):
    assert not any(bytecode.uncached(p) for p in bytecode.PROBES)
    assert not bytecode.uncached("no_such_package_anywhere")
    assert bytecode.use_bytecode_cache() is None
    assert sys.pycache_prefix is None and "PYTHONPYCACHEPREFIX" not in os.environ


def test_a_writable_or_compiled_package_needs_no_cache(package, restore_prefix):
    assert not bytecode.uncached("mop_probe_pkg")  # no .pyc yet, but Python can write one
    import_in_child(package)
    assert list((package / "__pycache__").glob("__init__.*.pyc"))
    assert not bytecode.uncached("mop_probe_pkg")


def test_a_read_only_uncompiled_package_gets_a_cache_the_children_use(package, tmp_path, monkeypatch,
                                                                      restore_prefix):
    deny_writes_under(monkeypatch, package.parent)
    assert bytecode.uncached("mop_probe_pkg")
    cache = tmp_path / "pycache"
    assert bytecode.use_bytecode_cache(cache, probes=("mop_probe_pkg",)) == cache
    assert sys.pycache_prefix == str(cache) and os.environ["PYTHONPYCACHEPREFIX"] == str(cache)
    assert_a_child_compiles_into(cache, package)
    assert not bytecode.uncached("mop_probe_pkg")  # compiled now, in the cache


def test_dont_write_bytecode_gets_the_cache_and_nothing_beside_the_sources(package, tmp_path, monkeypatch,
                                                                           restore_prefix):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert bytecode.uncached("mop_probe_pkg")  # its directory is writable, but nothing would be written
    cache = tmp_path / "pycache"
    assert bytecode.use_bytecode_cache(cache, probes=("mop_probe_pkg",)) == cache
    assert not sys.dont_write_bytecode and "PYTHONDONTWRITEBYTECODE" not in os.environ
    assert_a_child_compiles_into(cache, package)


@pytest.mark.parametrize("setting", ["user prefix", "off"])
def test_a_prefix_the_user_set_or_mop_ray_pycache_0_is_left_alone(package, tmp_path, monkeypatch, restore_prefix,
                                                                  setting):
    deny_writes_under(monkeypatch, package.parent)
    if setting == "off":
        monkeypatch.setenv("MOP_RAY_PYCACHE", "0")
    else:
        monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "theirs"))
    assert bytecode.use_bytecode_cache(tmp_path / "ours", probes=("mop_probe_pkg",)) is None
    assert not (tmp_path / "ours").exists()
    assert "PYTHONPYCACHEPREFIX" not in os.environ


def test_the_default_directory_follows_mop_ray_pycache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("MOP_RAY_PYCACHE", str(tmp_path / "here"))
    assert bytecode.default_dir() == tmp_path / "here"
    monkeypatch.delenv("MOP_RAY_PYCACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bytecode.default_dir() == tmp_path / "xdg" / "mop-ray" / "pycache"
