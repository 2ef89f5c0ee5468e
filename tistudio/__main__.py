"""`python -m tistudio`: the same as the `tistudio` command."""

import sys

from tistudio.cli import main

sys.exit(main())
