"""falcoria-worker: the scan agent of the Falcoria distributed scanning system."""

__version__ = "0.1.0"
