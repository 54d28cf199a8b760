from setuptools import Extension, setup

setup(
    cffi_modules=["qlog/_log/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "qlog._log._glue",
            ["csrc/pyglue.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
)
