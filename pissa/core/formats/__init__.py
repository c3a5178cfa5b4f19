"""One module per on-disk format: its file names, record keys and readers/writers live there only.

- :mod:`.adapter`: a PEFT LoRA adapter folder (config, weights, tensor key names);
- :mod:`.bundle`: a PiSSA bundle (residual + ``pissa_init/`` + ``pissa.json`` + card);
- :mod:`.run`: a training run (``run.json``, ``metrics.jsonl``, adapters with ``pissa_training.json``);
- :mod:`.export`: an exported LoRA adapter's record (``pissa_export.json``);
- :mod:`.model`: a Hugging Face model folder (config, weights, index, card);
- :mod:`.dtypes`: tensor dtype codes, names and sizes;
- :mod:`.safetensors`: header reading (shapes, offsets) of safetensors files.
"""
