"""``aphq-vit``: APHQ-ViT (Wu et al., CVPR 2025): block reconstruction weighted by the average perturbation Hessian,
and optionally MLP reconstruction (docs/methods/aphq-vit.md).

- Calibration: ``repq-vit``'s (log√2 softmax, post-LayerNorm reparameterization, MSE percentile ranges).
- Reconstruction: ``qdrop``'s (AdaRound + LSQ steps, each activation kept float with probability 0.5) with the
  ``aphq`` loss of the shared engine (:mod:`vitq.calib.losses`): the squared error of each block's output weighted
  by the diagonal of the prediction KL's Hessian (temperature 20) at the float output, averaged over the images.
- Option ``mlp_reconstruction`` (MR, :mod:`vitq.methods.aphq_vit.mlp_reconstruction`): before calibration every
  MLP's GELU becomes a ReLU (:meth:`restructure`, so a saved model reloads with it) and each MLP is refitted in
  float to its GELU original; ``fc2``'s input (non-negative now) then gets an unsigned quantizer with its zero point
  at 0. MR changes the network: compare its float accuracy too.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from pydantic import Field
from torch import nn

from vitq.config import QuantConfig
from vitq.errors import VitqError
from vitq.methods.aphq_vit.mlp_reconstruction import reconstruct_mlps, swap_gelu_for_relu
from vitq.methods.base import Paper, register_method
from vitq.methods.qdrop import QDrop
from vitq.models import adapter_for
from vitq.quantized_model import QuantizedModel


@register_method("aphq-vit")
class APHQViT(QDrop):
    paper = Paper("APHQ-ViT: Post-Training Quantization with Average Perturbation Hessian Based Reconstruction "
                  "for Vision Transformers", "Wu et al.", "CVPR", 2025)
    summary = ("QDrop block reconstruction weighted by the average perturbation Hessian; optional MLP "
               "reconstruction (GELU → ReLU, refitted in float)")
    recon_defaults: ClassVar[dict[str, Any]] = {"drop_prob": 0.5, "loss": "aphq"}

    class Options(QDrop.Options):
        mlp_reconstruction: bool = Field(False, description="MR: GELU → ReLU in every MLP, refitted in float to the "
                                                            "GELU MLP (changes the network)")
        mr_iterations: int = Field(1000, ge=1, description="MR: Adam steps per MLP (the paper: 20000 on a GPU)")
        mr_batch_size: int = Field(16, ge=1, description="MR: calibration images per step")
        mr_lr: float = Field(1e-3, gt=0, description="MR: Adam learning rate, cosine decay to 0 (the paper: 4e-5 "
                                                      "over its 20000 steps)")
        mr_percentile: float = Field(0.98, gt=0, lt=1, description="MR: quantile of the positive fc2 inputs that "
                                                                  "bounds the clipped term (the paper: 0.98 at 4 "
                                                                  "bits, 0.99 at 3)")

    options: Options

    def __init__(self, config) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None

    def restructure(self, model: nn.Module) -> None:
        """With MR, keep the GELU original (the teacher of the refit) and make every MLP's activation a ReLU."""
        if self.options.mlp_reconstruction:
            self.teacher = copy.deepcopy(model)
            swap_gelu_for_relu(model)

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role == "post_gelu" and self.options.mlp_reconstruction:  # after a ReLU: unsigned, zero point 0
            return {"kind": "uniform", "bits": self.config.a_bits, "granularity": "tensor", "init": self.init,
                    "signed": False, "symmetric": True}
        return super().quantizer_spec(role)

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        if self.options.mlp_reconstruction:
            if self.teacher is None:
                raise VitqError("aphq-vit: MLP reconstruction needs the model prepared by this method instance "
                                "(vitq.quantize does both)")
            adapter = adapter_for(self.teacher)
            adapter.wrap(self.teacher)  # the same stages and module names as the student; no quantizers
            teacher = QuantizedModel(self.teacher.eval(), qmodel.model_name, adapter.family,
                                     QuantConfig(method="float"))
            recon = self.reconstruction()
            reconstruct_mlps(qmodel, teacher, images, iterations=self.options.mr_iterations,
                             batch_size=self.options.mr_batch_size, lr=self.options.mr_lr,
                             percentile=self.options.mr_percentile, temperature=recon.aphq_temperature,
                             eps=recon.aphq_eps, seed=self.config.seed, progress=progress)
            self.teacher = None
        super().calibrate(qmodel, images, progress=progress)
