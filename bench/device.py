"""`make bench-device`: the whole benchmark on a bare GPU machine, from the carried wheels.

    python3 bench/device.py OUT [--wheels .whl] [any bench/run.py option]

1. installs the wheels in .whl/ (made beforehand by `make wheels`) into a fresh folder with
   pip, from those files alone: no registry is asked;
2. checks the machine's own packages (torch, transformers, ...) against what the wheels and
   the project ask for, and prints precisely what does not fit (it runs anyway: each
   variant's line then says what worked);
3. runs every variant of bench/run.py with this Python, the carried packages first on
   PYTHONPATH, writing OUT/<device>-<date>-<HHMM>.jsonl and its .log as results come.

Standard library only (plus `packaging`, which pip vendors): the machine's python3 runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402 (after the path set-up above)
from bench.wheels import NOT_CARRIED, WHEEL_DIR, canonical, parse_requirement, tested_versions  # noqa: E402

REPORT_TITLES = {"does_not_fit": "does not fit", "outside_project_ranges": "does not fit",
                 "differs_from_tested": "fits, untested", "shadowed": "shadowed", "declared_not_needed": "not needed"}


def install(wheels: list[Path], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--find-links", str(wheels[0].parent), "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(target), *map(str, wheels)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"bench/device.py: pip could not install the wheels in {wheels[0].parent} "
                         f"(command: {' '.join(cmd)})")
    # Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE), every variant's child would
    # compile what it imports of diffusers again (~2 s of CPU each, every time): compiled once
    # here, on every core.  Elsewhere the first child to import a module writes its .pyc, for the
    # third of these files that are ever imported.  A file that does not compile is skipped, as
    # pip's own compile step skips it.
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        subprocess.run([sys.executable, "-m", "compileall", "-qq", "-j", "0", str(target)], stdout=subprocess.DEVNULL)


def found_version(name: str, path: list[str]) -> str | None:
    dist = next(iter(metadata.distributions(name=name, path=path)), None)
    return dist.version if dist else None


def fit(target: Path) -> dict:
    """What the carried packages and the project need against what this machine has."""
    path = [str(target), *sys.path]
    carried = {canonical(d.metadata["Name"]): d for d in metadata.distributions(path=[str(target)])}
    does_not_fit, outside, untested, unneeded = [], [], [], []
    for name, dist in sorted(carried.items()):
        for line in dist.requires or []:
            req = parse_requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = found_version(req.name, path)
            if have is None and canonical(req.name) in NOT_CARRIED:
                unneeded.append(f"{name} declares {req}, absent: {NOT_CARRIED[canonical(req.name)]}")
            elif have is None:
                does_not_fit.append(f"{name} {dist.version} needs {req}: not installed")
            elif not req.specifier.contains(have, prereleases=True):
                does_not_fit.append(f"{name} {dist.version} needs {req}: found {have}")
    tested = tested_versions()
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = parse_requirement(line)
        have = found_version(req.name, path)
        if canonical(req.name) in carried or have is None or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if not req.specifier.contains(have, prereleases=True):
            outside.append(f"{req.name} {have}: outside pyproject.toml's {req.specifier}")
        elif tested.get(canonical(req.name), have) != have:
            untested.append(f"{req.name} {have}: CI tests {tested[canonical(req.name)]} (constraints.txt)")
    shadowed = [f"{name}: carried {dist.version} is used, not the machine's {found_version(name, sys.path)}"
                for name, dist in carried.items() if found_version(name, sys.path)]
    return {"carried": {n: d.version for n, d in sorted(carried.items())}, "does_not_fit": does_not_fit,
            "outside_project_ranges": outside, "differs_from_tested": untested, "shadowed": shadowed,
            "declared_not_needed": unneeded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other options are bench/run.py's (python3 bench/run.py --help).")
    parser.add_argument("out", type=Path, help="folder for the results (on the device: $OUT)")
    parser.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="the folder `make wheels` filled (.whl)")
    parser.add_argument("--target", type=Path, help="where to install them (default: a fresh temporary folder)")
    args, rest = parser.parse_known_args(argv)
    run.parse_args(["--out", str(args.out), *rest])  # bad options stop here, before anything is installed
    wheels = sorted(args.wheels.glob("*.whl"))
    if not wheels:
        print(f"bench/device.py: no wheels in {args.wheels}; run `make wheels` where a registry is reachable "
              "and carry that folder", file=sys.stderr)
        return 2
    target = args.target or Path(tempfile.mkdtemp(prefix="tistudio-site-"))
    try:
        return install_and_run(wheels, target, args.out, rest)
    finally:
        if args.target is None:
            shutil.rmtree(target, ignore_errors=True)


def install_and_run(wheels: list[Path], target: Path, out: Path, rest: list[str]) -> int:
    install(wheels, target)
    report = fit(target)
    print(f"carried: {', '.join(f'{n} {v}' for n, v in report['carried'].items())} -> {target}")
    for key, title in REPORT_TITLES.items():
        for item in report[key]:
            print(f"  {title}: {item}")
    if report["does_not_fit"] or report["outside_project_ranges"]:
        print("  running anyway: each variant's line says whether it worked")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return run.main(["--out", str(out), *rest], env=env, preamble={"fit": report, "site": str(target)})


if __name__ == "__main__":
    sys.exit(main())
