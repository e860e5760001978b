"""Selective FFN fine-tuning (SLAM): train only the FFN matrices of chosen layers, ship deltas.

Example:
    >>> from layerselect.selective_ffn import SelectiveFFNConfig, SelectiveFFNModel, get_slam_model
    >>> model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 1, 2, 3, 4, 5]))  # doctest: +SKIP
    >>> model.print_trainable_parameters()                                           # doctest: +SKIP
    >>> model.save_pretrained("adapter/")                                            # doctest: +SKIP
    >>> model = SelectiveFFNModel.from_pretrained(base, "adapter/")                  # doctest: +SKIP

See ``docs/adapters.md`` for the file format and distributed-training settings.
"""

from __future__ import annotations

from .adapter_file import ADAPTER_FORMAT_VERSION, read_adapter
from .config import DELTA_DTYPES, SelectiveFFNConfig
from .loading import load_deltas
from .lora import LoraExport, export_lora
from .merge import merge_checkpoint
from .model import SelectiveFFNModel, get_slam_model

__all__ = [
    "SelectiveFFNConfig",
    "SelectiveFFNModel",
    "get_slam_model",
    "load_deltas",
    "merge_checkpoint",
    "export_lora",
    "LoraExport",
    "read_adapter",
    "DELTA_DTYPES",
    "ADAPTER_FORMAT_VERSION",
]
