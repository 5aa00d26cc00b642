import sys

from trainer.cli import main

if __name__ == "__main__":  # not when a data-builder process (spawn) imports the main module again
    sys.exit(main())
