from setuptools import setup

setup()  # metadata and dependencies live in setup.cfg; this shim lets Beam runners stage the package (--setup_file ./setup.py)
