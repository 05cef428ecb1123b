"""Print the runtime requirements declared in a pyproject.toml, one per line.

worker.Dockerfile uses this to install the dependencies in a layer that depends on pyproject.toml
only, before the source is copied (pip itself has no "install only the dependencies" switch).

usage: python list_requirements.py PYPROJECT [EXTRAS]
EXTRAS is a comma-separated list of [project.optional-dependencies] groups to include as well.
"""

import sys

import tomllib


def requirements(pyproject_path: str, extras: str = "") -> list[str]:
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in (e.strip() for e in extras.split(",")):
        if not extra:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject defines: {sorted(optional)}")
        reqs.extend(optional[extra])
    return reqs


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "")))
