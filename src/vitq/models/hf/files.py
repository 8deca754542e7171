"""A transformers folder: its file names, the hub download, reading its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from vitq.errors import VitqError
from vitq.models.weights import quiet_hub

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"


def is_hf_name(name: object) -> bool:
    """Whether ``name`` names a transformers checkpoint (``hf:<folder or hub name>``)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def hf_folder(name: str, *, weights: bool = True) -> Path:
    """The local folder of ``hf:<source>``: the folder itself, or the hub snapshot (downloaded when missing from
    the cache; ``weights=False`` fetches the small JSON files only)."""
    source = name[len(HF_PREFIX):]
    if not source:
        raise VitqError("hf: needs a folder or a hub name, e.g. hf:./deit-tiny or hf:facebook/deit-tiny-patch16-224")
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise VitqError(f"{name}: no such folder (and not a hub name owner/model)")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_FILE, PROCESSOR_FILE, *([WEIGHTS_FILE] if weights else [])]
    try:
        with quiet_hub():
            return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # network or hub failures come in many exception types
        raise VitqError(f"could not download {source!r} from the HuggingFace hub ({type(err).__name__}); "
                        "pass a local folder: hf:<folder with config.json and model.safetensors>") from None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VitqError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise VitqError(f"{path} is not a JSON object")
    return data
