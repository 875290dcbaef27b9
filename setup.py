"""Build hook: the wheel carries the shipped model and the firmware's host-build sources.

`pyproject.toml` holds everything declarative; this file only adds a build_py step that copies
files kept outside the package in the repository (where the trainer and `hw/` expect them) into
the wheel under `sorterd/_bundled/`:

- models/default/{model.onnx, manifest.json}: the bundle `[inference] model = "default"` names
  (not weights.pt: the sorter never reads it; the trainer takes it from a clone or the sdist),
- hw/firmware/{core, host, test}: the C sources `sorterd run --sim --valves mcu` builds the
  valve controller's host build from (`make all test`: the core's unit tests run first).

An editable install (`pip install -e .`) copies nothing: the code finds them in the checkout.
See `sorterd/data/bundle.py` (default_bundle) and `sorterd/sim/firmware.py` (firmware_source).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED = {  # source (repository) -> destination under sorterd/_bundled/
    "models/default/model.onnx": "models/default/model.onnx",
    "models/default/manifest.json": "models/default/manifest.json",
}
BUNDLED_TREES = {"hw/firmware/core": "firmware/core", "hw/firmware/host": "firmware/host",
                 "hw/firmware/test": "firmware/test"}  # the build runs the core's unit tests first
TREE_SUFFIXES = (".c", ".h")
TREE_NAMES = ("Makefile",)


class BuildPyWithBundled(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "sorterd" / "_bundled"
        for src, dst in BUNDLED.items():
            target = dest / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HERE / src, target)
        for src, dst in BUNDLED_TREES.items():
            for p in sorted((HERE / src).iterdir()):
                if p.is_file() and (p.suffix in TREE_SUFFIXES or p.name in TREE_NAMES):
                    target = dest / dst / p.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)


setup(cmdclass={"build_py": BuildPyWithBundled})
