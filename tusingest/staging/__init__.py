"""Where received bytes wait until the upload completes: chunk files under STAGING_DIR.

The session store's committed offset is the truth (invariant 1). Staging may hold more bytes
than that after a crash or an aborted request; they are cut off when a writer is next opened
and never read, because every reader is bounded by a committed length.
"""

from tusingest.staging.digests import DigestCache, Digests, RunningDigest
from tusingest.staging.directory import ChunkWriter, DirectoryStaging, StagingError

__all__ = ["ChunkWriter", "DigestCache", "Digests", "DirectoryStaging", "RunningDigest", "StagingError"]
