"""A Hugging Face model folder (a source checkpoint, a bundle's residual, a merged export): file names.

```
MODEL/
  config.json                               architecture (transformers' PretrainedConfig)
  model.safetensors                         one file, or
  model-0000k-of-0000N.safetensors          shards, with
  model.safetensors.index.json              {"metadata": {...}, "weight_map": {tensor: file}}
  pytorch_model*.bin (+ index)              pickle weights (read only with --allow-pickle)
  README.md                                 model card
```
"""

CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CARD = "README.md"
