"""Selective-scan (Mamba S6) operator: one public function, several backends.

``selective_scan_fn`` has the semantics and tensor layouts of mamba_ssm's function of the
same name. See ``dispatch`` for how a backend is chosen.
"""

from .dispatch import available_backends, selective_scan_fn
from .reference import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "available_backends"]
