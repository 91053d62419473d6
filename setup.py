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
setup(packages=list(package_dir), package_dir=package_dir)
