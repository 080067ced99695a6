"""Sampling from the token models with a KV cache: each new token costs one position's forward.

A model is driven through a `Step`: a function that runs the newest tokens (B, t) through the
model with its own cache and returns the logits at the last of them (B, V). `sample_loop` is the one
generation loop (guidance, allowed range, stop token) for every model: `generate` drives a Decoder
with it, pipeline.models.parti drives Parti's image decoder.

Call model.eval() first when the model has dropout.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.models.decoder import Decoder
from pipeline.models.layers import KVCache

Step = Callable[[torch.Tensor], torch.Tensor]       # new tokens (B, t) -> logits at the last one (B, V)


Generators = torch.Generator | list[torch.Generator] | None   # one for the batch, or one per row


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Generators = None) -> torch.Tensor:
    """One token (B,) from logits (B, V): greedy at temperature 0, else from the softmax at
    `temperature`, limited to the top_k tokens (0: all) and to the smallest set of tokens whose
    probability reaches top_p (nucleus; 1: all). With a list of B generators, row b draws from the
    b-th, so a row samples as it would alone."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and top_p in (0, 1]; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]     # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)                        # (B, V)
        probs = ranked.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs >= top_p        # the mass before it already reaches top_p
        logits = logits.scatter(-1, order, ranked.masked_fill(beyond, float("-inf")))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 is cond, 0 is uncond."""
    return uncond + scale * (cond - uncond)


def restrict(logits: torch.Tensor, allowed: tuple[int, int], stop: int | None = None) -> torch.Tensor:
    """-inf outside ids [lo, hi), except `stop` (so a row can still end)."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    keep = (ids >= allowed[0]) & (ids < allowed[1])
    if stop is not None:
        keep |= ids == stop
    return logits.masked_fill(~keep, float("-inf"))


def sample_loop(step: Step, prompt: torch.Tensor, max_new: int, *,
                uncond: tuple[Step, torch.Tensor] | None = None, cfg_scale: float = 1.0,
                allowed: tuple[int, int] | None = None, stop: int | None = None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, generator: Generators = None) -> torch.Tensor:
    """Up to max_new tokens (B, n) after prompt (B, T0) from `step`. `uncond` is the unconditional
    stream (its step and prompt (B, T1)) for classifier-free guidance, run only when cfg_scale != 1.
    After a row samples `stop` it gets `stop` again; the loop ends once every row has."""
    if max_new <= 0:
        return prompt.new_empty((prompt.shape[0], 0))
    guided = uncond is not None and cfg_scale != 1.0
    logits = step(prompt)                                               # (B, V)
    uncond_logits = uncond[0](uncond[1]) if guided else None
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    out = []
    while True:
        if guided:
            logits = guide(logits, uncond_logits, cfg_scale)
        if allowed is not None:
            logits = restrict(logits, allowed, stop)
        token = sample_next(logits, temperature, top_k, top_p, generator)   # (B,)
        if stop is not None:
            token = token.masked_fill(done, stop)
            done |= token == stop
        out.append(token)
        if len(out) == max_new or done.all():
            return torch.stack(out, dim=1)                              # (B, n)
        logits = step(token[:, None])
        if guided:
            uncond_logits = uncond[0](token[:, None])


def decoder_step(model: Decoder, cache: KVCache) -> Step:
    return lambda tokens: model(tokens, cache=cache)[:, -1]


@torch.no_grad()
def generate(model: Decoder, prompt: torch.Tensor, max_new: int, *, allowed: tuple[int, int] | None = None,
             stop: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_scale: float = 1.0, uncond_prompt: torch.Tensor | None = None,
             generator: Generators = None) -> torch.Tensor:
    """New tokens (B, n <= max_new) continuing prompt (B, T0); the prompts of a batch have one
    length (no padding: left padding would shift every position). `allowed`: the global-id range
    [lo, hi) sampled from (plus `stop`). With uncond_prompt (B, T1) and cfg_scale != 1, logits are
    guided as uncond + cfg_scale * (cond - uncond), the unconditional stream in its own cache."""
    uncond = None if uncond_prompt is None else (decoder_step(model, model.new_cache()), uncond_prompt)
    return sample_loop(decoder_step(model, model.new_cache()), prompt, max_new, uncond=uncond, cfg_scale=cfg_scale,
                       allowed=allowed, stop=stop, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=generator)
