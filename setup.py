"""Packages of the one `compensa` namespace, spread over the repository's
top-level folders (pyproject.toml holds everything else): setuptools' own
package finder cannot join one namespace across several roots."""

from setuptools import find_namespace_packages, setup

ROOTS = ("generated", "orchestrator", "participants")

package_dir = {
    package: f"{root}/{package.replace('.', '/')}"
    for root in ROOTS
    for package in find_namespace_packages(root, include=["compensa.*"])
}
# The .proto files a participant's contract imports (compensa/v1/contract.proto
# and its own imports), installed as an include directory for protoc:
# `compensa codegen --include-path` prints it (compensa.common.contracts).
package_dir["compensa.protos"] = "protos"
setup(packages=list(package_dir), package_dir=package_dir)
