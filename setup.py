from setuptools import setup

setup()  # metadata, dependencies and console scripts live in setup.cfg (declarative); this shim lets Beam runners stage the package (--setup_file ./setup.py)
