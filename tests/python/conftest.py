# SPDX-License-Identifier: Apache-2.0
import pytest

import epcomm


def _has_gpu() -> bool:
    return epcomm.device_count() > 0


requires_gpu = pytest.mark.skipif(not _has_gpu(), reason="no CUDA device visible")
