"""Inference workers: processes that own a device and run compiled models (``worker.process``),
and the front's handle on one (``worker.handle``)."""
