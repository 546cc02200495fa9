"""Everything that imports napari's Qt side or qtpy lives in this subpackage."""
