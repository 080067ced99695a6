"""Sampling a trained token model per task, whatever its arch: caption -> image codes (t2i), image
codes -> caption ids (i2t), phonemes + a speaker prompt -> codec codes (tts). Ids in and out are
local to their vocabulary range (text, image, phoneme, audio codes), as the tokenizers make them.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.models.sampling import generate, guide, restrict
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
    i2t_rerank: int = 1            # i2t: captions per image (this one + its likeliest one-token deviations), the best kept

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
        return _images_for(model, text, tokens, s, [salt])[0]
    if model.arch not in TASKS["i2t"]:
        raise SamplingError(f"rerank needs a model that also captions images (a decoder), not a {model.arch}")
    from pipeline.models.rerank import best_image

    images = _images_for(model, text, tokens, s, [salt + k * _CANDIDATE_SALT for k in range(s.rerank)])
    return images[best_image(model, text, list(images))]


def _images_for(model: TokenModel, text: list[int], tokens: int, s: SamplingSettings, salts: list[int]) -> np.ndarray:
    """(len(salts), tokens) local image codes for the caption, one image a salt; a decoder samples them
    as one batch (each row with its salt's generator: ~3x faster for 4 than one at a time on 1 core)."""
    vocab = model.vocab
    if model.arch == "parti":
        from pipeline.models.parti import generate_image

        return np.stack([generate_image(model.net, vocab, list(text), tokens, temperature=s.temperature, top_k=s.top_k,
                                        top_p=s.top_p, cfg_scale=s.cfg_scale, generator=s.generator(salt)).numpy()
                         for salt in salts])
    head = [vocab.special("<bos>"), vocab.special("<t2i>")]
    prompt = _ids(head, vocab.to_global("text", text), [vocab.special("<boi>")]).expand(len(salts), -1)
    blank = _ids(head, [vocab.special("<pad>")] * len(text), [vocab.special("<boi>")])   # cfg_dropout's form
    image = vocab.range("image")
    codes = generate(model.net, prompt, tokens, allowed=(image.offset, image.offset + image.size),
                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                     uncond_prompt=blank.expand(len(salts), -1) if s.cfg_scale != 1 else None,
                     generator=[s.generator(salt) for salt in salts])
    return vocab.to_local("image", codes.numpy())


def image_to_text(model: TokenModel, image: np.ndarray, max_tokens: int, s: SamplingSettings, salt: int = 0) -> list[int]:
    """Caption text ids for local image codes, sampled from text ids only, up to <eos> (or max_tokens).

    With s.i2t_cfg_scale != 1 the logits are guided away from the caption prior: the unconditional
    stream is `<bos> <t2i>`, where the model writes a caption before any image (trained by the CM3
    variants of t2i documents), so what the image adds is amplified, e.g. a shape kind the training
    captions never paired with the color just written. With s.i2t_rerank > 1, this caption and its
    i2t_rerank - 1 likeliest one-token deviations compete (caption_deviations), and the one that best
    explains the image (noisy channel, pipeline.models.rerank) is kept."""
    require_task(model, "i2t")
    caption = _caption_for(model, image, max_tokens, s, salt)
    if s.i2t_rerank == 1:
        return caption
    from pipeline.models.rerank import best_caption

    captions = [caption] + caption_deviations(model, image, caption, max_tokens, s, s.i2t_rerank - 1)
    return captions[best_caption(model, image, captions)]


@torch.no_grad()
def caption_deviations(model: TokenModel, image: np.ndarray, caption: list[int], max_tokens: int,
                       s: SamplingSettings, n: int) -> list[list[int]]:
    """The n captions that leave `caption` at one position for the likeliest other ids there (by how
    much less likely each is than the id it replaces, under the same guidance), each completed
    greedily: a caption's uncertain choices (a shape's kind) get their alternatives, and its sure
    ones keep theirs. Fewer when fewer exist."""
    vocab, text, eos = model.vocab, model.vocab.range("text"), model.vocab.special("<eos>")
    written = vocab.to_global("text", caption).tolist() + ([eos] if len(caption) < max_tokens else [])
    prompt, prior = _i2t_prompts(vocab, image, s)
    logits = model.net(_ids(prompt, written))[0, prompt.shape[1] - 1:-1].float()      # predicts each written id
    if prior is not None:
        logits = guide(logits, model.net(_ids(prior, written))[0, prior.shape[1] - 1:-1].float(), s.i2t_cfg_scale)
    log_probs = restrict(logits, (text.offset, text.offset + text.size), eos).log_softmax(dim=-1)
    chosen = torch.tensor(written)[:, None]
    cost = (log_probs - log_probs.gather(1, chosen)).scatter(1, chosen, float("-inf")).flatten()
    best = cost.topk(min(n, int(cost.isfinite().sum()))).indices.tolist()
    greedy = replace(s, temperature=0.0)
    departures = [divmod(i, logits.shape[-1]) for i in best]            # (position, id there)
    out = [caption[:position] for position, _ in departures]             # one that writes <eos> ends there
    by_length: dict[int, list[int]] = {}
    for i, (position, token) in enumerate(departures):
        if token != eos:
            out[i] = out[i] + [token - text.offset]
            by_length.setdefault(position + 1, []).append(i)
    for members in by_length.values():                                  # completed greedily, a batch a length
        for i, completed in zip(members, _captions_for(model, image, max_tokens, greedy, [out[i] for i in members])):
            out[i] = completed
    return out


def _i2t_prompts(vocab, image: np.ndarray, s: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The captioning prompt for the image and, when s guides i2t, the caption prior's (`<bos> <t2i>`)."""
    prompt = _ids([vocab.special("<bos>"), vocab.special("<i2t>"), vocab.special("<boi>")],
                  vocab.to_global("image", image), [vocab.special("<eoi>")])
    return prompt, _ids([vocab.special("<bos>"), vocab.special("<t2i>")]) if s.i2t_cfg_scale != 1 else None


def _caption_for(model: TokenModel, image: np.ndarray, max_tokens: int, s: SamplingSettings, salt: int = 0) -> list[int]:
    """A caption for the image."""
    return _captions_for(model, image, max_tokens, s, [[]], salt)[0]


def _captions_for(model: TokenModel, image: np.ndarray, max_tokens: int, s: SamplingSettings,
                  prefixes: list[Sequence[int]], salt: int = 0) -> list[list[int]]:
    """A caption for the image starting with each of `prefixes` (local text ids, all of one length),
    written as one batch."""
    vocab, text, eos = model.vocab, model.vocab.range("text"), model.vocab.special("<eos>")
    prompt, prior = _i2t_prompts(vocab, image, s)
    given = torch.from_numpy(np.stack([vocab.to_global("text", list(p)) for p in prefixes]).astype(np.int64))
    batch = lambda head: torch.cat([head.expand(len(prefixes), -1), given], dim=1)
    new = generate(model.net, batch(prompt), max_tokens - given.shape[1],
                   allowed=(text.offset, text.offset + text.size), stop=eos, temperature=s.temperature,
                   top_k=s.top_k, top_p=s.top_p, cfg_scale=s.i2t_cfg_scale,
                   uncond_prompt=None if prior is None else batch(prior), generator=s.generator(salt)).numpy()
    return [list(p) + [int(t - text.offset) for t in itertools.takewhile(lambda t: t != eos, row)]
            for p, row in zip(prefixes, new)]


def text_to_speech(model: TokenModel, phonemes: list[int], prompt: np.ndarray, max_frames: int,
                   s: SamplingSettings, salt: int = 0) -> np.ndarray:
    """(n_q, T) local codec codes speaking `phonemes` in the voice of `prompt` (n_q, Tp)."""
    require_task(model, "tts")
    from pipeline.models.valle import synthesize

    return synthesize(model.net, model.vocab, list(phonemes), torch.as_tensor(np.asarray(prompt), dtype=torch.long),
                      max_frames=max_frames, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      generator=s.generator(salt)).numpy()
