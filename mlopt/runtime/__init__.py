"""What runs a build, with nothing of mlopt's compiler: imported by validation and measurement here,
and shipped as files beside the loaders that run without mlopt (images, ``run_tvm.py``)."""
