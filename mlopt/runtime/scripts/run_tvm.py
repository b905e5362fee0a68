"""Run this TVM build with the TVM runtime alone (TVM_USE_RUNTIME_LIB=1 works):
    python run_tvm.py inputs.npz outputs.npz
    python run_tvm.py --load-only      # load the library and its device code, run nothing
The loader is mlopt's own, shipped beside this file as the package ``mlopt_runtime``.
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # a build folder (a store object, an image layer) is never written to
sys.path.insert(0, str(here))
from mlopt_runtime import tvm  # noqa: E402

code = tvm.main(here, sys.argv[1:])
if code:
    sys.exit(code)
