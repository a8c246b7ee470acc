"""The teacher sources by `teacher.source` value: the loop asks one interface (`load`, `outputs`, `fingerprint`), whatever
the source (distill/teachers/online.py, partitioned.py, cache.py)."""

from __future__ import annotations

from distill.teachers.cache import CacheTeacher
from distill.teachers.online import OnlineTeacher
from distill.teachers.partitioned import PartitionedTeacher

TEACHER_SOURCES = {"online": OnlineTeacher, "partitioned": PartitionedTeacher, "cache": CacheTeacher}
