"""The engine: preprocessing, alignment, keypoints, features, matching, the kernel, the dense field, refinement."""
