"""Made-up data with a known answer: the phantom and the deformation generator."""
