"""The finaliser's building blocks: ClamAV scanning, MIME detection and selective compression."""
