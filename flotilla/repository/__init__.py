"""Triton-style model repository: config (pbtxt/yaml), versions, backends (onnx, torch program, python),
dynamic batcher, ensembles. ``dtypes`` maps tensor data types; ``backends`` runs one model version's instances."""
