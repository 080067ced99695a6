"""A model's product files: `model.safetensors` (every weight and buffer, codebooks included) and
`config.json` (its config dataclass), written and read back exactly."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from torch import nn

FILES = ("model.safetensors", "config.json")
Model = TypeVar("Model", bound=nn.Module)


def save(model: nn.Module, folder: str | Path) -> Path:
    """Write `model.safetensors` and `config.json` (from `model.config`) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / FILES[0]))
    (folder / FILES[1]).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    return folder


def load(model_class: type[Model], config_class: type, folder: str | Path, device: str = "cpu") -> Model:
    """The model saved in `folder`, in eval mode on `device`."""
    from safetensors.torch import load_file

    model = model_class(load_config(config_class, folder))
    model.load_state_dict(load_file(str(Path(folder) / FILES[0]), device=device))
    return model.to(device).eval()


def load_config(config_class: type, folder: str | Path):
    """The config saved in `folder` (its __post_init__ checks run)."""
    return config_class(**json.loads((Path(folder) / FILES[1]).read_text()))
