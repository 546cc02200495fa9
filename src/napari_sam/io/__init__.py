"""Medical and microscopy file formats (pydicom, tifffile; nibabel/highdicom as extras)."""
