"""``python -m effilora_lightning fit --config ...`` is the same as ``effilora fit --config ...``."""

from .cli import main

if __name__ == "__main__":
    main()
