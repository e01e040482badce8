"""mfr-ray: turn face datasets into mask-robust face recognisers on Ray."""

__version__ = "0.1.0"
