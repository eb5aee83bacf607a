"""``python -m recon.tasks``: see :mod:`recon.tasks.cli`."""
from .cli import main

if __name__ == "__main__":
    main()
