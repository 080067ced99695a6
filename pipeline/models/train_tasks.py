"""What training a token model adds to the shared Ray Train loop (pipeline.train_loop): its recipe
keys, its batches from packed shards, its loss and its product files.

The decoder trains on packed rows as they are (documents of other tasks, and held-out ones, become
padding); VALL-E and Parti train on the tts / t2i documents of those rows, batched by their own
collate. Every stream is a function of (seed, rank, position), so a resumed run reads exactly the
batches the interrupted one would have (the position is the step in the checkpoint).
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import packed_rows, packing
from pipeline.models import token_model
from pipeline.models.decoder import column_index
from pipeline.models.holdout import HoldOut
from pipeline.tokenizers.text_tokenizer import TextTokenizer, load_text_tokenizer
from pipeline.tokenizers.vocab import Vocab
from pipeline.train_loop import TrainSettings

IMAGE_TEXT_TASKS = ("t2i", "i2t")


@dataclass
class TokenTrainSettings(TrainSettings):
    steps: int = 1000
    batch_size: int = 4                # rows (decoder) or documents (valle, parti) per worker and micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    optimizer: str = "adamw"           # adamw | muon: Muon on the transformer blocks' matrices (train_loop.new_optimizer)
    muon_lr: float = 0.02              # Muon's peak learning rate (lr stays AdamW's, for the other parameters)
    shuffle_buffer: int = 64           # items shuffled per worker
    cfg_dropout: float = 0.1           # share of t2i captions blanked to <pad> (classifier-free guidance)
    context: int | None = None         # decoder: train on windows of this many tokens cut from the rows at
                                       # document boundaries (attention costs context^2, not seq_len^2);
                                       # a document longer than it does not train. None: whole rows
    holdout: str = "key"               # key | combinations (pipeline.models.holdout)
    task_weights: dict | None = None   # decoder: {task: weight} of its target tokens in the loss, cm3: variants
                                       # included (None: every target token counts once)


def base_task(task: str) -> str:
    return task.removeprefix("cm3:")


@dataclass
class DocumentFilter:
    """Which documents train: those of the model's tasks that are not held out."""
    vocab: Vocab
    tasks: tuple[str, ...]
    holdout: HoldOut
    text: TextTokenizer | None         # decodes captions for the combinations hold-out

    @cached_property
    def bpe(self):
        """The caption tokenizer (None without a text tokenizer)."""
        return load_text_tokenizer(self.text).bpe if self.text else None

    def caption(self, doc: packed_rows.PackedDocument) -> str | None:
        if base_task(doc.task) not in IMAGE_TEXT_TASKS or self.bpe is None:
            return None
        return self.bpe.decode(packing.parse(self.vocab, doc.tokens)["text"].tolist())

    def held_out(self, doc: packed_rows.PackedDocument) -> bool:
        return self.holdout(doc.key, self.caption(doc) if self.holdout.policy == "combinations" else None)

    def trains(self, doc: packed_rows.PackedDocument) -> bool:
        return base_task(doc.task) in self.tasks and not self.held_out(doc)


@dataclass
class TokenModelTask:
    """The train_loop task of a token model."""
    arch: str
    model_config: Any
    settings: TokenTrainSettings
    files: list[str]                   # packed shard URLs
    vocab_json: str
    tasks: tuple[str, ...]
    text: TextTokenizer | None = None

    @cached_property
    def vocab(self) -> Vocab:
        return Vocab.from_json(json.loads(self.vocab_json))

    @cached_property
    def target_weights(self) -> torch.Tensor | None:
        """The decoder loss's weight per TASK_NAMES entry (None when the settings weigh none)."""
        weights = self.settings.task_weights
        return None if not weights else torch.tensor([float(weights.get(base_task(t), 1.0)) for t in TASK_NAMES])

    @cached_property
    def filter(self) -> DocumentFilter:
        return DocumentFilter(self.vocab, self.tasks, HoldOut(self.settings.holdout, self.settings.holdout_share), self.text)

    def build(self) -> torch.nn.Module:
        return token_model.build(self.arch, self.model_config)

    def batches(self, rank: int, world: int, start_step: int) -> Iterator[dict]:
        s = self.settings
        items = packed_rows.epoch_stream(self.files, self._items, seed=s.seed, rank=rank, world=world,
                                         shuffle_buffer=s.shuffle_buffer)
        numbered = itertools.islice(enumerate(items), start_step * s.grad_accum * s.batch_size, None)
        while True:
            chosen = list(itertools.islice(numbered, s.batch_size))
            yield self._collate([(random.Random(f"{s.seed}/{rank}/{i}"), item) for i, item in chosen])

    def _items(self, url: str) -> Iterator:
        """Training items of one shard: whole rows for the decoder, documents for the others."""
        for row in packed_rows.iter_rows(url, self.vocab.size):
            docs = list(packed_rows.documents(url, row))
            kept = [self.filter.trains(d) for d in docs]
            if self.arch == "decoder":
                yield from ((window, keep) for window, keep in windows(row, kept, self.settings.context) if any(keep))
            else:
                yield from (packing.parse(self.vocab, d.tokens) for d, k in zip(docs, kept) if k)

    def _collate(self, items: list[tuple[random.Random, Any]]) -> dict:
        if self.arch == "decoder":
            return decoder_batch(self.vocab, items, self.settings.cfg_dropout)
        docs = [doc for _, doc in items]
        if self.arch == "valle":
            from pipeline.models import valle

            return valle.collate(self.vocab, docs, torch.Generator().manual_seed(items[0][0].randrange(2**31)))
        from pipeline.models import parti

        return parti.collate(self.vocab, docs, self.settings.cfg_dropout, np.random.default_rng(items[0][0].randrange(2**31)))

    def loss(self, net, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.arch == "decoder":
            return decoder_loss(net, batch, self.target_weights, model.outputs)
        if self.arch == "valle":
            loss, stats = net(batch)
            real = (batch["ar_tokens"] != self.vocab.special("<pad>")).sum() + sum(
                batch[f"nar_{m}"].sum() for m in ("phoneme_mask", "prompt_mask", "frame_mask"))
        else:
            from pipeline.models import parti

            loss, stats = parti.training_loss(net, batch)
            real = batch["text_mask"].sum() + (batch["targets"] != parti.IGNORE).sum()
        return loss, {**stats, "tokens": float(real)}        # tokens through the model(s), padding excluded

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        token_model.save(model, self.arch, self.vocab, folder)


def over_context(files: list[str], tasks: tuple[str, ...], context: int) -> Iterator[tuple[str, str, int]]:
    """(key, task, length) of the documents of `tasks` longer than `context`: no window holds them, so
    they do not train (the stage counts them as failed samples)."""
    for url in files:
        yield from ((key, task, length) for key, task, length in packed_rows.document_index(url)
                    if base_task(task) in tasks and length > context)


def windows(row: dict, kept: list[bool], context: int | None) -> Iterator[tuple[dict, list[bool]]]:
    """The row cut at document boundaries into windows of at most `context` tokens (the documents that
    train, greedily in order), each a row of its own, padded to `context`; the whole row when None."""
    if context is None:
        yield row, kept
        return
    chosen = [d for d, keep in enumerate(kept) if keep and row["doc_lengths"][d] <= context]
    while chosen:
        take, used = [], 0
        while chosen and used + row["doc_lengths"][chosen[0]] <= context:
            take.append(chosen.pop(0))
            used += row["doc_lengths"][take[-1]]
        tokens, starts = [], []
        for d in take:
            starts.append(sum(len(t) for t in tokens))
            tokens.append(row["tokens"][row["doc_starts"][d]:row["doc_starts"][d] + row["doc_lengths"][d]])
        tail = np.zeros(context - used, np.int64)          # outside every document: decoder_batch pads it
        window = {"tokens": np.concatenate(tokens + [tail]), "doc_starts": starts, "row": row["row"],
                  **{k: [row[k][d] for d in take] for k in ("doc_lengths", "doc_targets", "doc_tasks", "doc_keys")}}
        yield window, [True] * len(take)


TASK_NAMES = ("t2i", "i2t", "tts", "asr", "cm3:t2i", "cm3:i2t", "cm3:tts", "cm3:asr")


def decoder_batch(vocab: Vocab, items: list[tuple[random.Random, tuple[dict, list[bool]]]], cfg_dropout: float) -> dict:
    """Rows -> {"tokens", "doc_ids" (-1: padding or a document that does not train), "targets" (the next
    token inside a document's target part, else -100), "task_ids" (index in TASK_NAMES per target)};
    with probability cfg_dropout a t2i document's caption is replaced by <pad>s."""
    pad = vocab.special("<pad>")
    B, T = len(items), len(items[0][1][0]["tokens"])
    tokens = np.full((B, T), pad, np.int64)
    doc_ids = np.full((B, T), -1, np.int64)
    targets = np.full((B, T), -100, np.int64)
    task_ids = np.full((B, T), -1, np.int64)
    for b, (rng, (row, kept)) in enumerate(items):
        for d, (start, length, target, task) in enumerate(zip(row["doc_starts"], row["doc_lengths"],
                                                              row["doc_targets"], row["doc_tasks"])):
            if not kept[d]:
                continue
            end = start + length
            tokens[b, start:end] = row["tokens"][start:end]
            if task == "t2i" and rng.random() < cfg_dropout:     # <bos> <t2i> caption <boi>: blank the caption
                tokens[b, start + 2:start + target - 1] = pad
            doc_ids[b, start:end] = d
            first = start + max(target, 1) - 1                   # predicts the target's first token
            targets[b, first:end - 1] = tokens[b, first + 1:end]
            task_ids[b, first:end - 1] = TASK_NAMES.index(task)
    return {name: torch.from_numpy(array) for name, array in
            (("tokens", tokens), ("doc_ids", doc_ids), ("targets", targets), ("task_ids", task_ids))}


def decoder_loss(net, batch: dict, target_weights: torch.Tensor | None = None,
                 outputs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over target positions, each weighted by its task's entry of
    `target_weights` (indexed like TASK_NAMES; None: all 1), its softmax over the model's `outputs`
    ids (None: every id); per-task means and the token count as stats."""
    counted = batch["targets"] != -100
    targets = batch["targets"][counted]
    logits = net(batch["tokens"], batch["doc_ids"], only=counted, columns=outputs)   # (N, V|K): target positions only
    if outputs is not None:
        targets = column_index(outputs, targets)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    task_ids = batch["task_ids"][counted]
    if target_weights is None:
        loss = ce.sum() / counted.sum().clamp(min=1)
    else:
        weights = target_weights.to(ce.device)[task_ids]
        loss = (ce * weights).sum() / weights.sum().clamp(min=1e-9)
    stats = {"tokens": float((batch["doc_ids"] >= 0).sum())}
    for i, name in enumerate(TASK_NAMES):
        chosen = task_ids == i
        if chosen.any():
            stats[f"loss_{name.replace(':', '_')}"] = float(ce[chosen].detach().mean())
    return loss, stats
