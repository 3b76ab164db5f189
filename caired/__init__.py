"""caired: stream camera frames to the Caire rPPG backend and keep every answer."""

__version__ = "0.1.0"
