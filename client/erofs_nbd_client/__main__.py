import sys

from .cli import attach_main

sys.exit(attach_main())
