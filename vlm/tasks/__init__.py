"""VQA tasks: the task contract (base), the shared loaders (hub), the metrics, and one module per benchmark.

Importing this package imports every module in it, so each `@register_task` runs and `build_task(name)`
finds every task, including ones added later as new modules.
"""
from __future__ import annotations

import importlib
import pkgutil

from vlm.tasks.base import Task, TaskError, VQASample, build_task, register_task, registered_tasks

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Task", "TaskError", "VQASample", "build_task", "register_task", "registered_tasks"]
