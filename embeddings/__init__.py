"""radcache.embeddings: DICOM/NIfTI volumes → frozen DINOv2 → embeddings in a Zarr cache."""
