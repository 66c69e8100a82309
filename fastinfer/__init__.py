"""fastinfer: a high-throughput inference server for models compiled with Apache TVM."""

__version__ = "0.1.0"
