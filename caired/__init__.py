"""caired: stream camera frames to the Caire rPPG backend and keep every answer."""

import os as _os

__version__ = "0.1.0"

# A second line behind the PNG header check (caired.frames): OpenCV refuses to decode an
# image of more pixels than this says (its default is 2**30). OpenCV reads it once, when cv2
# is first imported, so it is set here, before any caired module can import cv2; a value
# already in the environment is kept. 2**28 = config.DECODER_PIXEL_LIMIT.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))

# caired runs OpenCV in its own worker threads, one frame each. OpenCV's own thread pool
# would split each call (cvtColor, resize...) again across every core, and its idle
# threads spin (sched_yield) waiting for the next call: streaming a folder as JPEG made
# ~350 sched_yield calls per frame with it, ~13 without. One thread per call. OpenCV
# reads this when it first makes its pool (the first call that would use it), not at
# import: set here it holds for every caired command, whatever imported cv2 first; a
# value already in the environment is kept. Child processes inherit it.
_os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")
