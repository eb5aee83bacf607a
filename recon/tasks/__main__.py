"""``python -m recon.tasks``: see :mod:`recon.tasks.cli`."""
if __name__ == "__main__":
    import sys

    from ..training.cli import console_main
    from .cli import main

    sys.exit(console_main(prog="python -m recon.tasks", entry=main))
