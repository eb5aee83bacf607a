"""``python -m recon.joint`` (see :mod:`recon.joint.cli`)."""
from .cli import main

if __name__ == "__main__":
    main()
