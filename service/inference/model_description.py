"""What a front end knows of a model version that runs in another process (a device executor):
the attributes of :class:`service.inference.runtime.ModelRuntime` that answering requests needs, from the
executor's description, plus the normaliser front ends apply before handing images over."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.preprocess import Normalizer, Preprocessing


@dataclass
class ModelDescription:
    name: str
    version: str
    labels: list[str]
    preprocessing: dict[str, Any]
    input_name: str
    input_shape: list[int]
    output_name: str
    provider: str
    pad_to: int
    precision: str
    path: Path  # the variant's file, as the executor loaded it
    precision_choice: dict[str, Any] | None = None  # why, measured by the executor at load
    labels_array: np.ndarray = field(init=False, repr=False)
    normalizer: Normalizer = field(init=False, repr=False)
    image_size: tuple[int, int] = field(init=False)  # (height, width) images are decoded to

    def __post_init__(self) -> None:
        self.labels_array = np.array(self.labels, dtype=object)
        pre = Preprocessing.parse(self.preprocessing)
        self.normalizer = Normalizer(pre)
        self.image_size = pre.size

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape[1:]))

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelDescription:
        return cls(
            **{
                k: doc[k]
                for k in (
                    "name",
                    "version",
                    "labels",
                    "preprocessing",
                    "input_name",
                    "input_shape",
                    "output_name",
                    "provider",
                    "pad_to",
                    "precision",
                )
            },
            path=Path(doc["path"]),
            precision_choice=doc.get("precision_choice"),
        )
