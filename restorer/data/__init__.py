"""Data: decoding photos, JPEG degradation, patches, the shard format and the training stream."""

from restorer.data.decode import (
    ImageDecodeError,
    canonical_extension,
    decode_image,
    load_image,
    oriented_size,
    to_rgb_array,
)

__all__ = [
    "ImageDecodeError",
    "canonical_extension",
    "decode_image",
    "load_image",
    "oriented_size",
    "to_rgb_array",
]
