"""``python -m recon.joint`` (see :mod:`recon.joint.cli`): bad settings, a resume with other
settings, missing or corrupt files print ``python -m recon.joint: error: ...`` and exit 2."""
import sys

from recon.training.cli import console_main

from .cli import main

if __name__ == "__main__":
    sys.exit(console_main(prog="python -m recon.joint", entry=main))
