"""Encoder families: one file each, registered with `registry` on import.

`encoder` holds the shell every family shares (front-end geometry, patch embedding, positions, CLS,
final norm, the masked-spectrogram objective); a family file adds its residual block, its frozen
config and its size presets. Importing this package registers every family, in the order of
`hear_msm.list_models()`.
"""
from . import transformer, mamba, xlstm, ssamba, mwmae  # noqa: F401  isort: skip  (registration order = list order)
