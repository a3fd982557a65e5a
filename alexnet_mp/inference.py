"""After training: load a checkpoint's model for any layout, evaluate it, or classify image files.

What ``launch/evaluate.py`` and ``launch/predict.py`` call, gathered from the modules that do
each job: :mod:`~alexnet_mp.rebuild` (the model and config from the file alone),
:mod:`~alexnet_mp.evaluation` (figures and their JSON), :mod:`~alexnet_mp.predict` (image files).
"""

from alexnet_mp.evaluation import (
    default_output,
    evaluate_checkpoint,
    evaluate_to_file,
    summary,
    write_json,
)
from alexnet_mp.pipeline import crop_views, scaled_size
from alexnet_mp.predict import ImageError, format_predictions, predict, read_image, sample_transform
from alexnet_mp.rebuild import DataInfo, Loaded, load, read_checkpoint

__all__ = ["DataInfo", "ImageError", "Loaded", "crop_views", "default_output",
           "evaluate_checkpoint", "evaluate_to_file", "format_predictions", "load", "predict",
           "read_checkpoint", "read_image", "sample_transform", "scaled_size", "summary",
           "write_json"]
