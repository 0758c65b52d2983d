"""Test-wide settings: notebooks run in quick mode (small sizes) unless MOE_LAB_QUICK is set."""

import os

# Kernels started by nbmake inherit this, so notebooks shrink their sizes under pytest.
os.environ.setdefault("MOE_LAB_QUICK", "1")
