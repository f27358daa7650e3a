"""Distribution: what pyproject.toml, the sdist and the README promise, checked
offline (the wheels themselves are built and tested by cibuildwheel in CI)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The compiled extensions (setup.py), each built from src/unixsrv/<name>.pyx.
EXTENSIONS = ("_core", "_loadgen")

# The wheel matrix of issue 12: every CPython 3.11-3.15, the free-threaded
# 3.14t and 3.15t, on these platforms (cp310 is kept while 3.10 is supported).
PYTHONS = ["cp311", "cp312", "cp313", "cp314", "cp315", "cp314t", "cp315t"]
FREE_THREADED = ["cp314t", "cp315t"]
PLATFORMS = [
    "manylinux_x86_64",
    "manylinux_aarch64",
    "musllinux_x86_64",
    "musllinux_aarch64",
    "macosx_x86_64",
    "macosx_arm64",
]


def _pyproject() -> dict:
    tomllib = pytest.importorskip(
        "tomllib", reason="reading pyproject.toml needs tomllib (Python 3.11+)"
    )
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _selected(selectors: str, identifier: str) -> bool:
    return any(fnmatch.fnmatch(identifier, pattern) for pattern in selectors.split())


def test_cibuildwheel_selects_every_wheel_of_the_matrix() -> None:
    cibw = _pyproject()["tool"]["cibuildwheel"]
    wanted = [f"{py}-{plat}" for py in PYTHONS for plat in PLATFORMS]
    missing = [
        i for i in wanted if not _selected(cibw["build"], i) or _selected(cibw.get("skip", ""), i)
    ]
    assert missing == []
    assert "{project}/tests" in cibw["test-command"]  # each wheel runs the suite


def test_free_threaded_wheels_are_tested_with_the_gil_kept_off() -> None:
    cibw = _pyproject()["tool"]["cibuildwheel"]
    overrides = [
        o
        for o in cibw.get("overrides", [])
        if all(_selected(o["select"], f"{py}-x") for py in FREE_THREADED)
    ]
    assert overrides, "no [[tool.cibuildwheel.overrides]] for the free-threaded wheels"
    command = " && ".join(overrides[-1]["test-command"])
    assert "sys._is_gil_enabled()" in command
    assert "PYTHON_GIL=0 python -m pytest {project}/tests" in command


def test_classifiers_and_project_urls() -> None:
    project = _pyproject()["project"]
    classifiers = set(project["classifiers"])
    for minor in range(11, 16):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert any(
        c.startswith("Programming Language :: Python :: Free Threading :: ") for c in classifiers
    )
    urls = project["urls"]
    for key in ("Source", "Documentation", "Changelog", "Issues"):
        assert urls[key].startswith("https://"), key
    assert "docs" in project["optional-dependencies"]


def test_readme_links_are_absolute() -> None:
    """The package index renders the README away from the repository: a
    relative link to a file breaks there (in-page #anchors still work)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"(?:src|href)=\"([^\"]+)\"", text)
    assert targets, "no links found: the pattern is broken"
    relative = [t for t in targets if not re.match(r"(https://|http://|mailto:|#)", t)]
    assert relative == []


# Build output, caches, environments: never an input of the sdist.
_NOT_SOURCES = (".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o")
_NOT_SOURCES += (".*_cache", ".venv*", "wheelhouse")


def _sources() -> set[str]:
    """What the build of the extension and the package reads."""
    names = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"}
    for path in (ROOT / "src" / "unixsrv").rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.name == "py.typed" or path.suffix in {
            ".py",
            ".pyi",
            ".pyx",
            ".pxd",
            ".pxi",
            ".h",
        }:
            names.add(path.relative_to(ROOT).as_posix())
    names.update(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py"))
    return names


def test_sdist_contains_every_source_the_build_needs(tmp_path: pathlib.Path) -> None:
    """Wheels are built from the sdist, so a file it lacks is a broken wheel."""
    for dist in ("build", "setuptools", "Cython"):
        try:  # installed distributions: a build/ directory in the cwd is not `build`
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"building an sdist without isolation needs the {dist!r} package")
    # Built from a copy: setuptools writes egg-info into the tree it builds,
    # and ships whatever an old egg-info's SOURCES.txt lists on the next run.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(tree),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = tmp_path.glob("unixsrv-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert sorted(_sources() - members) == []
    # Both extensions' sources, and the shared declarations under includes/.
    assert {
        "src/unixsrv/_core.pyx",
        "src/unixsrv/_loadgen.pyx",
        "src/unixsrv/_loadgen.pyi",
        "src/unixsrv/includes/system.pxd",
    } <= members
    # Generated or built files never ship: the sdist must build from its sources.
    generated = {f"src/unixsrv/{name}.c" for name in EXTENSIONS}
    assert [m for m in members if m.endswith((".so", ".o")) or m in generated] == []


@pytest.mark.skipif(
    not sysconfig.get_config_var("Py_GIL_DISABLED"),
    reason="needs a free-threaded CPython (3.14t, 3.15t); CI runs it there",
)
def test_importing_keeps_the_gil_off_on_a_free_threaded_build() -> None:
    """Without PYTHON_GIL, CPython re-enables the GIL (warning) on importing an
    extension that does not declare itself free-threading compatible."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = "import sys, unixsrv, unixsrv._core, unixsrv._loadgen; print(sys._is_gil_enabled())"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _wheel(path: pathlib.Path, members: dict[str, int]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, size in members.items():
            zf.writestr(name, b"\0" * size)
    return str(path)


@pytest.mark.parametrize(
    ("members", "status"),
    [
        (
            {
                "unixsrv/_core.cpython-311-x86_64-linux-gnu.so": 10,
                "unixsrv/_loadgen.cpython-311-x86_64-linux-gnu.so": 10,
            },
            0,
        ),
        ({"unixsrv/_core.cpython-311-x86_64-linux-gnu.so": 10}, 1),  # no load generator
        (
            {
                "unixsrv/_core.cpython-311-x86_64-linux-gnu.so": 10,
                "unixsrv/_loadgen.cpython-311-x86_64-linux-gnu.so": 1_000_000,
            },
            1,
        ),  # unstripped
    ],
)
def test_wheel_size_check_wants_both_extensions_small(
    tmp_path: pathlib.Path, members: dict[str, int], status: int
) -> None:
    """.ci/wheel_size.py, run on every built wheel in CI: both extensions of
    setup.py present, each under 1 MB."""
    wheel = _wheel(tmp_path / "unixsrv-0.1.0-cp311-cp311-linux_x86_64.whl", members)
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "wheel_size.py"), wheel],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == status, out.stdout + out.stderr


def test_setup_builds_every_extension() -> None:
    """setup.py, the sdist check and .ci/wheel_size.py agree on the extensions."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    for name in EXTENSIONS:
        assert f'"unixsrv.{name}"' in text, name
        assert (ROOT / "src" / "unixsrv" / f"{name}.pyx").is_file(), name
        assert (ROOT / "src" / "unixsrv" / f"{name}.pyi").is_file(), name
    size_check = (ROOT / ".ci" / "wheel_size.py").read_text(encoding="utf-8")
    for name in EXTENSIONS:
        assert f'"unixsrv/{name}."' in size_check, name
