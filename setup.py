from setuptools import Extension, setup

setup(
    cffi_modules=["qlog/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "qlog._glue",
            ["csrc/pyglue.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
)
