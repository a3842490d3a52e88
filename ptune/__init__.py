"""ptune: config-driven prompt tuning of frozen pretrained transformers."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao (optional: backbone.quantize) whenever it is installed, and then torchao logs a
# warning for each CUDA extension its CPU wheel lacks, and torch one for each enum torchao registers: noise on
# every command, before ptune has even parsed its arguments.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
