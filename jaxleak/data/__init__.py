"""Torch-free image data: tensorflow-datasets, image folders/archives, IDX files, embedded MNIST.

`load_dataset(name, split=..., n=..., seed=...)` returns a `Dataset` of
float32 images [N, H, W, C] in [0, 1] and int32 labels. It reads, in order:
a path, the embedded MNIST digits ("mnist-embedded"), offline copies in the
data dir (`data_dir=` or `$JAXLEAK_DATA_DIR`), prepared tensorflow-datasets
copies (no tensorflow needed for the array_record format), and a tfds
download when `download=True`.
"""

from jaxleak.data._common import DataFormatError, Dataset, DatasetNotFoundError
from jaxleak.data._folder import load_image_folder
from jaxleak.data._idx import read_idx
from jaxleak.data._registry import DATA_DIR_ENV, DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DataFormatError",
    "Dataset",
    "DatasetNotFoundError",
    "load_dataset",
    "load_image_folder",
    "read_idx",
]
