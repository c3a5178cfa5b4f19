"""PEFT's PiSSA route as the PiSSA authors' recipe does it, as one whole process (for bench/convert.py).

    python bench/_peft_route.py SOURCE OUT --init pissa_niter_16|pissa [--rank 16]

Loads the model in its own dtype, ``get_peft_model(LoraConfig(r, lora_alpha=r,
init_lora_weights=INIT, target_modules="all-linear"))``, saves the adapter as ``OUT/pissa_init``
(with ``init_lora_weights`` reset to True, as the recipe does so the adapter loads as plain LoRA),
then ``unload()`` and saves the residual model and the tokenizer/config at OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pissa.core.formats import bundle as bundle_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--init", default="pissa_niter_16")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=dtype)
    lora = LoraConfig(
        r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, init_lora_weights=args.init,
        target_modules="all-linear", bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    out = Path(args.out)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out / bundle_format.INIT_DIR)
    residual = peft_model.unload()
    residual.save_pretrained(out)
    if (Path(args.source) / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(args.source).save_pretrained(out)


if __name__ == "__main__":
    main()
