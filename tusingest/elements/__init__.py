"""Storage Elements: model and modes, backends (S3, directory), discovery, selection, breakers, health."""
