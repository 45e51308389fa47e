"""Task data: sampling now; the bundled data sets, user data and metrics live here too."""

from .sampling import stratified_sample

__all__ = ["stratified_sample"]
