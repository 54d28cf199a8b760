from setuptools import setup

setup(cffi_modules=["qlog/_build.py:ffibuilder"])
