"""python -m ddpm_fast.cli (as torchrun -m ddpm_fast.cli runs it): the ddpm-fast command."""
import sys

from .main import main

sys.exit(main())
