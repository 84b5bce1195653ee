"""Where things are in the repo, for tests in any folder (no conftest imports by name,
which clash when several test folders have a conftest.py)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "config" / "hostsvc.yaml"
