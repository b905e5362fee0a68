"""Build this artifact's TensorRT or MIGraphX engine on the GPU it serves from, cache it, and run it:
    python engine_entry.py build [--cache DIR]               build the engine, or find it cached
    python engine_entry.py run IN.npz OUT.npz [--cache DIR]  run it on the arrays in IN.npz
    python engine_entry.py key                               print the cache key on this machine
The code is mlopt's engine loader, shipped beside this file as the package ``mlopt_runtime``.
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # a build folder (a store object, an image layer) is never written to
sys.path.insert(0, str(here))
from mlopt_runtime import engines  # noqa: E402

if __name__ == "__main__":
    sys.exit(engines.main(None, here))
