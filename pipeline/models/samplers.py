"""Sampling a trained token model per task, whatever its arch: caption -> image codes (t2i), image
codes -> caption ids (i2t), phonemes + a speaker prompt -> codec codes (tts). Ids in and out are
local to their vocabulary range (text, image, phoneme, audio codes), as the tokenizers make them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.models.token_model import TokenModel


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 3.0         # t2i classifier-free guidance (1: none)
    seed: int = 0
    i2t_cfg_scale: float = 1.0     # i2t guidance against the caption prior, the model's <t2i> captions (1: none)
    rerank: int = 1                # t2i: images sampled per caption, the model keeps the best (pipeline.models.rerank)
    i2t_rerank: int = 1            # i2t: captions per image (this one + the rest at temperature 1), the best kept

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def __post_init__(self):
        if self.rerank < 1 or self.i2t_rerank < 1:
            raise ValueError(f"rerank and i2t_rerank count candidates: need >= 1, got {self.rerank}, {self.i2t_rerank}")


class SamplingError(ValueError):
    """A task the model cannot sample (its arch does not do it, or the vocabulary lacks a modality)."""


TASKS = {"t2i": ("decoder", "parti"), "i2t": ("decoder",), "tts": ("valle",)}    # task: the archs that do it
_DOING = {"t2i": "sample images", "i2t": "caption images", "tts": "speak (tts needs a valle model)"}


def require_task(model: TokenModel, task: str) -> None:
    """SamplingError unless the model's arch does `task`."""
    if model.arch not in TASKS[task]:
        raise SamplingError(f"a {model.arch} model does not {_DOING[task]}")


def _ids(*parts) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(p, np.int64).ravel() for p in parts]))[None]


_CANDIDATE_SALT = 100_003   # candidate k of salt n samples with salt n + k * _CANDIDATE_SALT


def text_to_image(model: TokenModel, text: list[int], tokens: int, s: SamplingSettings, salt: int = 0) -> np.ndarray:
    """(tokens,) local image codes for the caption's text ids (raster order; the caller reshapes); with
    s.rerank > 1, the candidate under which the model finds the caption likeliest (it must do i2t)."""
    require_task(model, "t2i")
    if s.rerank == 1:
        return _image_for(model, text, tokens, s, salt)
    if model.arch not in TASKS["i2t"]:
        raise SamplingError(f"rerank needs a model that also captions images (a decoder), not a {model.arch}")
    from pipeline.models.rerank import best_image

    images = [_image_for(model, text, tokens, s, salt + k * _CANDIDATE_SALT) for k in range(s.rerank)]
    return images[best_image(model, text, images)]


def _image_for(model: TokenModel, text: list[int], tokens: int, s: SamplingSettings, salt: int) -> np.ndarray:
    vocab = model.vocab
    if model.arch == "parti":
        from pipeline.models.parti import generate_image

        return generate_image(model.net, vocab, list(text), tokens, temperature=s.temperature, top_k=s.top_k,
                              top_p=s.top_p, cfg_scale=s.cfg_scale, generator=s.generator(salt)).numpy()
    from pipeline.models.sampling import generate

    head = [vocab.special("<bos>"), vocab.special("<t2i>")]
    prompt = _ids(head, vocab.to_global("text", text), [vocab.special("<boi>")])
    blank = _ids(head, [vocab.special("<pad>")] * len(text), [vocab.special("<boi>")])   # cfg_dropout's form
    image = vocab.range("image")
    codes = generate(model.net, prompt, tokens, allowed=(image.offset, image.offset + image.size),
                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                     uncond_prompt=blank if s.cfg_scale != 1 else None, generator=s.generator(salt))[0]
    return vocab.to_local("image", codes.numpy())


def image_to_text(model: TokenModel, image: np.ndarray, max_tokens: int, s: SamplingSettings, salt: int = 0) -> list[int]:
    """Caption text ids for local image codes, sampled from text ids only, up to <eos> (or max_tokens).

    With s.i2t_cfg_scale != 1 the logits are guided away from the caption prior: the unconditional
    stream is `<bos> <t2i>`, where the model writes a caption before any image (trained by the CM3
    variants of t2i documents), so what the image adds is amplified, e.g. a shape kind the training
    captions never paired with the color just written. With s.i2t_rerank > 1, this caption and
    i2t_rerank - 1 more sampled at temperature 1 compete, and the one that best explains the image
    (noisy channel, pipeline.models.rerank) is kept."""
    require_task(model, "i2t")
    caption = _caption_for(model, image, max_tokens, s, salt)
    if s.i2t_rerank == 1:
        return caption
    from pipeline.models.rerank import best_caption

    warm = replace(s, temperature=1.0)
    captions = [caption] + [_caption_for(model, image, max_tokens, warm, salt + k * _CANDIDATE_SALT)
                            for k in range(1, s.i2t_rerank)]
    return captions[best_caption(model, image, captions)]


def _caption_for(model: TokenModel, image: np.ndarray, max_tokens: int, s: SamplingSettings, salt: int) -> list[int]:
    from pipeline.models.sampling import generate

    vocab = model.vocab
    prompt = _ids([vocab.special("<bos>"), vocab.special("<i2t>"), vocab.special("<boi>")],
                  vocab.to_global("image", image), [vocab.special("<eoi>")])
    prior = _ids([vocab.special("<bos>"), vocab.special("<t2i>")]) if s.i2t_cfg_scale != 1 else None
    text = vocab.range("text")
    new = generate(model.net, prompt, max_tokens, allowed=(text.offset, text.offset + text.size),
                   stop=vocab.special("<eos>"), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                   cfg_scale=s.i2t_cfg_scale, uncond_prompt=prior, generator=s.generator(salt))[0].numpy()
    return [int(token - text.offset) for token in itertools.takewhile(lambda t: t != vocab.special("<eos>"), new)]


def text_to_speech(model: TokenModel, phonemes: list[int], prompt: np.ndarray, max_frames: int,
                   s: SamplingSettings, salt: int = 0) -> np.ndarray:
    """(n_q, T) local codec codes speaking `phonemes` in the voice of `prompt` (n_q, Tp)."""
    require_task(model, "tts")
    from pipeline.models.valle import synthesize

    return synthesize(model.net, model.vocab, list(phonemes), torch.as_tensor(np.asarray(prompt), dtype=torch.long),
                      max_frames=max_frames, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      generator=s.generator(salt)).numpy()
