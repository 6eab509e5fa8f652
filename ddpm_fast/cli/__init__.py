"""The application around the library: the `ddpm-fast` command (main.py), sharded and
resumable sampling jobs (shards.py) across torchrun processes (distributed.py), training
(train.py) on data sets (data.py), and image files (images.py). The library core never
imports this package (DESIGN §4)."""
from .main import main

__all__ = ["main"]
