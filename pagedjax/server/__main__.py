"""`python -m pagedjax.server [MODEL] [options]`: the same as `pagedjax serve`."""

import sys

from pagedjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
