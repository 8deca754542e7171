"""Building the timm model of a transformers folder and loading its weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vitq.errors import VitqError
from vitq.models.hf.files import CONFIG_FILE, PROCESSOR_FILE, WEIGHTS_FILE, hf_folder, read_json
from vitq.models.hf.layout import Layout, layout_for
from vitq.models.hf.processor import data_config
from vitq.models.weights import load_state_dict_file


def create_hf_architecture(name: str) -> nn.Module:
    """The randomly initialised timm model of ``hf:<source>`` (its config files only), its preprocessing in
    ``pretrained_cfg``, in eval mode."""
    folder = hf_folder(name, weights=False)
    return _architecture(name, folder)[0]


def _architecture(name: str, folder: Path) -> tuple[nn.Module, Layout]:
    if not (folder / CONFIG_FILE).is_file():
        raise VitqError(f"{name}: no {CONFIG_FILE} in {folder}")
    layout = layout_for(read_json(folder / CONFIG_FILE), name)
    processor_path = folder / PROCESSOR_FILE
    processor = read_json(processor_path) if processor_path.is_file() else {}
    data = data_config(processor, name, layout.kwargs["img_size"])
    layout.set_input_size(data["input_size"][-1])
    model = layout.build()
    model.pretrained_cfg = {**data, "num_classes": layout.num_classes, "architecture": layout.architecture,
                            "source": name}
    return model.eval(), layout


def load_hf_model(name: str) -> nn.Module:
    """The float timm model of the transformers checkpoint ``hf:<source>``, its weights read strictly from
    ``model.safetensors`` (every tensor finite), in eval mode on the CPU."""
    folder = hf_folder(name)
    model, layout = _architecture(name, folder)
    load_state_dict_file(model, folder / WEIGHTS_FILE, f"{name} ({layout.architecture})",
                         convert=lambda hf_state: layout.timm_state(hf_state, model))
    return model
