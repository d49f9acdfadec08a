"""_napari/_widgets"""
