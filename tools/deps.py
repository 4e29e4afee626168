"""Prints pagedjax's requirements from pyproject.toml, one per line.

Usage: python tools/deps.py [EXTRA ...]   (the base dependencies plus each extra's)
"""

import pathlib
import sys
import tomllib

project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[1:]:
    if extra not in project["optional-dependencies"]:
        sys.exit(f"deps.py: unknown extra {extra!r}; known: {sorted(project['optional-dependencies'])}")
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
