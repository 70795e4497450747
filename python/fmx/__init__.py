"""fmx: turn class-based PyTorch models into flat functional programs.

This package holds the Python side of fmx: the exporter that writes task packs
(`python3 -m fmx.export`) and a safetensors reader/writer. It is not the server
(C, under env/) and does not verify candidates.
"""

__version__ = "0.1.0"
