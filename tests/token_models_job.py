"""A finished job with every token model: tiny untrained tokenizers (FSQ image, 2-level codec), demo
shapes and speech packed into t2i, i2t and tts documents, then a decoder, a VALL-E and a Parti
trained and evaluated. Built once per test session (conftest.token_models_job) for the train and
report tests; tests that change it put it back."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import shapes_url_list
from pipeline.tokenizers import audio_codec_model, image_vq
from pipeline.tokenizers.audio_codec_model import AudioCodecModel, CodecModelConfig

TRAIN = "steps: 6, batch_size: 2, warmup_steps: 2, checkpoint_every: 3, log_every: 2, eval_documents: 24, eval_samples: 2"
DECODER = "{arch: decoder, n_layer: 2, n_head: 4, d_model: 64}"
DIGITS_DECODER = "{arch: decoder, n_layer: 2, n_head: 4, d_model: 64, image_code_digits: true}"


def write_job(folder: Path, site: str) -> Path:
    """40 shapes images and 24 demo utterances, untrained tiny tokenizers (evaluated), packed; three tiny models."""
    torch.manual_seed(0)
    vq = image_vq.save(image_vq.VQAutoencoder(image_vq.VQConfig(image_size=32, channels=8, quantizer="fsq",
                                                                codebook_size=256, latent_dim=16)), folder / "vq")
    codec = audio_codec_model.save(AudioCodecModel(CodecModelConfig(channels=4, max_channels=16, latent_dim=16,
                                                                    codebook_dim=16, codebook_size=64, levels=2)),
                                   folder / "codec")
    spec = folder / "job.yaml"
    spec.write_text(f"""name: train-test
storage: {folder / "out"}
stages:
  images: {{kind: ingest-images, url_list: {shapes_url_list(folder / "urls.parquet", site, 40)}, image_size: 32,
           samples_per_shard: 20}}
  speech: {{kind: ingest-speech, corpus: demo-espeak, parts: [demo-24], samples_per_shard: 12}}
  vq: {{kind: train-image-tokenizer, inputs: [images], pretrained: "{vq}", holdout_share: 0.3, eval_images: 4}}
  codec: {{kind: train-audio-codec, inputs: [speech], pretrained: "{codec}", levels: 2, holdout_share: 0.3,
          eval_utterances: 2, examples: 1, calibration_utterances: 0}}
  image-tokens: {{kind: tokenize-images, inputs: [images], tokenizer: vq}}
  audio-tokens: {{kind: tokenize-speech, inputs: [speech], codec: {{name: tokenmill, stage: codec, levels: 2}}}}
  text-bpe: {{kind: train-text-tokenizer, inputs: [images, speech], vocab_size: 400}}
  sequences: {{kind: pack, inputs: [image-tokens, audio-tokens], text_tokenizer: text-bpe, tasks: [t2i, i2t, tts],
              seq_len: 1024, cm3_rate: 0.2, prompt_seconds: 1.0}}
  decoder: {{kind: train, inputs: [sequences], model: {DIGITS_DECODER}, tasks: [t2i, i2t], text_tokenizer: text-bpe,
            image_tokenizer: vq, holdout: combinations, holdout_share: 0.2, context: 40, optimizer: muon,
            i2t_cfg_scale: 2.0, rerank: 2, i2t_rerank: 2, {TRAIN}}}
  valle: {{kind: train, inputs: [sequences], model: {{arch: valle, ar_layers: 1, nar_layers: 1, d_model: 64}},
          text_tokenizer: text-bpe, codec: codec, holdout_share: 0.2, {TRAIN}}}
  parti: {{kind: train, inputs: [sequences], model: {{arch: parti, encoder_layers: 1, decoder_layers: 1, d_model: 64}},
          text_tokenizer: text-bpe, image_tokenizer: vq, grad_accum: 2, {TRAIN}}}
""")
    return spec
