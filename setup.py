"""Builds the C engine (cffi) and the batch helpers (csrc/pyglue.c).

With QLOG_NO_COMPILE=1 in the environment nothing is compiled: the install
is pure Python and qlog runs on its pure-Python engine (same files, same
guarantees, slower)."""

import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _buildid():
    """qlog/_log/_buildid.py, loaded by path (importing qlog would import the
    compiled modules being built)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qlog", "_log", "_buildid.py")
    spec = importlib.util.spec_from_file_location("_qlog_buildid", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILDID = _buildid()


class stamped_build_ext(build_ext):
    """Compiles the build id (qlog/_log/_buildid.py) into both compiled
    modules as QLOG_BUILD_ID and writes it to the stamp file beside them
    (an installed copy has no csrc/ to compute it from).  The stamp is
    rewritten only when the id changes, and both modules depend on it: a
    new id rebuilds both, whatever the files' times say."""

    def _stamp(self) -> str:  # where the modules are built (setuptools copies them for --inplace)
        return os.path.join(self.build_lib, "qlog", "_log", BUILDID.STAMP)

    def _inplace_stamp(self) -> str:
        package_dir = self.get_finalized_command("build_py").get_package_dir("qlog._log")
        return os.path.join(package_dir, BUILDID.STAMP)

    def build_extensions(self) -> None:
        build_id, stamp = BUILDID.source_id(), self._stamp()
        if BUILDID.stamped_id(os.path.dirname(stamp)) != build_id:
            os.makedirs(os.path.dirname(stamp), exist_ok=True)
            with open(stamp, "w", encoding="ascii") as f:
                f.write(build_id + "\n")
        for ext in self.extensions:
            ext.define_macros.append(("QLOG_BUILD_ID", f'"{build_id}"'))
            ext.depends.append(stamp)
        super().build_extensions()

    def copy_extensions_to_source(self) -> None:  # --inplace, and pip install -e
        super().copy_extensions_to_source()
        self.copy_file(self._stamp(), self._inplace_stamp(), level=self.verbose)

    def get_outputs(self) -> list:
        outputs = super().get_outputs()  # --inplace: the keys of get_output_mapping()
        return outputs if self.inplace else outputs + [self._stamp()]

    def get_output_mapping(self) -> dict:
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping[self._stamp()] = self._inplace_stamp()
        return mapping


if os.environ.get("QLOG_NO_COMPILE", "") not in ("", "0"):
    setup()
else:
    setup(
        cmdclass={"build_ext": stamped_build_ext},
        cffi_modules=["qlog/_log/_build.py:ffibuilder"],
        ext_modules=[
            Extension(
                "qlog._log._glue",
                ["csrc/pyglue.c"],
                extra_compile_args=["-O2", "-Wall", "-Wextra"],
            )
        ],
    )
