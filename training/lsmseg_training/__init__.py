"""Training subtree of lsmseg: masked self-supervised pretraining, fine-tuning and export.

Not part of the inference image. Everything here goes through the package's one reader
(:mod:`lsmseg.io`), normaliser (:mod:`lsmseg.normalise`), model factory (:mod:`lsmseg.model`),
weights manifest (:mod:`lsmseg.weights`) and predictor (:mod:`lsmseg.inference`).
"""
