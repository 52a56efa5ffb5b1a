"""`python -m mio.envcheck`: is this environment one mio can run in? One line per problem, each naming
the package (or the pair of packages) and the fix, instead of the tracebacks of every test that
would otherwise fail on it.

Checked, in order: the lock (in a source checkout: requirements.lock agrees with pyproject.toml, and
the installed versions are the locked ones), `pip check`, the native extensions mio loads, and that
every `mio` module imports. `make test` and `make demo` run it first.

A release upstream can break an environment that is resolved afresh at every install (torchaudio
2.11.1 declares `torch>=2.11` yet its library does not load beside torch 2.11.0), which is why
mio installs from a lock and why this check names the pair.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FIX_INSTALL = "fix: `make clean && make install` (installs exactly the lock)"
FIX_LOCK = "fix: `make lock` (regenerates the lock from pyproject's ranges), then `make test`"
# The lock's target: Linux x86_64, CPython 3.11 (the Makefile's `uv pip compile` flags).
LOCK_ENVIRONMENT = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
                    "platform_machine": "x86_64", "python_version": "3.11", "implementation_name": "cpython"}
# A lock line: `name==version \`; its `# via` comments name who needs it (`mio (pyproject.toml)`: mio).
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
VIA_SELF = "mio (pyproject.toml)"


@dataclass(frozen=True)
class NativeExtension:
    """A compiled module mio loads, the distribution that ships it, and what it is built against."""
    module: str
    distribution: str
    built_against: str | None = None  # a distribution whose exact release this one's library needs
    fix: str = FIX_INSTALL


NATIVE = (
    NativeExtension("torch", "torch"),
    NativeExtension("torchaudio", "torchaudio", built_against="torch"),
    NativeExtension("tokenizers", "tokenizers"),
    NativeExtension("soundfile", "soundfile"),
    NativeExtension("av", "av"),
    NativeExtension("cv2", "opencv-python",
                    fix="fix: install Debian's libgl1 libglib2.0-0 libxcb1 (`make system-deps`)"),
)


@dataclass
class LockedPackage:
    name: str  # canonical
    version: str
    needed_by: list[str] = field(default_factory=list)  # canonical names, or VIA_SELF


def read_lock(path: Path) -> dict[str, LockedPackage]:
    """The packages of a `uv pip compile` lock, with the `# via` names that pull each in."""
    packages: dict[str, LockedPackage] = {}
    current: LockedPackage | None = None
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            current = packages[canonicalize_name(m[1])] = LockedPackage(canonicalize_name(m[1]), m[2])
        elif current is not None and (m := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)):
            name = m[1].strip()
            if name != "via":
                current.needed_by.append(name if name == VIA_SELF else canonicalize_name(name.split()[0]))
    return packages


def pyproject_requirements(pyproject: Path, extras: tuple[str, ...]) -> list[Requirement]:
    """The dependencies and the named extras' dependencies that apply on the lock's target."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in extras:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    reqs = [Requirement(s) for s in specs]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENVIRONMENT)]


def lock_problems(pyproject: Path, lock: Path, extras: tuple[str, ...]) -> list[str]:
    """Where the lock and pyproject disagree: a requirement the lock lacks, a locked version outside
    pyproject's range, a package the lock keeps for mio that pyproject no longer asks for, or one that
    nothing in the lock needs."""
    locked = read_lock(lock)
    wanted = {canonicalize_name(r.name): r for r in pyproject_requirements(pyproject, extras)}
    problems = []
    for name, req in wanted.items():
        if name not in locked:
            problems.append(f"{lock.name}: {req} is in pyproject.toml but not in the lock; {FIX_LOCK}")
        elif not req.specifier.contains(locked[name].version, prereleases=True):
            problems.append(f"{lock.name}: {name}=={locked[name].version} is outside pyproject.toml's "
                            f"range {req}; {FIX_LOCK}")
    for name, pkg in locked.items():
        if VIA_SELF in pkg.needed_by and name not in wanted:
            problems.append(f"{lock.name}: {name}=={pkg.version} is locked for mio but pyproject.toml does "
                            f"not ask for it; {FIX_LOCK}")
        elif not pkg.needed_by or any(n != VIA_SELF and n not in locked for n in pkg.needed_by):
            problems.append(f"{lock.name}: {name}=={pkg.version} is needed by nothing in the lock "
                            f"({', '.join(pkg.needed_by) or 'no # via line'}); {FIX_LOCK}")
    return problems


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def drift_problems(lock: Path) -> list[str]:
    """Installed packages whose version is not the locked one (or that are missing)."""
    problems = []
    for name, pkg in read_lock(lock).items():
        have = installed_version(name)
        if have is None:
            problems.append(f"{name}=={pkg.version} is locked but not installed; {FIX_INSTALL}")
        elif canonical_version(have) != canonical_version(pkg.version):
            problems.append(f"{name} {have} is installed but {lock.name} pins {pkg.version}; {FIX_INSTALL}")
    return problems


def canonical_version(v: str) -> str:
    """A version without its local label (torch's `+cu130`): the lock pins the public release."""
    return v.split("+", 1)[0]


def pip_problems() -> list[str]:
    """`pip check`'s complaints (a package whose declared requirement is not met), one line each."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if out.returncode == 0:
        return []
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    return [f"pip check: {ln}; {FIX_INSTALL}" for ln in lines] or [f"pip check failed: {out.stderr.strip()}"]


def native_problems(extensions: tuple[NativeExtension, ...] = NATIVE) -> list[str]:
    """Each native extension that does not load, named with the release it needs beside it."""
    problems = []
    for ext in extensions:
        try:
            importlib.import_module(ext.module)
        except Exception as e:  # an extension fails as ImportError, OSError or its own error: all mean "broken"
            have = installed_version(ext.distribution) or "(not installed)"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if ext.built_against:
                partner = installed_version(ext.built_against) or "(not installed)"
                problems.append(f"{ext.distribution} {have} does not load beside {ext.built_against} {partner} "
                                f"({reason}): they must be an exact pair; {ext.fix}")
            else:
                problems.append(f"{ext.distribution} {have} does not load ({reason}); {ext.fix}")
    return problems


def module_problems() -> tuple[int, list[str]]:
    """(modules imported, one line per `mio` module that does not import)."""
    import mio

    names = ["mio"] + [m.name for m in pkgutil.walk_packages(mio.__path__, "mio.")]
    problems = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # report every module's failure, not only the first
            missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
            fix = FIX_INSTALL if missing and not missing.startswith("mio") else \
                "this is mio's own error: please report it with this line"
            problems.append(f"{name} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"{fix}")
    return len(names), problems


def check(root: Path | None) -> list[str]:
    """Every problem of this environment; `root`: a source checkout holding the locks, or None."""
    problems = []
    if root is not None:
        pyproject, lock, gpu_lock = root / "pyproject.toml", root / "requirements.lock", root / "requirements-gpu.lock"
        problems += lock_problems(pyproject, lock, extras=("dev",))
        if gpu_lock.is_file():
            problems += lock_problems(pyproject, gpu_lock, extras=("dev", "gpu"))
        problems += drift_problems(lock)
    problems += pip_problems()
    problems += native_problems()
    if not problems:  # importing every module on a broken torch would only repeat the lines above
        problems += module_problems()[1]
    return problems


def source_root() -> Path | None:
    """The checkout mio runs from, when it runs from one (an installed wheel has no lock beside it)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "requirements.lock").is_file() and (root / "pyproject.toml").is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mio.envcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="the checkout whose lock to check (default: the one mio runs from, if any)")
    args = parser.parse_args(argv)
    problems = check(args.root or source_root())
    for p in problems:
        print(f"[mio] environment: {p}", file=sys.stderr)
    if not problems:
        print("[mio] environment ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
