"""`tokenmill sample`: a built `train` stage turns text into images (t2i) or speech (tts), and images
into captions (i2t), with the tokenizers its job used.

The model, the text tokenizer, the image tokenizer and the codec are those the stage references
(`text_tokenizer`, `image_tokenizer`, `codec`), as built; a stage that is not built is named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.models import token_model
from pipeline.models.samplers import (SamplingSettings, image_to_text, require_task, text_to_image,
                                      text_to_speech)
from pipeline.roundtrip import RoundTripError, built_checkpoint
from pipeline.spec import JobSpec
from pipeline.stages.train import Train
from pipeline.workflow import Planner

PROMPT_SECONDS = 3.0        # VALL-E's speaker prompt: the first seconds of the prompt audio


class SampleError(RoundTripError):
    """What to sample from or with is missing; the message says what."""


@dataclass
class Sampler:
    """A built train stage with the tokenizers it references."""
    job: JobSpec
    stage: str

    def __post_init__(self):
        spec = self.job.stages.get(self.stage)
        if spec is None or not isinstance(spec.stage, Train):
            trains = [n for n, s in self.job.stages.items() if isinstance(s.stage, Train)]
            raise SampleError(f"{self.stage!r} is not a train stage of job {self.job.name} "
                              f"(train stages: {', '.join(trains) or 'none'})")
        self.config = spec.stage.config
        self.planner = Planner(self.job)
        self.model = token_model.load(built_checkpoint(self.planner, self.stage, "train").local("token-models"))

    def _reference(self, key: str):
        name = getattr(self.config, key)
        if not name:
            raise SampleError(f"stage {self.stage} has no {key}: set it to sample this task")
        return built_checkpoint(self.planner, name, key.replace("_", " "))

    def text_codec(self):
        from pipeline.stages.train_text_tokenizer import text_tokenizer_of
        from pipeline.tokenizers.text_tokenizer import load_text_tokenizer

        self._reference("text_tokenizer")
        return load_text_tokenizer(text_tokenizer_of(self.planner.built_shards(self.config.text_tokenizer)))

    def image_tokenizer(self):
        from pipeline.stages.tokenize_images import load_tokenizer

        return load_tokenizer(self._reference("image_tokenizer"))

    def codec(self):
        from pipeline.tokenizers.audio_codec import CodecConfig, load_codec

        n_q = sum(1 for r in self.model.vocab.ranges if r.name.startswith("audio:"))
        return load_codec(CodecConfig(name="tokenmill", stage=self.config.codec, levels=n_q),
                          trained=self._reference("codec"))

    def t2i(self, caption: str, out: Path, count: int, s: SamplingSettings) -> list[Path]:
        """`count` PNGs for `caption`."""
        require_task(self.model, "t2i")
        import torch

        from pipeline.data.image_shards import to_images

        ids, vq = self.text_codec().encode(caption), self.image_tokenizer()
        side = vq.config.grid
        written = []
        for i in range(count):
            codes = text_to_image(self.model, ids, side * side, s, salt=i)
            image = to_images(vq.decode(torch.as_tensor(codes, dtype=torch.long).reshape(1, side, side)))[0]
            written.append(out / f"t2i-{i:02d}.png")
            image.save(written[-1])
        return written

    def i2t(self, image_file: Path, count: int, s: SamplingSettings) -> list[str]:
        """`count` captions for an image file."""
        require_task(self.model, "i2t")
        from pipeline.data.image_shards import image_array, to_tensor

        vq, text = self.image_tokenizer(), self.text_codec()
        codes = vq.encode(to_tensor([image_array(Path(image_file).read_bytes(), vq.config.image_size)]))[0]
        return [text.bpe.decode(image_to_text(self.model, codes.flatten().numpy(), 64, s, salt=i)) for i in range(count)]

    def tts(self, text: str, prompt_audio: Path, out: Path, count: int, s: SamplingSettings,
            max_seconds: float = 10.0) -> list[Path]:
        """`count` WAVs of `text` in the voice of the first PROMPT_SECONDS of `prompt_audio`."""
        require_task(self.model, "tts")
        import soundfile as sf
        import torch
        import torchaudio

        from pipeline.tokenizers.phonemes import phonemize

        codec, table = self.codec(), self.text_codec()
        phonemes = table.encode_phonemes(phonemize([text])[0])
        audio, rate = sf.read(prompt_audio, dtype="float32", always_2d=True)
        wav = torchaudio.functional.resample(torch.from_numpy(audio.mean(axis=1)), rate, codec.sample_rate)
        wav = wav[: int(PROMPT_SECONDS * codec.sample_rate)].view(1, 1, -1)
        prompt = codec.encode(wav)[0].numpy()
        frames = int(max_seconds * codec.sample_rate / codec.hop_length)
        written = []
        for i in range(count):
            codes = text_to_speech(self.model, phonemes, prompt, frames, s, salt=i)
            speech = codec.decode(torch.as_tensor(np.asarray(codes), dtype=torch.long)[None])[0, 0].numpy()
            written.append(out / f"tts-{i:02d}.wav")
            sf.write(written[-1], speech, codec.sample_rate, format="WAV", subtype="FLOAT")
        return written

