"""``python -m netsim``: the ``netsim`` command (`netsim.cli.main`), for when the script is not on PATH."""

from netsim.cli import main

if __name__ == "__main__":
    main(prog_name="netsim")
