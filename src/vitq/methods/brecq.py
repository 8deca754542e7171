"""``brecq``: BRECQ (Li et al., ICLR 2021) block reconstruction on the ``repq-vit`` calibration.

The model is calibrated exactly as ``repq-vit`` (log√2 softmax, post-LayerNorm reparameterization, percentile
ranges), then every block is reconstructed (:mod:`vitq.calib.recon`): AdaRound weight rounding and LSQ activation
steps learned jointly against the float block's output, BRECQ's loss and β schedule. So the difference to
``repq-vit`` is the reconstruction alone. Use a larger ``--calib-size`` (the papers: 1024 images). Settings:
``--recon KEY=VALUE`` (:class:`~vitq.config.ReconConfig`).
"""

from __future__ import annotations

from vitq.methods.base import Paper, register_method
from vitq.methods.repq_vit import RepQViT


@register_method("brecq")
class BRECQ(RepQViT):
    round_to_nearest_twin = "repq-vit"
    paper = Paper("BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", "Li et al.",
                  "ICLR", 2021)
    summary = "block reconstruction: AdaRound weight rounding + LSQ activation steps against the float block"
    reconstructs = True
