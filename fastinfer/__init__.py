"""fastinfer: a high-throughput inference server for models compiled with Apache TVM."""

import os

__version__ = "0.1.0"

# TVM's FFI imports PyTorch at its own import when PyTorch is installed (for a faster DLPack path,
# compiled on first use), which adds seconds to every worker's start and to every build. fastinfer
# hands TVM numpy arrays, never torch tensors, so it asks for none of that; set the variable to 0
# to have it anyway.
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
