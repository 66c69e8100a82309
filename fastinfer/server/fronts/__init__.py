"""The fronts: codecs around the one admission path (HTTP /predictions, management, the binary protocol, KServe v2)."""
