"""The environment variables Lightning's launchers write into the launching process (one list for the suite).

A process that inherits them with ``LOCAL_RANK`` set launches no peers; each user below adds what its own
purpose needs (``MASTER_ADDR``, ``MASTER_PORT``, ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

LAUNCH_RANK_VARIABLES = ("NODE_RANK", "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
