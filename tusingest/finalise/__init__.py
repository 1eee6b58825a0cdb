"""The file sagas and what they are made of: the upload saga (finalisation: hashing, MIME, ClamAV, compression,
naming, attr.json), the delete and transfer sagas, and the UploadHooks the tus layer calls. They run on
``saga.runner``; saga/ knows nothing of them, so imports point down (finalise > saga)."""
