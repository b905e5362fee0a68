"""Run this OpenVINO build with the OpenVINO runtime alone: python run_openvino.py inputs.npz outputs.npz
The loader is mlopt's own, shipped beside this file as the package ``mlopt_runtime``.
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # a build folder (a store object, an image layer) is never written to
sys.path.insert(0, str(here))
from mlopt_runtime import openvino  # noqa: E402

code = openvino.main(here, sys.argv[1:])
if code:
    sys.exit(code)
