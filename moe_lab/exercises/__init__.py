"""Workshop exercise checks: each runs the attendee's function on real ranks or against the reference.

Every check returns a `CheckResult`, which is true when the attendee's code is right. Its message
states what was wrong and what to look at when it is not.
"""

from .bytes_by_hand import check_bytes_by_hand
from .common import CheckResult
from .crossover import check_crossover
from .dedup import check_dedup
from .splits import check_splits

__all__ = ["CheckResult", "check_bytes_by_hand", "check_crossover", "check_dedup", "check_splits"]
