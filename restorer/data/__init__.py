"""Data: image decoding, the shard format, and (later) the streaming pipeline."""

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
