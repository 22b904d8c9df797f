"""Reading and writing images, DICOM series, segmentations, point sets and transforms (atomically)."""
