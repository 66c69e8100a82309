"""Model archives (``.fia``): build (``pack``), check and extract (``load``), describe (``commands``).

Importing this package does not import TVM; the modules import it where they use it.
"""
