"""Check a wheelhouse for the GPU image: every requirement of every wheel (for CPython 3.12 on
Linux x86_64, extras left out) is met by a wheel in it or by a distribution the image has, one
version per distribution, and the whole under a size limit.

    python benchmarks/check_wheelhouse.py wheelhouse benchmarks/gpu_image_packages.txt --max-mib 60
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement

# the GPU image's interpreter, for environment markers
ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("wheelhouse")
    ap.add_argument("image_packages", help="text file: one distribution name a line, # comments")
    ap.add_argument("--max-mib", type=float, default=60.0)
    args = ap.parse_args()
    wheels = sorted(Path(args.wheelhouse).glob("*.whl"))
    if not wheels:
        print(f"{args.wheelhouse}: no wheels", file=sys.stderr)
        return 1
    image = {
        norm(line.strip())
        for line in Path(args.image_packages).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    have: dict[str, list[str]] = {}
    requires: list[tuple[str, str]] = []
    for w in wheels:
        name, version, reqs = wheel_metadata(w)
        have.setdefault(norm(name), []).append(version)
        requires += [(name, r) for r in reqs]
    problems = [f"{n}: {len(v)} versions ({', '.join(v)})" for n, v in have.items() if len(v) > 1]
    for owner, text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue  # an extra, or another platform's
        key = norm(req.name)
        if key in have:
            if not any(req.specifier.contains(v, prereleases=True) for v in have[key]):
                problems.append(f"{owner} needs {text}; the wheelhouse has {have[key]}")
        elif key not in image:
            problems.append(f"{owner} needs {text}: neither in the wheelhouse nor on the image")
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    if mib > args.max_mib:
        problems.append(f"{mib:.1f} MiB of wheels, over the {args.max_mib:.0f} MiB limit")
    for p in problems:
        print(f"wheelhouse: {p}", file=sys.stderr)
    print(
        f"{args.wheelhouse}: {len(wheels)} wheels, {mib:.1f} MiB, "
        f"{'OK' if not problems else f'{len(problems)} problem(s)'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
