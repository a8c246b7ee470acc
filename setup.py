from setuptools import setup

setup()  # metadata, dependencies and console scripts live in pyproject.toml (PEP 621); this shim lets Beam runners stage the package (--setup_file ./setup.py)
