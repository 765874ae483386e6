"""Shared pytest fixtures: paths to shared fixtures, root/kernel gating, the nydus-image runner.

Tests marked ``kernel`` are skipped automatically unless running as root on a kernel that lists
erofs in /proc/filesystems; the ``require_root_kernel`` fixture does the same for one test.
``tests/`` is on sys.path (pyproject ``pythonpath``), so tests import ``corpus`` and ``treecmp``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from corpus import TreeInfo, make_tree
from nydus.kernel_mount import erofs_supported

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "nydus"


def root_kernel_skip_reason() -> str | None:
    """Why kernel-mount tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root for mount(2)"
    if not erofs_supported():
        return "kernel does not list erofs in /proc/filesystems"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        reason = root_kernel_skip_reason()
        if reason:
            pytest.skip(f"kernel test: {reason}")


_DIAGNOSTICS = pytest.StashKey[list[Callable[[], str]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> object:
    """A failed phase's report gets the text of what :func:`report_on_failure` registered."""
    report = yield
    if report.failed:
        for diagnose in item.stash.get(_DIAGNOSTICS, []):
            report.sections.append(("diagnostics", diagnose()))
    return report


@pytest.fixture
def report_on_failure(request: pytest.FixtureRequest) -> Callable[[Callable[[], str]], None]:
    """Register a callable whose text goes into the test's report if the test fails."""
    return request.node.stash.setdefault(_DIAGNOSTICS, []).append


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``<repo>/../shared/fixtures/nydus``: real upstream Nydus bootstraps, blobs and tars."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES} (../shared beside the repo)")
    return SHARED_FIXTURES


@pytest.fixture
def require_root_kernel() -> None:
    """Skip the test unless running as root with kernel EROFS support."""
    reason = root_kernel_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> TreeInfo:
    """The small edge-case corpus (``corpus.make_tree``), built once per session. Read-only!"""
    return make_tree(tmp_path_factory.mktemp("corpus") / "tree", scale="small")


@dataclass
class NydusImage:
    """Runs the ``nydus-image`` CLI in a subprocess with this interpreter (the venv's).

    The module is started as ``python -c 'from nydus.cli.nydus_image import main; ...'`` rather
    than ``python -m``: that calls ``main()`` whether or not the module has a ``__main__``
    guard, and needs no console script on PATH.
    """

    cwd: Path

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        boot = (
            "import sys; from nydus.cli.nydus_image import main; "
            "sys.argv[0] = 'nydus-image'; sys.exit(main())"
        )
        return [sys.executable, "-c", boot, *(os.fspath(a) for a in args)]

    def __call__(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``nydus-image ARGS``; with ``check`` a non-zero exit fails the test with output."""
        proc = subprocess.run(
            self.command(*args),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        if check and proc.returncode != 0:
            pytest.fail(_describe(proc, args), pytrace=False)
        return proc


def _describe(
    proc: subprocess.CompletedProcess[str], args: Sequence[str | os.PathLike[str]]
) -> str:
    shown = " ".join(os.fspath(a) for a in args)
    return (
        f"nydus-image {shown} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )


@pytest.fixture
def nydus_image(tmp_path: Path) -> NydusImage:
    """A runner for ``nydus-image`` whose working directory is the test's ``tmp_path``."""
    return NydusImage(cwd=tmp_path)
