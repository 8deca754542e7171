"""The method-agnostic calibration engine that several methods share.

- :mod:`~vitq.calib.runner`: stage-by-stage calibration in forward order (optionally with a float stream);
- :mod:`~vitq.calib.search`: choose a quantizer's parameters by a downstream output error;
- :mod:`~vitq.calib.layer_inputs`: float64 input moments of weight layers and the per-row weight grid;
- :mod:`~vitq.calib.learnable` + :mod:`~vitq.calib.recon`: block (or layer) reconstruction, minimising a stage loss
  of :mod:`~vitq.calib.losses`.

A method's own algorithm lives in its package under :mod:`vitq.methods`; data loading in :mod:`vitq.data`.
"""
