"""The local backend: a protocol-faithful emulator with fault injection and an rPPG estimate."""
