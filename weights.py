"""(temporary) reading checkpoint files and published weights."""
from model import read_checkpoint, published_weights  # noqa: F401
