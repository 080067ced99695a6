"""Stage kinds, one module each; the registry is a plain table of imports."""
from pipeline.stages.base import ShardInput, ShardOutput, SpecProblem, Stage, UpstreamShard
from pipeline.stages.ingest_images import IngestImages
from pipeline.stages.ingest_speech import IngestSpeech

STAGES: dict[str, type[Stage]] = {cls.kind: cls for cls in (IngestImages, IngestSpeech)}

__all__ = ["STAGES", "ShardInput", "ShardOutput", "SpecProblem", "Stage", "UpstreamShard"]
