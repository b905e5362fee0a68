"""The bottom layer: what every stage shares and nothing above it defines again.

``errors`` (the exception hierarchy and exit codes), ``model`` (the Model handed between stages, ONNX
file and precision helpers), ``spec`` (the strict pydantic base and the input signature), ``refs``
(image references), ``files`` (atomic writes, hashing, merging), ``util`` (names, paths, scratch
folders), ``hostlock`` (this machine's timing lock). Nothing here imports the rest of mlopt.
"""
