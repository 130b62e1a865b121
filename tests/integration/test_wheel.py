"""The wheel holds one top-level package, ``edgeprobe``, with its data, and works on its own.

Built offline (``pip wheel --no-build-isolation`` with the venv's setuptools) from a copy of the
working tree, so neither a stale ``build/`` folder nor a concurrent build in the repository can
change what is checked. Then installed with ``pip install --target`` and run with ``python -S``
and an explicit ``PYTHONPATH`` of that target and the venv's site-packages: no ``.pth`` file is
read, so the editable install's link tree (``build/__editable__…``) and the repository are not on
``sys.path``; and from a folder whose ``agent``, ``probes`` and ``collector`` packages refuse to be
imported, so a leftover top-level import would fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.support.paths import REPO

SETUPTOOLS_MIN = (77, 0)  # pyproject.toml's build-system requires
# Top-level names of the working tree that are not sources (cf. .gitignore), and names anywhere.
SKIP_TOP = {".git", ".venv", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "run",
            "bench-results"}  # fmt: skip
SKIP_ANYWHERE = ("__pycache__", "*.pyc", "*.egg-info")
SHADOWED = ("agent", "probes", "collector", "grafana")


@dataclass(frozen=True)
class Built:
    wheel: Path
    names: list[str]
    version: str
    site: Path  # where the wheel was installed


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _copy_sources(dst: Path) -> None:
    top = shutil.ignore_patterns(*SKIP_TOP, *SKIP_ANYWHERE)
    anywhere = shutil.ignore_patterns(*SKIP_ANYWHERE)

    def ignore(folder: str, names: list[str]) -> set[str]:
        return (top if Path(folder) == REPO else anywhere)(folder, names)

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, env=_offline_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    have = tuple(int(p) for p in re.findall(r"\d+", version("setuptools"))[:2])
    if have < SETUPTOOLS_MIN:
        pytest.fail(
            f"setuptools {version('setuptools')} in {sys.prefix}; the offline build needs >= 77 "
            "(the test extra pins it: ./run.sh test installs it)"
        )
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    _copy_sources(src)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
    m = re.fullmatch(r"edgeprobe-([^-]+)-py3-none-any\.whl", wheels[0].name)
    assert m, wheels[0].name
    site = tmp / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheels[0]), cwd=tmp)
    yield Built(wheels[0], names, m.group(1), site)


def test_the_wheel_has_one_top_level_package_and_its_metadata(built: Built) -> None:
    top = {name.split("/", 1)[0] for name in built.names}
    assert top == {"edgeprobe", f"edgeprobe-{built.version}.dist-info"}, sorted(top)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert built.version == project["version"]
    assert not [n for n in built.names if "/tests/" in n or "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_holds_the_data_files(built: Built) -> None:
    names = set(built.names)
    for required in (
        "edgeprobe/py.typed",
        "edgeprobe/examples/agent.yaml",
        "edgeprobe/examples/collector.yaml",
        "edgeprobe/examples/systemd/edgeprobe-agent.service",
        "edgeprobe/examples/systemd/edgeprobe-collector.service",
        "edgeprobe/examples/systemd/edgeprobe-responder.service",
        "edgeprobe/grafana/provisioning/datasources/edgeprobe.yaml",
        "edgeprobe/grafana/provisioning/dashboards/edgeprobe.yaml",
    ):
        assert required in names, required
    dashboards = [n for n in names if re.fullmatch(r"edgeprobe/grafana/dashboards/[^/]+\.json", n)]
    assert len(dashboards) == 5, dashboards
    imports = [n for n in names if re.fullmatch(r"edgeprobe/grafana/import/[^/]+\.json", n)]
    assert len(imports) == 5, imports
    with zipfile.ZipFile(built.wheel) as zf:
        for name in (
            "examples/agent.yaml",
            "examples/collector.yaml",
            *(f"examples/systemd/edgeprobe-{role}.service" for role in ("agent", "collector", "responder")),
        ):
            assert zf.read(f"edgeprobe/{name}") == (REPO / "src" / "edgeprobe" / name).read_bytes()
        for name in dashboards + imports:
            assert zf.read(name) == (REPO / "grafana" / name.removeprefix("edgeprobe/grafana/")).read_bytes()


def test_every_module_of_the_tree_is_in_the_wheel(built: Built) -> None:
    """Each folder that pyproject.toml maps into the namespace arrives whole (a subpackage left out
    of ``packages`` would be missing from the wheel and only break an installed copy)."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-dir"
    ]
    expected = set()
    for package, folder in package_dir.items():
        for py in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                expected.add(package.replace(".", "/") + "/" + py.relative_to(REPO / folder).as_posix())
    missing = sorted(expected - set(built.names))
    assert not missing, f"in the tree but not in the wheel: {missing}"


def _run_installed(built: Built, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -S args`` with only the installed wheel and the venv's dependencies on sys.path."""
    env = _offline_env()
    env["PYTHONPATH"] = os.pathsep.join([str(built.site), sysconfig.get_paths()["purelib"]])
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def shadowing_cwd(tmp_path: Path) -> Path:
    for name in SHADOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('raise ImportError("shadowed")\n')
    return tmp_path


def test_the_installed_wheel_runs_on_its_own(built: Built, shadowing_cwd: Path) -> None:
    proc = _run_installed(built, shadowing_cwd, "-m", "edgeprobe", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"edgeprobe, version {built.version}"

    probe = (
        "import sys, edgeprobe, edgeprobe.cli; print(edgeprobe.__file__); print(edgeprobe.__version__); "
        "print(*sys.path, sep='\\n')"
    )
    proc = _run_installed(built, shadowing_cwd, "-c", probe)
    assert proc.returncode == 0, proc.stderr
    file, version_, *path = proc.stdout.splitlines()
    assert Path(file).is_relative_to(built.site), file
    assert version_ == built.version
    # Nothing of the repository (its root, src/, the editable link tree in build/) but the venv's site-packages.
    deps = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(REPO) and Path(p).resolve() != deps], path

    proc = _run_installed(built, shadowing_cwd, "-m", "edgeprobe", "init", "agent")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (REPO / "src" / "edgeprobe" / "examples" / "agent.yaml").read_text(encoding="utf-8")


def test_every_installed_module_imports_past_the_shadows(built: Built, shadowing_cwd: Path) -> None:
    """No module reaches for a top-level ``agent``/``probes``/``collector`` (the cwd's refuse)."""
    script = (
        "import importlib, pkgutil, edgeprobe\n"
        "failed = []\n"
        "for m in pkgutil.walk_packages(edgeprobe.__path__, 'edgeprobe.'):\n"
        "    if m.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{m.name}: {type(err).__name__}: {err}')\n"
        "print(*failed, sep='\\n')\n"
    )
    proc = _run_installed(built, shadowing_cwd, "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
