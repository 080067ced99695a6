"""The token models a `train` stage can train, by `arch`, and their product files.

A spec's `model:` mapping is `{arch: decoder|valle|parti, <that config's keys>}`; the sizes that follow
from the vocabulary (vocab_size, and for VALL-E the codebooks) are filled in from it. `config.json`
holds the arch, the config and the vocabulary, so a checkpoint knows which packed shards it can read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from pipeline.data import packing
from pipeline.tokenizers import model_files
from pipeline.tokenizers.config_checks import ConfigError
from pipeline.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class Arch:
    config: type
    model: type
    tasks: tuple[str, ...]        # the document tasks it trains on (cm3: variants included for the decoder)
    version: int = 1              # bumped when the same config trains different weights: its stages retrain


def _archs() -> dict[str, Arch]:
    from pipeline.models.decoder import Decoder, DecoderConfig
    from pipeline.models.parti import Parti, PartiConfig
    from pipeline.models.valle import Valle, ValleConfig

    return {"decoder": Arch(DecoderConfig, Decoder, ("t2i", "i2t", "asr", "tts"), version=2),   # 2: its softmax is
                                                                                              # over its tasks' ids
            "valle": Arch(ValleConfig, Valle, ("tts",), version=2),    # 2: the AR's softmax is over what it can say
            "parti": Arch(PartiConfig, Parti, ("t2i",))}


ARCH_NAMES = ("decoder", "valle", "parti")
FROM_VOCABULARY = ("vocab_size", "n_q", "codebook_size", "boi_id", "image_code_levels", "image_code_start",
                   "output_ranges")           # config keys model_config fills in


def arch(name: str) -> Arch:
    archs = _archs()
    if name not in archs:
        raise ConfigError("model", "arch", f"{name!r} is not a model (archs: {', '.join(ARCH_NAMES)})")
    return archs[name]


def check_model_keys(model: dict) -> None:
    """ConfigError naming the key when `model` (a spec's `model:` mapping) cannot build a config."""
    name = model.get("arch")
    if name is None:
        raise ConfigError("model", "arch", f"is required (one of {', '.join(ARCH_NAMES)})")
    config = arch(name).config
    known = {f.name for f in fields(config)}
    for key in model:
        if key in FROM_VOCABULARY:
            raise ConfigError("model", key, "is set from the vocabulary, the stage's tasks and its tokenizers, "
                                            "not in the spec")
        if key != "arch" and key not in known:
            raise ConfigError("model", key, f"is not a {name} key (keys: {', '.join(sorted(known))})")
    config(**{k: v for k, v in model.items() if k != "arch"})


def model_config(model: dict, vocab: Vocab, image_code_levels: tuple[int, ...] = (), tasks: tuple[str, ...] = ()):
    """The arch's config for the spec's `model:` mapping, sized from `vocab` (and, for a decoder with
    image_code_digits, from the FSQ levels of the image tokenizer that made its image codes). A decoder
    given the `tasks` it trains on predicts only the ids their documents hold (() : every id)."""
    check_model_keys(model)
    cls = arch(model["arch"]).config
    sizes = {"vocab_size": vocab.size}
    if model["arch"] == "valle":
        audio = [r for r in vocab.ranges if r.name.startswith("audio:")]
        if not audio:
            raise ConfigError("model", "arch", "valle needs speech tokens (the vocabulary has no audio ranges)")
        sizes.update(n_q=len(audio), codebook_size=audio[0].size)
    if model["arch"] == "decoder" and model.get("image_positions"):
        sizes["boi_id"] = vocab.special("<boi>")
    if model["arch"] == "decoder" and model.get("image_code_digits"):
        sizes.update(image_code_levels=tuple(image_code_levels), image_code_start=vocab.range("image").offset)
    if model["arch"] == "decoder" and tasks:
        outputs = tuple(packing.task_ranges(vocab, tasks))
        sizes["output_ranges"] = () if outputs == ((0, vocab.size),) else outputs   # (): every id, nothing to cut
    return cls(**{k: v for k, v in model.items() if k != "arch"}, **sizes)


def build(name: str, config) -> nn.Module:
    return arch(name).model(config)


def save(model: nn.Module, name: str, vocab: Vocab, folder: str | Path) -> None:
    """model.safetensors (tied weights stored once) + config.json {"arch", "config", "vocab"}."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / model_files.FILES[0]))
    document = {"arch": name, "config": asdict(model.config), "vocab": vocab.to_json()}
    (folder / model_files.FILES[1]).write_text(json.dumps(document, indent=1) + "\n")


@dataclass
class TokenModel:
    """A loaded token model: the network (eval mode), its arch and the vocabulary it was trained on."""
    arch: str
    net: nn.Module
    vocab: Vocab

    @property
    def config(self):
        return self.net.config

    def parameters(self):
        return self.net.parameters()


def load(folder: str | Path, device: str = "cpu") -> TokenModel:
    """The model saved in `folder`, in eval mode on `device`."""
    from safetensors.torch import load_model

    document = json.loads((Path(folder) / model_files.FILES[1]).read_text())
    name = document["arch"]
    net = build(name, arch(name).config(**document["config"]))
    load_model(net, str(Path(folder) / model_files.FILES[0]), device=device)
    return TokenModel(name, net.to(device).eval(), Vocab.from_json(document["vocab"]))
