"""Task data: the probe's stratified sampling (``sampling``), the bundled data sets (``registry``),
user data (``user_data``) and metrics (``metrics``).

Only the sampling is imported here: the core of loradrop needs it, while the other modules pull in
``datasets`` and scikit-learn, which a user who brings their own data loop need not have.
"""

from .sampling import stratified_sample

__all__ = ["stratified_sample"]
