"""The reliability suite (see docs/RELIABILITY.md): quiet DCP's debug event log in failure reports."""

from __future__ import annotations

import logging

logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.WARNING)
