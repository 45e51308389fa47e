"""Task data: the bundled data sets, user data, metrics and the probe's stratified sampling."""

from .metrics import compute_metrics, majority_baseline
from .registry import Task, get_task, list_tasks, load_task
from .sampling import stratified_sample
from .user_data import load_user_task

__all__ = [
    "Task",
    "compute_metrics",
    "get_task",
    "list_tasks",
    "load_task",
    "load_user_task",
    "majority_baseline",
    "stratified_sample",
]
