"""Stage kinds, one module each; the registry is a plain table of imports."""
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage, UpstreamShard
from pipeline.stages.ingest_images import IngestImages
from pipeline.stages.ingest_speech import IngestSpeech
from pipeline.stages.pack import Pack
from pipeline.stages.tokenize_images import TokenizeImages
from pipeline.stages.tokenize_speech import TokenizeSpeech
from pipeline.stages.train import Train
from pipeline.stages.train_audio_codec import TrainAudioCodec
from pipeline.stages.train_image_tokenizer import TrainImageTokenizer
from pipeline.stages.train_text_tokenizer import TrainTextTokenizer

STAGES: dict[str, type[Stage]] = {cls.kind: cls for cls in (IngestImages, IngestSpeech, TrainImageTokenizer,
                                                            TokenizeImages, TrainAudioCodec, TokenizeSpeech,
                                                            TrainTextTokenizer, Pack, Train)}

__all__ = ["STAGES", "ShardInput", "ShardOutput", "SpecProblem", "Stage", "UpstreamShard"]
