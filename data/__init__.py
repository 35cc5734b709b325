"""Video and image data pipeline: tar shards -> decoded clips -> augmented, masked batches.

See ``data/plan.py`` for how epochs are planned (deterministic, evenly split, resumable, rank blocks, mixed
batches), ``data/sources.py`` for where shards may live and ``data/loader.py`` for the batch format.
"""

from .decode import DecodeError, VideoInfo, decode_image, decode_video, probe_video
from .loader import DataFailureError, ShardLoader
from .masking import num_kept, random_mask
from .plan import EpochPlan, epoch_order, rank_batches
from .samples import SampleConfig, SampleProcessor, position_rng
from .shards import SampleError, ShardReader, ShardSet, ShardSetError
from .sources import FetchError, ShardCache
from .stream import ShardStream
from .transforms import normalize

__all__ = [
    "DataFailureError",
    "DecodeError",
    "EpochPlan",
    "FetchError",
    "SampleConfig",
    "SampleError",
    "SampleProcessor",
    "ShardCache",
    "ShardLoader",
    "ShardReader",
    "ShardSet",
    "ShardSetError",
    "ShardStream",
    "VideoInfo",
    "decode_image",
    "decode_video",
    "epoch_order",
    "normalize",
    "num_kept",
    "position_rng",
    "probe_video",
    "random_mask",
    "rank_batches",
]
