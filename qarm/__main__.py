"""``python -m qarm``: the ``qarm`` command (``torchrun --nproc_per_node N -m qarm train ...`` runs it)."""

from qarm.cli import main

if __name__ == "__main__":
    main()
