"""Keep tpm2-tss quiet on stderr unless the user asked for its log.

libtss2 prints ``WARNING:esys:...`` / ``ERROR:tcti:...`` lines on stderr even when
the call succeeds (ESAPI probing a TCTI, a missing NV index) and before custos'
own error, which then says the same thing clearly. Its log level comes only
from the ``TSS2_LOG`` environment variable, read by each libtss2 module the first
time it logs, so setting it before the first TSS call is enough. A ``TSS2_LOG``
the user set (``TSS2_LOG=all+debug`` to debug a TPM problem) is left alone.

This is the one place that does it: every module of :mod:`custos.tpm` that calls
into libtss2 imports this module first (``custos.tpm.errors`` does, and the
others import that).
"""

from __future__ import annotations

import os

#: What custos sets when the user did not: every TSS module, no output.
QUIET_TSS2_LOG = "all+none"

# setdefault writes through to the C environment (putenv), which libtss2 reads.
os.environ.setdefault("TSS2_LOG", QUIET_TSS2_LOG)
