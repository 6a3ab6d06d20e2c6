"""Shapes, the embedded data set and built-in benchmark: `dataset` renders it into img2dataset-format shards,
`datamodule` reads it for training, `oracle` reads generated images back into objects and scores them against
their captions, `validation` holds the val-split helpers the demo and the experiments share."""
