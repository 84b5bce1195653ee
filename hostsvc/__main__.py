"""`python -m hostsvc ...` is the `hostsvc` command."""
import sys

from .cli import main

sys.exit(main())
