"""Synthetic light-sheet phantoms with exact labels (:mod:`.phantom`), for tests, demos and training.

Not part of the inference image (.dockerignore leaves ``synth/`` out): ``lsmseg phantom`` is
registered through an entry point (:mod:`.cli`) and is simply absent there.
"""

KINDS = ("vessels", "cells", "nuclei", "plaques")
