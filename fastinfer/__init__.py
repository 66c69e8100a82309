"""fastinfer: a high-throughput inference server for models compiled with Apache TVM."""

import os

__version__ = "0.1.0"

# Where PyTorch is installed, TVM's FFI loads (and on first use compiles) an extension for faster
# DLPack exchange with torch tensors at its own import. fastinfer hands TVM numpy arrays, never
# torch tensors: it needs none of that. (Workers also keep PyTorch itself out: worker/process.py.)
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
