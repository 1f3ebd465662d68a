"""edgefleet: the umbrella command line and the end-to-end demo. Nothing imports this package."""

__version__ = "0.1.0"
