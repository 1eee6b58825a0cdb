"""Where received bytes wait until the upload completes: chunk files under STAGING_DIR, or parts of
an S3 multipart upload with a short tail object (STAGING_BACKEND=s3).

The session store's committed offset is the truth (invariant 1). Staging may hold more bytes
than that after a crash or an aborted request; they are cut off when a writer is next opened
and never read, because every reader is bounded by a committed length.
"""

from tusingest.staging.base import StagedObject, Staging, StagingError, StagingUnavailable, StagingWriter
from tusingest.staging.digests import DigestCache, Digests, RunningDigest
from tusingest.staging.directory import ChunkWriter, DirectoryStaging

# tusingest.staging.s3 (S3Staging) is imported where it is used: botocore stays out of a server that
# stages in a directory.

__all__ = [
    "ChunkWriter",
    "DigestCache",
    "Digests",
    "DirectoryStaging",
    "RunningDigest",
    "StagedObject",
    "Staging",
    "StagingError",
    "StagingUnavailable",
    "StagingWriter",
]
