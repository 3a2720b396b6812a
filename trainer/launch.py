"""``python -m trainer.launch``: the local launcher's command (see :mod:`trainer.runtime.launch`).

Kept at the top level because the README and docs/distributed.md spell it this way.
"""

import sys

from trainer.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
