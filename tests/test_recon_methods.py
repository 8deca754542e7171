"""The reconstruction-based methods (brecq, qdrop) and reconstruction as an option of any method."""

import timm
import torch
from helpers import quantized_test_vit

import vitq
from vitq.config import QuantConfig, ReconConfig, make
from vitq.methods import method_class


def _reconstruction(method: str, **recon):
    given = None if not recon else make(ReconConfig, **recon)
    config = QuantConfig(method=method, w_bits=4, a_bits=4, reconstruct=given)
    return method_class(config.method)(config).reconstruction()


def test_who_reconstructs_and_with_which_settings():
    assert _reconstruction("repq-vit") is None  # calibration only unless asked
    assert _reconstruction("repq-vit", iterations=7).iterations == 7
    assert _reconstruction("brecq") == ReconConfig()
    qdrop = _reconstruction("qdrop")
    assert qdrop.drop_prob == 0.5 and qdrop.iterations == ReconConfig().iterations
    # the user's explicit settings win over the method's defaults; the others keep them
    assert _reconstruction("qdrop", iterations=3) == ReconConfig(iterations=3, drop_prob=0.5)
    assert _reconstruction("qdrop", drop_prob=0.1).drop_prob == 0.1


def test_qdrop_is_repq_vit_plus_reconstruction():
    """Same calibration as repq-vit, then weights move onto learned roundings (still on the grid)."""
    _, images, repq = quantized_test_vit("repq-vit", 4, 4)


    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    config = QuantConfig(method="qdrop", w_bits=4, a_bits=4, calib_size=2,
                         reconstruct=make(ReconConfig, iterations=3, batch_size=2))
    qdrop = vitq.quantize(model, config, images[:2], progress=False)
    fc1_repq, fc1_qdrop = repq.model.blocks[0].mlp.fc1, qdrop.model.blocks[0].mlp.fc1
    assert not torch.equal(fc1_repq.weight, fc1_qdrop.weight)
    assert torch.equal(fc1_qdrop.weight_quantizer(fc1_qdrop.weight), fc1_qdrop.weight)
    assert torch.equal(fc1_repq.weight_quantizer.scale, fc1_qdrop.weight_quantizer.scale)  # AdaRound keeps Δ
